"""Property: whatever the options of ``compress`` and ``inspect`` (numbers of any size or sign, NaN,
empty strings, paths with rich markup and unicode), the outcome is success or exit code 2 with one
``error:`` line; never a traceback. Most generated inputs fail at the early checks, so it stays fast."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from _tiny import make_images, save_npz, tiny_resnet20
from compressor.cli.compress import app
from compressor.cli.toolbox import app as toolbox

NUMBERS = st.one_of(
    st.integers(min_value=-(10**25), max_value=10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["0", "1", "-1", "0.5", "1e400", "-0.0", "", " ", "1,2", "nan"]),
)
TEXT = st.one_of(st.sampled_from(["", "[/x]", "[best]", "é[bold]ü", ":", "a:b", "\\", "ñ/[/]"]),
                 st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12))
COMPRESS_NUMERIC = ["--target-flops", "--target-latency", "--latency-batch", "--schedule-span", "--prune-steps",
                    "--check-every", "--stability-threshold", "--ocs-decay", "--cycles", "--batch-size", "--lr",
                    "--distill-alpha", "--distill-temperature", "--max-prune-per-group", "--round-to",
                    "--val-fraction", "--seed", "--trace-timeout", "--trace-memory", "--latency-runs",
                    "--input-size", "--crop-pct", "--workers"]
COMPRESS_TEXT = ["--arch", "--criterion", "--schedule", "--optimizer", "--attention", "--mean", "--std", "--device",
                 "--out", "--data", "--interpolation", "--augment", "--input-size"]
INSPECT_NUMERIC = ["--max-prune-per-group", "--trace-timeout", "--trace-memory"]
INSPECT_TEXT = ["--arch", "--input-shape", "--attention"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("property")
    model = root / "model.pt"
    torch.save(tiny_resnet20().state_dict(), model)
    return {"root": root, "model": model, "data": save_npz(root / "data.npz", *make_images())}


def _assert_clean(result) -> None:
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr


def _options(names_numeric, names_text):
    pairs = st.one_of(st.tuples(st.sampled_from(names_numeric), NUMBERS),
                      st.tuples(st.sampled_from(names_text), TEXT))
    return st.lists(pairs, min_size=1, max_size=3)


@pytest.mark.slow  # about 30 s: a few generated commands succeed and run the whole (--epochs 0) pipeline
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=_options(COMPRESS_NUMERIC, COMPRESS_TEXT))
def test_compress_options(files, options):
    out = files["root"] / "out"
    shutil.rmtree(out, ignore_errors=True)
    args = [str(files["model"]), "--data", str(files["data"]), "--arch", "resnet20", "--target-flops", "0.5",
            "--epochs", "0", "--latency-runs", "1", "--device", "cpu", "--out", str(out)]
    for flag, value in options:
        if flag in ("--out", "--data") and value.strip():
            value = str(files["root"] / "gen" / value)  # never a path outside the test's directory
        args += [flag, value]
    _assert_clean(CliRunner().invoke(app, args))
    shutil.rmtree(out, ignore_errors=True)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=_options(INSPECT_NUMERIC, INSPECT_TEXT), model=st.one_of(st.none(), TEXT))
def test_inspect_options(files, options, model):
    path = str(files["model"]) if model is None else str(files["root"] / model) if model else ""
    args = ["inspect", path, "--arch", "resnet20", "--input-shape", "1,16,16"]
    for flag, value in options:
        args += [flag, value]
    _assert_clean(CliRunner().invoke(toolbox, args))

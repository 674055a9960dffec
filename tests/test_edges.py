"""Issue 13's twelve edges: each bad input ends in one ``error:`` line naming the problem, exit code 2,
no traceback and nothing left behind; the checks of the output location and of the options finish
before any model or data is loaded."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _tiny import make_images, save_npz, tiny_resnet20
from compressor import outputs
from compressor.cli.compress import app
from compressor.cli.toolbox import app as toolbox
from compressor.errors import CompressorError
from test_cli import _args, _assert_refused, _invoke, _staging_leftovers


def _strict(text: str):
    """``json.loads`` that refuses NaN and Infinity, as strict parsers do."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def _refused(result, fragment: str) -> str:
    """Exit code 2, one ``error:`` line holding ``fragment``, no traceback; the line."""
    assert result.exit_code == CompressorError.exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output
    return errors[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if compress or inspect loads the model or the data."""
    import compressor.loading
    import compressor.pipeline

    def loaded(*args, **kwargs):
        raise AssertionError("loaded before the early checks refused the run")

    for module, name in ((compressor.pipeline, "load_model"), (compressor.pipeline, "scan_data"),
                         (compressor.pipeline, "prepare_data"), (compressor.loading, "load_model")):
        monkeypatch.setattr(module, name, loaded)


# -- 1, 2, 3: the output location, checked before anything is loaded ----------------------------------------------


def test_out_below_a_file_is_refused_before_loading(tmp_path, model_path, data_path, no_loading):
    (tmp_path / "somefile.txt").write_text("x")
    out = tmp_path / "somefile.txt" / "OUT"
    result = _invoke(_args(model_path, data_path, out))
    _refused(result, "is not a directory")
    assert "somefile.txt" in result.stderr
    assert _staging_leftovers(tmp_path) == []


def test_out_nested_below_a_missing_parent_below_a_file(tmp_path, model_path, data_path, no_loading):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "a" / "b" / "OUT"
    _refused(_invoke(_args(model_path, data_path, out)), "cannot be created")
    assert (tmp_path / "file").is_file()


def test_out_in_a_directory_that_cannot_be_written(tmp_path, model_path, data_path, no_loading, monkeypatch):
    # As root, chmod cannot make a directory unwritable; the probe's failure is what any such directory gives.
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", denied)
    out = tmp_path / "locked" / "OUT"
    (tmp_path / "locked").mkdir()
    line = _refused(_invoke(_args(model_path, data_path, out)), "cannot be written")
    assert "Permission denied" in line
    assert list((tmp_path / "locked").iterdir()) == []


def test_out_on_a_full_disk_is_refused_with_the_sizes(tmp_path, model_path, data_path, no_loading, monkeypatch):
    import shutil

    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    line = _refused(_invoke(_args(model_path, data_path, tmp_path / "out")), "MB free; the outputs need about")
    assert "0.0 MB free" in line


def test_a_dangling_symlink_as_out(tmp_path, model_path, data_path, no_loading):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nonexistent")
    _refused(_invoke(_args(model_path, data_path, link)), "is a symbolic link to")
    assert link.is_symlink() and not (tmp_path / "nonexistent").exists()
    assert _staging_leftovers(tmp_path) == []


@pytest.mark.parametrize("where", [".", ".."])
def test_out_as_the_current_directory_or_above_with_overwrite(tmp_path, model_path, data_path, no_loading,
                                                             monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _refused(_invoke(_args(model_path, data_path, Path(where), "--overwrite")), "the current directory or one above it")
    assert _staging_leftovers(work) == [] and _staging_leftovers(tmp_path) == []


def test_an_empty_out_is_the_current_directory(model_path, data_path, no_loading):
    _refused(_invoke(_args(model_path, data_path, Path("x")) + ["--out", ""]), "--out . already exists")


# -- 4, 9, 12, 5 (strict JSON): one full run through a symlinked --out whose names hold markup ----------------------


@pytest.fixture(scope="module")
def markup_run(tmp_path_factory):
    """--overwrite onto ``o[/x]``, a symlink to the directory ``real[best]``; the model is ``m[best].pt``,
    the data ``d[/x].npz``."""
    root = tmp_path_factory.mktemp("markup")
    model = root / "m[best].pt"
    torch.save(tiny_resnet20().state_dict(), model)
    (root / "d[").mkdir()
    data = save_npz(root / "d[" / "x].npz", *make_images())
    target = root / "real[best]"
    target.mkdir()
    (target / "stale.txt").write_text("from an earlier run")
    (root / "o[").mkdir()
    link = root / "o[" / "x]"
    link.symlink_to(target)
    previous = os.umask(0o022)
    try:
        result = _invoke(_args(model, data, link, "--overwrite", "--latency-runs", "1")[:] + ["--epochs", "0"])
    finally:
        os.umask(previous)
    return {"result": result, "root": root, "link": link, "target": target, "model": model}


def test_paths_with_markup_are_printed_literally(markup_run):
    result = markup_run["result"]
    assert result.exit_code == 0, result.output
    assert f"Wrote {markup_run['link']}/:" in result.stdout
    assert "m[best].pt: before / after" in result.stdout


def test_overwriting_a_symlinked_out_writes_into_its_target_and_keeps_the_link(markup_run):
    link, target = markup_run["link"], markup_run["target"]
    assert markup_run["result"].exit_code == 0, markup_run["result"].output
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "report.json").is_file() and not (target / "stale.txt").exists()
    assert _staging_leftovers(markup_run["root"]) == [] and _staging_leftovers(markup_run["link"].parent) == []


def test_the_output_directory_follows_the_umask(markup_run):
    assert stat.S_IMODE(markup_run["target"].stat().st_mode) == 0o755


def test_report_json_is_strict_json(markup_run):
    report = _strict((markup_run["target"] / "report.json").read_text())
    assert report["null_reasons"] == {} or all(isinstance(v, str) for v in report["null_reasons"].values())


def test_a_missing_model_whose_name_holds_markup(tmp_path, data_path):
    result = _invoke(_args(tmp_path / "m[best]x.pt", data_path, tmp_path / "out"))
    _assert_refused(result, f"model file {tmp_path / 'm[best]x.pt'} not found", tmp_path / "out")


def test_mean_nan_shows_the_value(tmp_path, model_path, data_path):
    result = _invoke(_args(model_path, data_path, tmp_path / "out", "--mean", "nan", "--std", "0.3"))
    _assert_refused(result, "--mean must hold finite numbers, got [nan]", tmp_path / "out")


def test_inspect_prints_a_model_name_with_markup(tmp_path):
    (tmp_path / "[bold]m[").mkdir()
    model = tmp_path / "[bold]m[" / "x].pt"
    torch.save(tiny_resnet20().state_dict(), model)
    result = CliRunner().invoke(toolbox, ["inspect", str(model), "--arch", "resnet20", "--input-shape", "1,16,16"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("x].pt: ")

    missing = CliRunner().invoke(toolbox, ["inspect", str(tmp_path / "[bold]m[" / "[best]y.pt"), "--arch", "resnet20"])
    _refused(missing, f"model file {tmp_path}/[bold]m[/[best]y.pt not found")


# -- 5: non-finite weights -----------------------------------------------------------------------------------------


def test_a_model_with_nan_weights_is_refused(tmp_path, data_path):
    model = tiny_resnet20()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(model.state_dict(), path)
    result = _invoke(_args(path, data_path, tmp_path / "out"))
    _assert_refused(result, "holds NaN or infinite values in 1 tensor(s): conv1.weight", tmp_path / "out")


def test_inspect_refuses_nan_weights_too(tmp_path):
    model = tiny_resnet20()
    with torch.no_grad():
        model.fc.bias[0] = float("inf")
    path = tmp_path / "inf.pt"
    torch.save(model.state_dict(), path)
    result = CliRunner().invoke(toolbox, ["inspect", str(path), "--arch", "resnet20", "--input-shape", "1,16,16"])
    _refused(result, "holds NaN or infinite values in 1 tensor(s): fc.bias")


def test_non_finite_report_values_become_null_with_a_reason():
    from compressor.strict_json import nulls_for_non_finite

    clean = nulls_for_non_finite({"onnx": {"max_abs_diff": float("nan")}, "l": [1.0, float("-inf")], "ok": 2.5})
    assert clean["onnx"]["max_abs_diff"] is None and clean["l"] == [1.0, None] and clean["ok"] == 2.5
    assert set(clean["null_reasons"]) == {"onnx.max_abs_diff", "l[1]"}
    assert "NaN" in clean["null_reasons"]["onnx.max_abs_diff"]
    _strict(json.dumps(clean, allow_nan=False))


# -- 6, 7, 8, 10: options, refused the same way by every command that takes them -----------------------------------


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999999"])
def test_seed_out_of_range(tmp_path, model_path, data_path, no_loading, seed):
    _refused(_invoke(_args(model_path, data_path, tmp_path / "out", "--seed", seed)), f"--seed must be a whole number")


def test_inspect_with_the_wrong_channel_count(model_path):
    result = CliRunner().invoke(toolbox, ["inspect", str(model_path), "--arch", "resnet20", "--input-shape", "3,16,16"])
    _refused(result, "the model fails on an input of shape (3, 16, 16)")


@pytest.mark.parametrize("shape", ["1,99999999999999999999,28", "1,100000,100000", "1,2", "a,b,c", "", "0,4,4"])
def test_inspect_with_an_impossible_input_shape(model_path, no_loading, shape):
    result = CliRunner().invoke(toolbox, ["inspect", str(model_path), "--arch", "resnet20", "--input-shape", shape])
    _refused(result, "--input-shape")


@pytest.mark.parametrize("arch", [":", "", ".x:y", "a..b:c", "json:nope", "os:path"])
def test_malformed_arch(tmp_path, model_path, data_path, arch):
    line = _refused(_invoke(_args(model_path, data_path, tmp_path / "out", arch=arch)), "--arch")
    assert arch in line


@pytest.mark.parametrize("value", ["1.5", "0", "-1", "nan", "inf"])
def test_max_prune_per_group_is_checked_alike_by_compress_and_inspect(tmp_path, model_path, data_path, no_loading, value):
    compress = _refused(_invoke(_args(model_path, data_path, tmp_path / "out", "--max-prune-per-group", value)),
                        "--max-prune-per-group must lie strictly between 0 and 1")
    inspect = _refused(CliRunner().invoke(toolbox, ["inspect", str(model_path), "--arch", "resnet20",
                                                     "--max-prune-per-group", value]), "--max-prune-per-group")
    assert compress == inspect


def test_a_usage_error_is_one_line(tmp_path, model_path, data_path):
    _refused(_invoke(_args(model_path, data_path, tmp_path / "out", "--epochs", "1.5")), "Invalid value for '--epochs'")
    _refused(CliRunner().invoke(toolbox, ["inspect", str(model_path), "--bogus"]), "No such option: --bogus")


# -- 11: float images far outside [0, 1] ---------------------------------------------------------------------------


def test_float_images_that_cannot_be_pixels(tmp_path, model_path):
    images, labels = make_images()
    data = save_npz(tmp_path / "huge.npz", images.astype(np.float32) * 1000, labels)  # up to 255,000
    result = _invoke(_args(model_path, data, tmp_path / "out"))
    line = _assert_refused(result, "float images range from", tmp_path / "out")


def test_float_0_255_images_with_given_stats_are_refused(tmp_path, model_path):
    images, labels = make_images()
    data = save_npz(tmp_path / "f255.npz", images.astype(np.float32), labels)
    result = _invoke(_args(model_path, data, tmp_path / "out", "--mean", "0.5", "--std", "0.25"))
    _assert_refused(result, "would mis-normalise them", tmp_path / "out")


def test_float_0_255_images_with_inferred_stats_are_a_warning(tmp_path):
    from compressor.data import load_data

    images, labels = make_images()
    loaded = load_data(save_npz(tmp_path / "f255.npz", images.astype(np.float32), labels))
    assert len(loaded.notes) == 1 and "expected [0, 1] pixel units" in loaded.notes[0]
    assert "range from 20 to 210" in loaded.notes[0]


def test_an_original_at_chance_level_is_a_warning():
    from compressor.report import chance_warnings

    assert chance_warnings(0.15, 10) and "about chance level for 10 classes" in chance_warnings(0.15, 10)[0]
    assert chance_warnings(0.9, 10) == [] and chance_warnings(0.6, 2) == []


# -- SIGINT once the output is complete ----------------------------------------------------------------------------


def test_sigint_while_the_output_is_swapped_in_says_it_is_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_rmtree = outputs.shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        if ".old-" in str(path):
            os.kill(os.getpid(), signal.SIGINT)  # held back until the swap is over
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(outputs.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(outputs.InterruptedAfterOutput):
        with outputs.staged_output(out, overwrite=True) as stage:
            (stage / "report.json").write_text("{}")
    assert (out / "report.json").is_file() and _staging_leftovers(tmp_path) == []


def test_sigint_after_the_output_is_complete_exits_0_and_says_so(tmp_path, model_path, data_path, monkeypatch):
    import compressor.cli.compress as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_render_result", interrupted)
    out = tmp_path / "out"
    result = _invoke(_args(model_path, data_path, out, "--epochs", "0", "--latency-runs", "1"))
    assert result.exit_code == 0, result.output
    assert f"interrupted after the output was complete: {out}/ holds every file" in result.stderr
    assert (out / "report.json").is_file()


def test_staged_output_respects_a_stricter_umask_and_removes_the_parents_it_made(tmp_path):
    previous = os.umask(0o027)
    try:
        with outputs.staged_output(tmp_path / "a" / "out", overwrite=False) as stage:
            (stage / "f").write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a" / "out").stat().st_mode) == 0o750
    with pytest.raises(RuntimeError):
        with outputs.staged_output(tmp_path / "b" / "c" / "out", overwrite=False):
            raise RuntimeError("failed")
    assert not (tmp_path / "b").exists()

"""The command line through Typer's ``CliRunner``: one full tiny run, then every input a user can get
wrong, each refused with one line, a non-zero exit code, no traceback and no output directory."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compressor.checkpoint import load_pruned
from compressor.cli.compress import app
from compressor.cli.toolbox import app as toolbox
from compressor.errors import CompressorError
from compressor.models import list_models
from compressor.validate import open_session
from _tiny import IMAGE_SIZE, NUM_CLASSES, make_images, save_npz, tiny_resnet20

OUTPUTS = {"model.onnx", "original.onnx", "model.pt", "report.json", "report.md", "report.html", "plots"}
REPORT_KEYS = [
    "flops.original", "flops.compressed", "flops.target_ratio", "flops.achieved_ratio",
    "params.original", "params.compressed",
    "accuracy.original", "accuracy.pruned_before_finetune", "accuracy.compressed", "accuracy.compressed_onnx",
    "onnx.bytes", "onnx.original_bytes", "onnx.max_abs_diff", "onnx.top1_agreement", "onnx.provider",
    "latency_ms.batch1.original", "latency_ms.batch1.compressed",
    "latency_ms.batch64.original", "latency_ms.batch64.compressed",
    "preflight.groups", "preflight.protected", "preflight.min_reachable_ratio",
]
METADATA_KEYS = {"flops_original", "flops_compressed", "params_original", "params_compressed", "criterion",
                 "input_shape", "mean", "std", "num_classes"}


def _args(model: Path, data: Path, out: Path, *extra: str, target: str = "0.5", arch: str | None = "resnet20") -> list[str]:
    args = [str(model), "--data", str(data), "--target-flops", target, "--epochs", "1", "--batch-size", "16",
            "--latency-runs", "2", "--device", "cpu", "--out", str(out)]
    if arch is not None:
        args += ["--arch", arch]
    return args + list(extra)


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def _staging_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.endswith(".partial") or ".old-" in p.name]


# -- one full run ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny end-to-end run: ResNet-20 state dict, 60 images, half the FLOPs, one epoch."""
    root = tmp_path_factory.mktemp("cli_run")
    model = root / "resnet20.pt"
    torch.save(tiny_resnet20().state_dict(), model)
    data = save_npz(root / "data.npz", *make_images())
    model_bytes = model.read_bytes()
    out = root / "out"

    result = _invoke(_args(model, data, out, "--json-events", str(root / "events.jsonl")))

    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return {"result": result, "out": out, "root": root, "model": model, "model_bytes": model_bytes,
            "data": data, "report": report}


def test_run_succeeds_and_writes_exactly_the_outputs(run):
    result = run["result"]
    assert result.exit_code == 0, result.output
    assert {p.name for p in run["out"].iterdir()} == OUTPUTS
    assert _staging_leftovers(run["root"]) == []
    assert "FLOPs (MACs)" in result.stdout
    assert "Wrote" in result.stdout
    assert "Traceback" not in result.output


def test_the_event_stream_has_every_stage_start_and_end_in_order(run):
    events = [json.loads(line) for line in (run["root"] / "events.jsonl").read_text().splitlines()]
    assert all(isinstance(e["time"], float) for e in events)
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)
    stages = [(e["type"], e["name"]) for e in events if e["type"].startswith("stage_")]
    names = ["load", "trace", "prune", "fine-tune", "export", "validate"]
    assert stages == [(kind, name) for name in names for kind in ("stage_started", "stage_finished")]
    finished = {e["name"]: e["seconds"] for e in events if e["type"] == "stage_finished"}
    booked = run["report"]["stages_seconds"]
    assert finished.keys() == booked.keys()
    # The report books a schedule's prunes during fine-tuning under "prune"; the events carry wall time.
    assert all(finished[k] == booked[k] for k in ("load", "trace", "export", "validate"))
    assert finished["prune"] + finished["fine-tune"] == pytest.approx(booked["prune"] + booked["fine-tune"], abs=0.01)
    steps = [e for e in events if e["type"] == "task_progress" and e["description"].startswith("fine-tune")]
    assert steps and steps[-1]["done"] == steps[-1]["total"] and steps[-1]["eta_seconds"] == 0
    assert "loss" in steps[-1]["metrics"]
    kinds = {e["type"] for e in events}
    assert {"task_started", "task_finished", "note"} <= kinds


def test_run_leaves_the_input_model_untouched(run):
    assert run["model"].read_bytes() == run["model_bytes"]


def test_report_json_has_every_key(run):
    report = run["report"]
    for dotted in REPORT_KEYS:
        value = report
        for part in dotted.split("."):
            assert isinstance(value, dict) and part in value, f"report.json lacks {dotted}"
            value = value[part]
        assert value is not None, dotted


def test_the_run_reports_its_preflight(run):
    preflight = run["report"]["preflight"]
    assert preflight["groups"] == len(run["report"]["search"]["layers"]) > 0
    assert "fc" in preflight["protected"]  # the classifier keeps its outputs
    assert preflight["min_reachable_ratio"] == run["report"]["flops"]["min_reachable_ratio"] < 0.5
    assert "pre-flight:" in run["result"].stdout + run["result"].stderr
    assert "## Pre-flight" in (run["out"] / "report.md").read_text()


def test_report_figures_are_consistent(run):
    report = run["report"]
    flops, params, acc, onnx = report["flops"], report["params"], report["accuracy"], report["onnx"]

    assert flops["target_ratio"] == 0.5
    assert 0.495 <= flops["achieved_ratio"] <= 0.5
    assert flops["achieved_ratio"] == pytest.approx(flops["compressed"] / flops["original"])
    assert params["compressed"] < params["original"]
    for key in ("original", "pruned_before_finetune", "compressed", "compressed_onnx"):
        assert 0.0 <= acc[key] <= 1.0, key
    assert onnx["max_abs_diff"] < 1e-4
    assert onnx["top1_agreement"] == 1.0
    assert onnx["provider"] == "CPUExecutionProvider"
    assert onnx["bytes"] == (run["out"] / "model.onnx").stat().st_size
    assert onnx["original_bytes"] == (run["out"] / "original.onnx").stat().st_size
    assert onnx["bytes"] < onnx["original_bytes"]
    assert all(report["latency_ms"][b][m] > 0 for b in ("batch1", "batch64") for m in ("original", "compressed"))


def test_report_markdown_has_the_before_after_table(run):
    text = (run["out"] / "report.md").read_text()
    assert text.startswith("# Compression report")
    assert "| FLOPs (MACs) |" in text
    assert f"achieved {run['report']['flops']['achieved_ratio']:.4f}" in text


def test_onnx_metadata_describes_the_model(run):
    import onnx

    report = run["report"]
    proto = onnx.load(str(run["out"] / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}

    assert METADATA_KEYS <= set(meta)
    assert int(meta["flops_original"]) == report["flops"]["original"]
    assert int(meta["flops_compressed"]) == report["flops"]["compressed"]
    assert int(meta["params_compressed"]) == report["params"]["compressed"]
    assert meta["criterion"] == "l2"
    assert json.loads(meta["input_shape"]) == [None, 1, IMAGE_SIZE, IMAGE_SIZE]
    assert json.loads(meta["mean"]) == pytest.approx(report["data"]["mean"])
    assert json.loads(meta["std"]) == pytest.approx(report["data"]["std"])
    assert int(meta["num_classes"]) == NUM_CLASSES


def _initializer_elements(path: Path) -> int:
    import onnx

    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


def test_compressed_onnx_is_smaller_and_has_a_dynamic_batch(run):
    import onnx

    out = run["out"]
    assert 0 < _initializer_elements(out / "model.onnx") < _initializer_elements(out / "original.onnx")
    for name in ("model.onnx", "original.onnx"):
        dims = onnx.load(str(out / name)).graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].HasField("dim_value"), name
        assert [d.dim_value for d in dims[1:]] == [1, IMAGE_SIZE, IMAGE_SIZE]


def test_checkpoint_and_onnx_are_the_same_model(run):
    pruned = load_pruned(run["out"] / "model.pt")
    x = torch.randn(3, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    session = open_session(run["out"] / "model.onnx", device="cpu")

    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        reference = pruned(x).numpy()

    assert logits.shape == (3, NUM_CLASSES)
    assert np.abs(logits - reference).max() < 1e-4
    assert sum(p.numel() for p in pruned.parameters()) == run["report"]["params"]["compressed"]


# -- bad inputs ----------------------------------------------------------------------------------------------


def _assert_refused(result, fragment: str, out: Path) -> None:
    """Exit code 2, one ``error:`` line holding ``fragment``, no traceback, and no --out written."""
    assert result.exit_code == CompressorError.exit_code, result.output
    # An uncaught exception would also give a non-zero code; only typer.Exit means it was handled.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert _staging_leftovers(out.parent) == []


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


def test_missing_model_file(tmp_path, data_path, out):
    result = _invoke(_args(tmp_path / "absent.pt", data_path, out))
    _assert_refused(result, "not found", out)


def test_random_bytes_model_file(tmp_path, data_path, out):
    model = tmp_path / "noise.pt"
    model.write_bytes(np.random.default_rng(0).bytes(4096))
    result = _invoke(_args(model, data_path, out))
    _assert_refused(result, "noise.pt", out)


def test_empty_model_file(tmp_path, data_path, out):
    model = tmp_path / "empty.pt"
    model.write_bytes(b"")
    result = _invoke(_args(model, data_path, out))
    _assert_refused(result, "empty.pt", out)


def test_torchscript_model_file(tmp_path, data_path, out, resnet20):
    model = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(resnet20).save(str(model))
    result = _invoke(_args(model, data_path, out))
    _assert_refused(result, "TorchScript", out)


def test_pickled_module_without_trust_pickle(tmp_path, data_path, out, resnet20):
    model = tmp_path / "whole.pt"
    torch.save(resnet20, model)
    result = _invoke(_args(model, data_path, out, arch=None))
    _assert_refused(result, "pickled Python objects", out)
    assert "--trust-pickle" in result.stderr


def test_state_dict_without_arch(model_path, data_path, out):
    result = _invoke(_args(model_path, data_path, out, arch=None))
    _assert_refused(result, "needs --arch", out)


def test_state_dict_not_matching_arch(model_path, data_path, out):
    result = _invoke(_args(model_path, data_path, out, arch="resnet56"))
    _assert_refused(result, "does not match --arch resnet56", out)


def test_missing_data_file(tmp_path, model_path, out):
    result = _invoke(_args(model_path, tmp_path / "absent.npz", out))
    _assert_refused(result, "absent.npz not found", out)


def test_data_with_the_wrong_channel_count(tmp_path, model_path, out):
    data = save_npz(tmp_path / "rgb.npz", *make_images(channels=3))
    result = _invoke(_args(model_path, data, out))
    _assert_refused(result, "the model fails on the data's images of shape (3, 16, 16)", out)


def test_labels_beyond_the_classifier(tmp_path, model_path, out):
    data = save_npz(tmp_path / "six.npz", *make_images(classes=NUM_CLASSES + 2, per_class=5))
    result = _invoke(_args(model_path, data, out))
    _assert_refused(result, f"labels go up to {NUM_CLASSES + 1} but the model's classifier has {NUM_CLASSES} outputs", out)


@pytest.mark.parametrize("target", ["0", "1.5", "1", "-0.2"])
def test_target_flops_out_of_range(model_path, data_path, out, target):
    result = _invoke(_args(model_path, data_path, out, target=target))
    _assert_refused(result, "--target-flops must lie strictly between 0 and 1", out)


def test_unreachable_target_flops(model_path, data_path, out):
    result = _invoke(_args(model_path, data_path, out, target="0.01"))
    _assert_refused(result, "smallest reachable ratio is", out)
    assert "--max-prune-per-group" in result.stderr


def test_unknown_criterion_lists_the_registered_ones(model_path, data_path, out):
    result = _invoke(_args(model_path, data_path, out, "--criterion", "nope"))
    _assert_refused(result, "unknown criterion 'nope'; available: ", out)
    listed = result.stderr.split("available: ", 1)[1].split("\n", 1)[0]
    assert "l2" in [name.strip() for name in listed.split(",")]


def test_existing_out_without_overwrite_is_left_alone(model_path, data_path, out):
    out.mkdir()
    (out / "keep.txt").write_text("precious")

    result = _invoke(_args(model_path, data_path, out))

    assert result.exit_code == CompressorError.exit_code
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


def test_out_holding_the_model_is_refused_even_with_overwrite(model_path, data_path):
    folder = model_path.parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    result = _invoke(_args(model_path, data_path, folder, "--overwrite"))

    assert result.exit_code == CompressorError.exit_code
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "contains the input" in result.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert _staging_leftovers(folder.parent) == []


def test_debug_env_var_shows_the_traceback_instead(model_path, data_path, out):
    result = CliRunner().invoke(app, _args(model_path, data_path, out, arch=None), env={"COMPRESSOR_DEBUG": "1"})
    assert result.exit_code != 0
    assert isinstance(result.exception, CompressorError)


def test_help_mentions_the_options():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--target-flops" in result.stdout and "MACs" in result.stdout


# -- the toolbox -------------------------------------------------------------------------------------------


def test_toolbox_lists_criteria():
    result = CliRunner().invoke(toolbox, ["criteria"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if " l2 " in f" {line} "]
    assert rows and "compressor" in rows[0]


def test_toolbox_lists_models():
    result = CliRunner().invoke(toolbox, ["models"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == list_models()
    assert "resnet20" in result.stdout.split()

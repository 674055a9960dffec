"""Bad input that the other test modules do not reach through the command line: each ends in one
``error:`` line naming the problem, exit code 2, no traceback and nothing written to --out.

(Missing, corrupt, TorchScript and pickled models, a state dict not matching --arch, the wrong channel
count, labels beyond the classifier, --target-flops out of range or unreachable and an existing
--out are in ``test_cli.py``; a frozen or unprunable model in ``test_preflight.py``.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny import make_images, save_npz
from helpers_arch import erfinv_net, flat_net
from test_cli import _args, _assert_refused, _invoke


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


def test_fewer_images_than_classes(tmp_path, model_path, out):
    images, _ = make_images(classes=1, per_class=3)
    data = save_npz(tmp_path / "few.npz", images, np.array([0, 1, 3]))
    result = _invoke(_args(model_path, data, out))
    _assert_refused(result, "3 images for 4 classes (labels go up to 3)", out)


def test_empty_image_folder(tmp_path, model_path, out):
    (tmp_path / "images").mkdir()
    result = _invoke(_args(model_path, tmp_path / "images", out))
    _assert_refused(result, "has no class sub-folders", out)


def test_a_model_that_cannot_be_exported_names_the_operator(tmp_path, data_path, out):
    model = tmp_path / "erfinv.pt"
    torch.manual_seed(0)
    torch.save(erfinv_net().state_dict(), model)
    result = _invoke(_args(model, data_path, out, "--epochs", "0", "--round-to", "8", arch="helpers_arch:erfinv_net"))
    _assert_refused(result, "ONNX export failed (unsupported operator aten::erfinv)", out)


def test_a_nan_loss_stops_fine_tuning_keeps_the_last_good_state_and_says_so(tmp_path, model_path, data_path, out):
    result = _invoke(_args(model_path, data_path, out, "--lr", "1e30", "--optimizer", "sgd", "--json"))

    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert any("non-finite loss" in w and "kept the state from the start of fine-tuning" in w for w in report["warnings"])
    assert np.isfinite(report["onnx"]["max_abs_diff"])
    accuracy = report["accuracy"]
    # fine-tuning starts after reconstruction (on by default), else after batch-norm recalibration
    before = next(accuracy[k] for k in ("pruned_reconstructed", "pruned_bn_recalibrated", "pruned_before_finetune")
                  if accuracy.get(k) is not None)
    assert accuracy["compressed"] == pytest.approx(before, abs=1e-6)  # the state fine-tuning started from


def test_images_of_a_size_the_model_does_not_take(tmp_path, out):
    model = tmp_path / "flat.pt"
    torch.save(flat_net().state_dict(), model)
    images, labels = make_images(size=20)
    data = save_npz(tmp_path / "big.npz", images, labels)
    result = _invoke(_args(model, data, out, arch="helpers_arch:flat_net"))
    _assert_refused(result, "the model fails on the data's images of shape (1, 20, 20)", out)


def test_tracing_that_runs_past_its_budget_is_stopped(tmp_path, model_path, data_path, out, monkeypatch):
    import time

    import torch_pruning as tp

    def slow(self, *args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", slow)
    start = time.perf_counter()
    result = _invoke(_args(model_path, data_path, out, "--trace-timeout", "0.5"))
    assert time.perf_counter() - start < 20
    _assert_refused(result, "took longer than 0.5 s and was stopped", out)
    assert "--trace-timeout" in result.stderr


def test_tracing_past_its_memory_budget_is_stopped(model_path, data_path, out, monkeypatch):
    import time

    import torch_pruning as tp

    from compressor import watchdog

    if watchdog.resident_bytes() is None:
        pytest.skip("no /proc/self/statm to read the resident memory from")
    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", lambda self, *a, **k: time.sleep(30))
    start = time.perf_counter()
    result = _invoke(_args(model_path, data_path, out, "--trace-memory", "0.001"))  # 1 MB: less than any process holds
    assert time.perf_counter() - start < 20
    _assert_refused(result, "of resident memory, past its budget of 1 MB, and was stopped", out)
    assert "--trace-memory" in result.stderr and "smaller images" in result.stderr


def test_a_long_trace_shows_a_heartbeat(model_path, data_path, out, monkeypatch):
    import time

    import torch_pruning as tp

    from compressor import watchdog

    monkeypatch.setattr(watchdog, "HEARTBEAT_AFTER", 0.2)
    monkeypatch.setattr(watchdog, "HEARTBEAT_EVERY", 0.3)
    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", lambda self, *a, **k: time.sleep(30))
    result = _invoke(_args(model_path, data_path, out, "--trace-timeout", "1"))
    _assert_refused(result, "took longer than 1 s", out)
    beats = [line for line in result.stderr.splitlines() if line.strip().startswith("tracing… ")]
    assert len(beats) >= 2, result.stderr
    assert watchdog.resident_bytes() is None or all("GB" in line for line in beats)

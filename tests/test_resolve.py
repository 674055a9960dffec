"""The values a run resolves (FLOPs ratio, rounding, floor) are computed once and recorded next to the
request; ONNX parity is judged against a tolerance scaled to the logits."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from compressor import compress, pipeline, pruning, validate
from compressor.errors import ParityError
from compressor.validate import Parity, judge_parity
from _tiny import FlopsTimer


def test_the_floor_is_computed_once_per_rounding_multiple(make_config, monkeypatch):
    calls = []
    real = pruning.floor

    def counting(graph, **kwargs):
        calls.append((kwargs.get("round_to"), kwargs.get("max_prune_fraction")))
        return real(graph, **kwargs)

    monkeypatch.setattr(pruning, "floor", counting)
    probes = []
    real_search = pruning.search
    monkeypatch.setattr(pruning, "search", lambda *a, **k: probes.append(k.get("known_floor")) or real_search(*a, **k))
    result = compress(make_config(target_flops=0.3, epochs=0))
    assert calls and len(calls) == len(set(calls))  # the halving of the multiple tries each one once
    assert probes and probes[0] is not None and probes[0].ratio == result.prune.min_reachable_ratio


def test_a_latency_target_is_recorded_as_asked_and_as_resolved(make_config, monkeypatch):
    from compressor import latency

    monkeypatch.setattr(latency, "OnnxTimer", FlopsTimer)  # latency follows the FLOPs exactly
    config = make_config(target_flops=None, target_latency=0.6, epochs=0, round_to=1)
    result = compress(config)
    assert config.target_flops is None  # the config is not rewritten
    assert result.resolved.flops_ratio == result.prune.target_ratio == result.latency_search.flops_ratio
    saved = torch.load(config.output_dir / "model.pt", weights_only=False)
    assert saved["target_flops"] is None and saved["requested"]["target_latency"] == 0.6
    assert saved["resolved"]["flops_ratio"] == pytest.approx(result.resolved.flops_ratio)
    meta = {p.key: p.value for p in onnx.load(str(config.output_dir / "model.onnx")).metadata_props}
    assert json.loads(meta["requested"])["target_flops"] is None
    assert json.loads(meta["resolved"])["round_to"] == 1
    assert json.loads((config.output_dir / "report.json").read_text())["resolved"]["flops_ratio"] == pytest.approx(
        result.resolved.flops_ratio)


def test_parity_is_judged_relative_to_the_largest_logit():
    tiny = Parity(max_abs_diff=1e-12, top1_agreement=1.0, samples=4, mean_abs_diff=1e-13, max_abs_logit=1e-9)
    assert judge_parity(tiny, provider="CPUExecutionProvider").tolerance == validate.PARITY_TOLERANCE["CPUExecutionProvider"]
    off = Parity(max_abs_diff=0.05, top1_agreement=0.75, samples=4, mean_abs_diff=0.01, max_abs_logit=10.0)
    with pytest.raises(ParityError) as caught:
        judge_parity(off, provider="CPUExecutionProvider")
    assert "max difference 0.05" in caught.value.message and "mean difference 0.01" in caught.value.message
    assert "top-1 agreement 75.00%" in caught.value.message and "--parity-tolerance" in caught.value.hint
    assert judge_parity(off, provider="CUDAExecutionProvider", override=0.01).tolerance == 0.01


def test_a_model_failing_parity_is_an_error_and_nothing_is_written(make_config, monkeypatch):
    real = pipeline.ft.predict

    def skewed(model, x, **kwargs):  # the PyTorch reference drifts from what the ONNX model computes
        out = real(model, x, **kwargs)
        return out + 0.01 * out.abs().max()

    monkeypatch.setattr(pipeline.ft, "predict", skewed)
    config = make_config(epochs=0)
    with pytest.raises(ParityError):
        compress(config)
    assert not config.output_dir.exists()
    assert not [p for p in config.output_dir.parent.iterdir() if p.name.startswith(f".{config.output_dir.name}.")]
    result = compress(make_config(epochs=0, parity_tolerance=0.05))  # widened: accepted, and recorded
    assert result.validation.parity.tolerance == 0.05
    assert json.loads((result.out_dir / "report.json").read_text())["onnx"]["parity_tolerance"] == 0.05


def _floors(config):
    from compressor import graph as graphs, pipeline

    loaded = pipeline._load(config)
    coupling = graphs.trace(loaded.model.model, loaded.data.head(1))
    at = {cap: pruning.floor(coupling, max_prune_fraction=cap, round_to=1).ratio for cap in pruning.AUTO_CAPS}
    return at


def test_the_default_cap_is_raised_only_as_far_as_the_target_needs(make_config, tmp_path):
    from compressor.errors import TargetUnreachableError

    floors = _floors(make_config())
    assert floors[0.75] > floors[0.8] > floors[0.85] > floors[0.9]
    # Reachable at the default cap: kept, no note.
    kept = compress(make_config(target_flops=round(floors[0.75] + 0.01, 3), epochs=0, round_to=1, out_dir=tmp_path / "kept"))
    assert kept.max_prune_per_group == 0.75 and kept.resolved.cap_note is None
    # Between the floors at 0.8 and 0.85: raised to 0.85, not further, and said.
    target = round((floors[0.8] + floors[0.85]) / 2, 4)
    config = make_config(target_flops=target, epochs=0, round_to=1)
    raised = compress(config)
    assert config.max_prune_per_group is None  # the request is recorded as asked
    assert raised.max_prune_per_group == raised.resolved.max_prune_per_group == 0.85
    assert raised.prune.achieved_ratio <= target
    assert any("up to 85% of a group's channels are removed, not 75%" in w for w in raised.warnings)
    report = json.loads((config.output_dir / "report.json").read_text())
    assert report["resolved"]["max_prune_per_group"] == 0.85 and report["search"]["max_prune_per_group"] == 0.85
    meta = {p.key: p.value for p in onnx.load(str(config.output_dir / "model.onnx")).metadata_props}
    assert json.loads(meta["requested"])["max_prune_per_group"] is None
    # A cap given is a hard one: the same target is refused at it, naming it.
    with pytest.raises(TargetUnreachableError, match="at most 75% of each group's channels"):
        compress(make_config(target_flops=target, epochs=0, round_to=1, max_prune_per_group=0.75, out_dir=tmp_path / "hard"))
    # Below the floor at the largest cap: refused, naming that cap.
    with pytest.raises(TargetUnreachableError, match="at most 90% of each group's channels"):
        compress(make_config(target_flops=round(floors[0.9] * 0.9, 4), epochs=0, round_to=1, out_dir=tmp_path / "below"))

"""The latency target: the outer search with a deterministic fake timer, then one real onnxruntime run;
the per-layer profile; and the not-faster warning, forced with a model that pruning cannot speed up."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from compressor import compress, criteria, flops, graph, latency, pruning, report, validate
from compressor.cli.compress import app
from compressor.errors import ConfigError, TargetUnreachableError
from compressor.latency import LatencyMeasurement
from compressor.profile import module_for_node
from compressor.validate import Latency, Parity, ValidationResult
from _tiny import IMAGE_SIZE, make_images, save_npz, tiny_resnet20
from helpers_arch import compute_bound, matmul_dominated


def _fake(curve):
    """A prune function and a timer for ``search_latency``: candidate r measures ``curve(r)``."""
    def prune(r):
        return r, SimpleNamespace(achieved_ratio=r)

    def timer(r):
        return LatencyMeasurement(ratio=curve(r), spread=0.01, original_ms=1.0, compressed_ms=curve(r))

    return prune, timer


def _search(curve, *, target, floor=0.1, cap=None):
    prune, timer = _fake(curve)
    return latency.search_latency(prune, timer, target=target, floor=floor, flops_cap=cap, batch=1, provider="fake")


def linear(r):
    return 0.2 + 0.8 * r  # latency falls slower than FLOPs: a fixed cost stays


# -- the outer search, deterministic ---------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [None, 0.8])
def test_search_finds_the_largest_flops_ratio_that_meets_the_target(cap):
    result = _search(linear, target=0.6, cap=cap)  # linear(0.5) == 0.6

    assert result.latency_ratio <= 0.6
    assert 0.5 - latency.FLOPS_RESOLUTION <= result.flops_ratio <= 0.5
    assert result.limited_by == "latency"
    assert len(result.probes) <= latency.MAX_PROBES
    assert result.probes[0].flops_target == (cap if cap else 0.1)
    assert all(p.meets == (p.latency_ratio <= 0.6) for p in result.probes)


def test_a_flops_target_that_is_fast_enough_decides():
    result = _search(linear, target=0.6, cap=0.3)

    assert result.flops_ratio == 0.3
    assert result.limited_by == "flops"
    assert len(result.probes) == 1


def test_a_step_shaped_curve_still_lands_on_a_meeting_candidate():
    # Rounded widths make latency jump in steps rather than follow FLOPs.
    def steps(r):
        return 0.3 if r < 0.35 else 0.55 if r < 0.62 else 0.9

    result = _search(steps, target=0.6)

    assert result.latency_ratio == 0.55
    assert 0.62 - latency.FLOPS_RESOLUTION <= result.flops_ratio < 0.62


def test_a_noisy_curve_keeps_the_probe_budget_and_chooses_a_measured_success():
    rng = random.Random(0)
    result = _search(lambda r: linear(r) * rng.uniform(0.85, 1.15), target=0.6)

    assert len(result.probes) <= latency.MAX_PROBES
    chosen = [p for p in result.probes if p.flops_target == result.flops_ratio]
    assert chosen and chosen[0].meets and chosen[0].latency_ratio == result.latency_ratio <= 0.6


def test_a_floor_that_misses_within_its_noise_is_measured_again():
    prune, _ = _fake(linear)
    ratios = iter([0.62, 0.55])  # the floor's first measurement misses 0.6 by less than its spread

    def timer(r):
        return LatencyMeasurement(ratio=next(ratios, linear(r)), spread=0.05, original_ms=1.0, compressed_ms=1.0)

    result = latency.search_latency(prune, timer, target=0.6, floor=0.1, flops_cap=None, batch=1, provider="fake")

    assert [p.flops_target for p in result.probes[:2]] == [0.1, 0.1]
    assert result.latency_ratio <= 0.6


def test_an_unreachable_target_names_the_best_reachable_ratio():
    with pytest.raises(TargetUnreachableError) as info:
        _search(lambda r: 0.9 + 0.1 * r, target=0.5, floor=0.2)

    assert "--target-latency 0.5 is unreachable" in str(info.value)
    assert "0.920" in str(info.value)  # measured at the floor
    assert info.value.hint and "0.93" in info.value.hint


# -- resolve_target on a real graph, with a timer that follows the real FLOPs ------------------------------------


@pytest.fixture(scope="module")
def tiny():
    coupling = graph.trace(tiny_resnet20(), torch.randn(1, 1, IMAGE_SIZE, IMAGE_SIZE))
    return coupling, pruning.score_groups(coupling, criteria.get_criterion("l2"))


def test_resolved_ratio_reproduces_the_timed_candidate(tiny, make_config, monkeypatch):
    monkeypatch.setattr(latency, "MAX_PROBES", 3)  # each probe is a whole FLOPs search; the fakes above test the rest
    coupling, scores = tiny
    base = flops.measure(coupling.model, coupling.example_input).macs
    timed = []

    def sqrt_timer(model):
        r = (flops.measure(model, coupling.example_input).macs / base) ** 0.5
        timed.append(r)
        return LatencyMeasurement(ratio=r, spread=0.0, original_ms=1.0, compressed_ms=r)

    config = make_config(target_flops=None, target_latency=0.8)
    ratio, result = latency.resolve_target(coupling, config, criterion=criteria.get_criterion("l2"),
                                           data=SimpleNamespace(val_x=coupling.example_input), round_to=8,
                                           timer=sqrt_timer)

    assert result is not None and result.latency_ratio <= 0.8 and len(timed) == len(result.probes)
    _, pruned = pruning.search(coupling, scores, target_ratio=ratio, max_prune_fraction=config.cap,
                               round_to=8)
    assert pruned.achieved_ratio ** 0.5 == pytest.approx(result.latency_ratio)


def test_without_a_latency_target_the_flops_target_passes_through(tiny, make_config):
    coupling, _ = tiny
    assert latency.resolve_target(coupling, make_config(target_flops=0.4), criterion=criteria.get_criterion("l2"),
                                  data=SimpleNamespace(val_x=coupling.example_input), round_to=8) == (0.4, None)


# -- config ------------------------------------------------------------------------------------------------------


def test_one_target_is_required(make_config):
    with pytest.raises(ConfigError, match="give --target-flops, --target-latency or both"):
        make_config(target_flops=None)


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("target_latency", 0, "--target-latency"), ("target_latency", 1.0, "--target-latency"),
    ("target_latency", float("nan"), "--target-latency"), ("latency_batch", 0, "--latency-batch"),
])
def test_latency_options_are_validated(make_config, field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        make_config(**{field: value})


def test_cli_without_any_target_is_refused(model_path, data_path, tmp_path):
    result = CliRunner().invoke(app, [str(model_path), "--data", str(data_path), "--arch", "resnet20",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "give --target-flops, --target-latency or both" in result.stderr
    assert not (tmp_path / "out").exists()


# -- one real latency-target run ------------------------------------------------------------------------------------


def test_a_real_latency_target_run_meets_its_target(make_config, tmp_path):
    # A model whose time is arithmetic at batch 64 (not per-call overhead, as the tiny ResNet-20's is), so
    # that half its FLOPs measures well under 0.8 of its latency even with other tests on the same cores.
    model = tmp_path / "compute_bound.pt"
    torch.save(compute_bound().state_dict(), model)
    config = make_config(model_path=model, arch="helpers_arch:compute_bound", target_flops=None, target_latency=0.8,
                         latency_batch=64, latency_runs=30, epochs=0)
    result = compress(config)

    d = json.loads((config.output_dir / "report.json").read_text())
    lat = d["targets"]["latency"]
    assert lat["requested_ratio"] == 0.8 and lat["batch"] == 64 and lat["provider"] == "CPUExecutionProvider"
    assert lat["search_ratio"] <= 0.8
    assert 1 <= len(lat["probes"]) <= latency.MAX_PROBES
    assert d["targets"]["flops"] == {"requested_ratio": None, "achieved_ratio": result.prune.achieved_ratio}
    assert d["flops"]["target_ratio"] == pytest.approx(lat["flops_ratio_chosen"])
    # Validation times the exported model again; on a busy machine allow the noise the search reported, and some.
    assert lat["achieved_ratio"] <= 0.8 + max(3 * lat["search_spread"], 0.2)
    text = (config.output_dir / "report.md").read_text()
    assert "## Targets: requested vs achieved" in text and "| latency ratio, batch 64" in text


# -- the per-layer picture ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("node", "module"), [
    ("/layers/layers.0/conv1/Conv", "layers.0.conv1"),
    ("/conv1/Conv", "conv1"),
    ("/features/features.1/block/block.0/block.0.0/Conv", "features.1.block.0.0"),
    ("/fc/Gemm", "fc"),
    ("/features/features.3/Add", None),  # a block's residual add: no convolution or linear layer
    ("ReorderOutput", None),
])
def test_onnx_node_names_map_back_to_modules(node, module):
    modules = {"conv1", "layers.0.conv1", "features.1.block.0.0", "fc", "features.3.block.0.0"}
    assert module_for_node(node, modules) == module


def test_report_has_the_per_layer_picture(run_half):
    d = run_half["report"]
    lp = d["layer_profile"]
    names = [l["layer"] for l in lp["layers"]]
    assert names[0] == "conv1" and names[-1] == "fc" and "layers.0.conv1" in names
    by_name = {l["layer"]: l for l in lp["layers"]}
    assert by_name["fc"]["channels_after"] == by_name["fc"]["channels_before"] == 4
    assert any(l["channels_after"] < l["channels_before"] for l in lp["layers"])
    for side in ("original", "compressed"):
        conv_time = sum(l[f"latency_share_{side}"] for l in lp["layers"])
        assert conv_time > 0.3, "the profiler's times did not map back to the layers"
        assert conv_time + lp[f"other_latency_share_{side}"] == pytest.approx(1.0)
        assert 0.5 < sum(l[f"flops_share_{side}"] for l in lp["layers"]) <= 1.0
    assert "## Where FLOPs and time go" in run_half["markdown"]


@pytest.fixture(scope="module")
def run_half(tmp_path_factory):
    root = tmp_path_factory.mktemp("half")
    model = root / "resnet20.pt"
    torch.save(tiny_resnet20().state_dict(), model)
    data = save_npz(root / "data.npz", *make_images())
    out = root / "out"
    result = CliRunner().invoke(app, [str(model), "--data", str(data), "--arch", "resnet20", "--target-flops", "0.5",
                                      "--epochs", "0", "--latency-runs", "4", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return {"report": json.loads((out / "report.json").read_text()), "markdown": (out / "report.md").read_text()}


# -- never silently slower ------------------------------------------------------------------------------------------


def _validation(*speedups: float) -> ValidationResult:
    return ValidationResult(provider="CPUExecutionProvider", parity=Parity(0.0, 1.0, 1), accuracy_original=1.0,
                            accuracy_compressed=1.0,
                            latency=[Latency(batch=b, original_ms=1.0, compressed_ms=1.0 / s, original_spread_ms=0.0,
                                             compressed_spread_ms=0.0, runs=5) for b, s in zip((1, 64), speedups)])


def test_speed_warnings_name_the_batch_and_the_fix():
    slower, flat = report.speed_warnings(_validation(0.8, 1.02), None, round_to=1)

    assert "SLOWER than the original at batch 1" in slower and "0.80x" in slower
    assert "NOT FASTER than the original at batch 64" in flat
    assert "--round-to" in slower and "this run used 1" in slower and "--target-latency" in slower
    assert report.speed_warnings(_validation(1.5, 1.4), None, round_to=8) == []


def test_a_model_pruning_cannot_speed_up_is_flagged_loudly(tmp_path, monkeypatch):
    # The model's time goes to a matrix chain nothing prunes, so the two models run alike; on a busy
    # machine the noise of a 1 ms model can still make either look faster, so the timings the run
    # reports are made to say exactly that: both sessions really run, and both get the original's times.
    real = validate.interleaved_times

    def alike(sessions, feed, *, runs, warmup=5, check=None, settle=None):
        times = real(sessions, feed, runs=runs, warmup=warmup, check=check, settle=settle)
        return [times[0]] * len(times)

    monkeypatch.setattr(validate, "interleaved_times", alike)
    model = tmp_path / "mm.pt"
    torch.save(matmul_dominated().state_dict(), model)
    data = save_npz(tmp_path / "data.npz", *make_images())
    out = tmp_path / "out"

    result = CliRunner().invoke(app, [str(model), "--data", str(data), "--arch", "helpers_arch:matmul_dominated",
                                      "--target-flops", "0.5", "--round-to", "1", "--epochs", "0",
                                      "--latency-runs", "5", "--device", "cpu", "--out", str(out)])

    assert result.exit_code == 0, result.output
    d = json.loads((out / "report.json").read_text())
    assert 0.45 <= d["flops"]["achieved_ratio"] <= 0.5  # two groups of 32 channels: coarse steps
    assert d["not_faster"], f"the model measured faster: {d['latency_ms']}"
    assert {e["batch"] for e in d["not_faster"]} <= {1, 64}
    assert any("FASTER than the original" in w or "SLOWER than the original" in w for w in d["warnings"])
    assert "NOT FASTER" in result.stderr  # the panel's title
    assert "--target-latency" in result.stderr
    md = (out / "report.md").read_text()
    assert "> **WARNING: the compressed model is" in md
    speed = [w for w in d["warnings"] if "FASTER than the original" in w or "SLOWER than the original" in w]
    assert all(md.count(w) == 1 for w in speed)  # once, at the top: not again under "Warnings"



def test_round_to_defaults_per_execution_provider(make_config):
    assert make_config(device="cpu").round_to is None
    here = latency.default_round_to("CPUExecutionProvider")
    assert latency.round_to_for(make_config(device="cpu")) == here
    # The CPU EP's default follows the width of onnxruntime's convolution blocks on the CPU.
    assert latency.default_round_to("CPUExecutionProvider", cpu_capability="AVX512") == 16
    assert latency.default_round_to("CPUExecutionProvider", cpu_capability="AVX2") == 8
    assert latency.default_round_to("CPUExecutionProvider", cpu_capability="DEFAULT") == 16
    assert latency.default_round_to("CUDAExecutionProvider") == 8
    assert latency.round_to_for(make_config(device="cpu", round_to=1)) == 1
    with pytest.raises(ConfigError, match="--round-to"):
        make_config(round_to=0)


def test_the_default_multiple_is_lowered_where_the_target_needs_finer_widths(tiny, make_config):
    coupling, _ = tiny  # ResNet-20: 16-channel first stage, 64 channels at most
    ones = [torch.ones(spec.units) for spec in coupling.groups]
    floor16 = pruning.floor_ratio(coupling, ones, max_prune_fraction=0.75, round_to=16)
    assert latency.fit_round_to(coupling, make_config(target_flops=0.5)) == (16, None)  # reachable: the default

    round_to, note = latency.fit_round_to(coupling, make_config(target_flops=floor16 - 0.05))
    assert round_to < 16
    assert pruning.floor_ratio(coupling, ones, max_prune_fraction=0.75, round_to=round_to) <= floor16 - 0.05
    assert f"multiples of {round_to}, not 16" in note and f"{floor16:.3f}" in note

    # An explicit multiple is the user's: kept, and the search says the target is unreachable with it.
    assert latency.fit_round_to(coupling, make_config(target_flops=floor16 - 0.05, round_to=16)) == (16, None)


# -- how many rounds the timing takes ---------------------------------------------------------------------------


class _Session:
    """A session whose run takes ``ms`` (a list: one per call, cycled) on the fake clock."""

    def __init__(self, clock: list[float], ms: list[float]) -> None:
        self.clock, self.ms, self.calls = clock, ms, 0

    def run(self, *_):
        self.clock[0] += self.ms[self.calls % len(self.ms)] / 1e3
        self.calls += 1


@pytest.mark.parametrize(("compressed_ms", "settle", "rounds"), [
    ([5.0], validate.SETTLE, validate.MIN_ROUNDS),  # a steady ratio is known after the minimum
    ([2.0, 8.0], validate.SETTLE, 40),  # a ratio that swings 4x never settles: every round runs
    ([5.0], None, 40),  # without settle, the rounds asked for
])
def test_timing_stops_once_the_ratio_is_known(monkeypatch, compressed_ms, settle, rounds):
    clock = [0.0]
    monkeypatch.setattr(validate.time, "perf_counter", lambda: clock[0])
    original, compressed = _Session(clock, [10.0]), _Session(clock, compressed_ms)
    o, c = validate.interleaved_times([original, compressed], {}, runs=40, warmup=5, settle=settle)
    assert len(o) == len(c) == rounds
    assert original.calls == rounds + 5  # the warm-up: 5 runs of 10 ms, under WARMUP_S


def test_slow_rounds_settle_after_fewer_rounds(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(validate.time, "perf_counter", lambda: clock[0])
    long = validate.SLOW_ROUND_S * 1e3  # a large model at batch 64: each round takes over SLOW_ROUND_S
    original, compressed = _Session(clock, [long]), _Session(clock, [long / 2])
    o, c = validate.interleaved_times([original, compressed], {}, runs=10, warmup=5, settle=validate.SETTLE)
    assert len(o) == len(c) == validate.MIN_ROUNDS_SLOW < validate.MIN_ROUNDS
    swinging = _Session(clock, [long / 4, long])  # a ratio that swings runs every round it has time for
    o, _ = validate.interleaved_times([_Session(clock, [long]), swinging], {}, runs=10, warmup=5, settle=validate.SETTLE)
    assert len(o) == 10  # 10 rounds of 1.25-2 s: within ROUNDS_BUDGET_S
    o, _ = validate.interleaved_times([_Session(clock, [long]), swinging], {}, runs=30, warmup=5, settle=validate.SETTLE)
    assert len(o) == 10  # then the budget stops it: rounds of 1.25 or 2 s, the 10th the first to end past 15 s


def test_timing_stops_after_its_time_budget(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(validate.time, "perf_counter", lambda: clock[0])
    round_ms = validate.ROUNDS_BUDGET_S * 1e3 / 4  # a round a quarter of the budget: ResNet-50 at batch 64
    swinging = _Session(clock, [round_ms / 4, round_ms / 2])
    o, _ = validate.interleaved_times([_Session(clock, [round_ms / 2]), swinging], {}, runs=10, warmup=1,
                                      settle=validate.SETTLE)
    assert len(o) == 5  # unsettled, but the 5th round ends past the budget
    o, _ = validate.interleaved_times([_Session(clock, [round_ms / 2]), swinging], {}, runs=10, warmup=1)
    assert len(o) == 10  # without settle (one model, or a benchmark), every round asked for


def test_warm_up_stops_after_its_time_budget(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(validate.time, "perf_counter", lambda: clock[0])
    slow = _Session(clock, [validate.WARMUP_S * 1e3 * 0.6])  # each run takes 0.6 of the warm-up budget
    validate.interleaved_times([slow], {}, runs=1, warmup=5)
    assert slow.calls == 2 + 1  # two warm-up runs pass the budget, then the timed one

"""Pruning schedules: every registered one end to end, the soft-mask machinery, OCSPruner's stability
rule, the learning-rate cycle they share, and the contract a plug-in schedule must keep."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from compressor import compress, graph, pruning, schedules
from compressor.cli.compress import app as compress_app
from compressor.data import load_data
from compressor.errors import ConfigError, GraphError, TargetUnreachableError
from compressor.finetune import FinetuneSettings, one_cycle
from compressor.masks import ChannelMask
from compressor.plugins.schedules import Cyclical, cubic_ramp, jaccard
from _tiny import IMAGE_SIZE, tiny_resnet20

SCHEDULES = [info.name for info in schedules.available_schedules()]


def test_the_four_builtin_schedules_are_registered():
    assert {"oneshot", "gradual", "ocs", "cyclical"} <= set(SCHEDULES)


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_runs_end_to_end_to_the_target(name, make_config):
    result = compress(make_config(schedule=name, epochs=3, batch_size=8, target_flops=0.5))

    assert 0.5 * (1 - pruning.TOLERANCE) <= result.prune.achieved_ratio <= 0.5
    assert result.schedule is not None and result.schedule.events
    assert result.schedule.events[-1].flops_ratio == pytest.approx(result.prune.achieved_ratio)
    assert result.validation.parity.top1_agreement == 1.0
    report = json.loads((result.out_dir / "report.json").read_text())
    assert report["schedule"]["name"] == name
    assert report["schedule"]["events"][-1]["flops_ratio"] == pytest.approx(result.prune.achieved_ratio)
    assert f"schedule `{name}`" in (result.out_dir / "report.md").read_text()
    # Reconstruction (on by default) ran after every physical prune and is in both reports. (It need not
    # change a layer: cyclical's last mask already zeroed what the prune removes.)
    assert all(e.reconstruction is not None and e.reconstruction.layers for e in result.schedule.events)
    assert [e["accuracy_reconstructed"] for e in report["schedule"]["events"]] == [
        e.accuracy_reconstructed for e in result.schedule.events]
    assert report["accuracy"]["pruned_reconstructed"] == result.schedule.events[-1].accuracy_reconstructed
    assert report["accuracy"]["pruned_reconstructed"] is not None
    assert "after reconstruction" in (result.out_dir / "report.md").read_text()


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_prunes_at_once_without_fine_tuning(name, make_config):
    result = compress(make_config(schedule=name, epochs=0))

    assert result.prune.achieved_ratio <= 0.5 and result.finetune is None
    assert [e.step for e in result.schedule.events] == [0]


def test_gradual_prunes_in_steps_along_a_cubic_ramp(make_config):
    result = compress(make_config(schedule="gradual", prune_steps=3, epochs=4, batch_size=8))

    ratios = [e.flops_ratio for e in result.schedule.events]
    assert len(ratios) == 3 and ratios == sorted(ratios, reverse=True) and ratios[-1] <= 0.5
    steps = [e.step for e in result.schedule.events]
    assert steps[0] == 0 and steps[-1] <= 0.3 * result.finetune.steps
    assert [r["flops_ratio"] for r in result.schedule.details["ramp"]] == pytest.approx(
        [cubic_ramp(j / 3, 0.5) for j in (1, 2, 3)])


def test_the_per_group_cap_counts_from_the_original_widths_across_gradual_steps(make_config):
    result = compress(make_config(schedule="gradual", prune_steps=4, epochs=2, batch_size=8, target_flops=0.3,
                                  max_prune_per_group=0.5, round_to=1))

    for layer in result.prune.layers:
        assert layer.after >= layer.before * 0.5, layer


def test_a_target_out_of_reach_fails_before_any_training(make_config, monkeypatch):
    trained = []
    monkeypatch.setattr("compressor.finetune.Cycle.run", lambda *a, **k: trained.append(1))
    with pytest.raises(TargetUnreachableError, match="smallest reachable ratio"):
        compress(make_config(schedule="cyclical", target_flops=0.01))
    assert not trained


# -- soft masks -------------------------------------------------------------------------------------------


@pytest.fixture
def coupling() -> graph.CouplingGraph:
    return graph.trace(tiny_resnet20(), torch.randn(1, 1, IMAGE_SIZE, IMAGE_SIZE))


def _widest_coupled_group(coupling):
    return max(coupling.groups, key=lambda s: len(s.layers))


def test_a_mask_zeroes_exactly_the_channels_of_a_group_in_every_coupled_layer(coupling):
    spec = _widest_coupled_group(coupling)
    units = (1, 4, 5)
    before = {n: p.detach().clone() for n, p in coupling.model.named_parameters()}
    names = {p: n for n, p in coupling.model.named_parameters()}
    mask = ChannelMask(coupling, pruning.PruningPlan({spec.index: units}))
    mask.zero()

    expected: dict[str, torch.Tensor] = {}
    for item in coupling.tp_group(spec, spec.expand(units)):
        m, idxs = item.dep.target.module, list(item.idxs)
        out = coupling.dg.is_out_channel_pruning_fn(item.dep.handler)
        for pname, p in m.named_parameters(recurse=False):
            zero = expected.setdefault(names[p], torch.zeros_like(p, dtype=torch.bool))
            if isinstance(m, nn.Conv2d) and not out and pname == "weight":
                zero[:, idxs] = True
            elif not (isinstance(m, nn.Linear) and not out and pname == "bias"):
                zero[idxs] = True
    assert len(expected) >= 2 * 3  # producers, batch norms and consumers across the residual stream
    for n, p in coupling.model.named_parameters():
        zero = expected.get(n, torch.zeros_like(p, dtype=torch.bool))
        assert torch.all(p[zero] == 0), n
        assert torch.equal(p[~zero], before[n][~zero]), n

    mask.release()
    for n, p in coupling.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_the_masked_model_computes_what_the_physically_pruned_model_computes(coupling):
    x = torch.randn(8, 1, IMAGE_SIZE, IMAGE_SIZE)
    scores = [torch.rand(s.units, generator=torch.Generator().manual_seed(s.index)) for s in coupling.groups]
    _, result = pruning.search(coupling, scores, target_ratio=0.5, max_prune_fraction=0.75, round_to=1)
    ChannelMask(coupling, result.plan).zero()

    pruned = pruning.pruned_copy(coupling, result.plan)

    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), coupling.model.eval()(x), atol=1e-5, rtol=1e-4)


def test_a_released_mask_restores_the_batch_norm_statistics_its_channels_drifted(coupling):
    spec = _widest_coupled_group(coupling)
    stats = {n: b.clone() for n, b in coupling.model.named_buffers()}
    mask = ChannelMask(coupling, pruning.PruningPlan({spec.index: (0, 2)}))
    mask.zero()
    coupling.model.train()
    with torch.no_grad():
        coupling.model(torch.randn(4, 1, IMAGE_SIZE, IMAGE_SIZE))  # masked channels' statistics move to 0
    mask.release()
    for item in coupling.tp_group(spec, spec.expand((0, 2))):
        m = item.dep.target.module
        if isinstance(m, nn.BatchNorm2d):
            name = next(n for n, mod in coupling.model.named_modules() if mod is m)
            assert torch.equal(m.running_var[[0, 2]], stats[f"{name}.running_var"][[0, 2]])


def test_scaling_a_mask_shrinks_only_its_slices(coupling):
    spec = _widest_coupled_group(coupling)
    before = {n: p.detach().clone() for n, p in coupling.model.named_parameters()}
    mask = ChannelMask(coupling, pruning.PruningPlan({spec.index: (3,)}), restorable=False)
    mask.scale(0.5)
    changed = {n for n, p in coupling.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.split(".")[-1] in ("weight", "bias") for n in changed)
    for n, p in coupling.model.named_parameters():
        torch.testing.assert_close(p[p != before[n]], before[n][p != before[n]] * 0.5)
    with pytest.raises(RuntimeError, match="restorable"):
        mask.release()


def test_the_cyclical_schedule_prunes_exactly_its_last_mask(make_config, monkeypatch):
    seen = []
    original = schedules.Run.prune

    def checked(run, pruned, *, reason):
        x = run.data.val_x[:16]
        with torch.no_grad():
            seen.append((run.model.eval()(x), pruned.eval()(x)))
        return original(run, pruned, reason=reason)

    monkeypatch.setattr(schedules.Run, "prune", checked)
    result = compress(make_config(schedule="cyclical", epochs=4, batch_size=8, cycles=2))

    (masked, pruned), = seen
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-4)
    assert result.schedule.details["kept_set_change"][0]["cycles"] == "1->2"
    assert 0 <= result.schedule.details["kept_set_change"][0]["jaccard"] <= 1


def test_cyclical_masks_are_released_at_each_cycle_start():
    class FakeRun:
        target, step, total_steps = 0.5, 0, 40
        progress = type("P", (), {"note": lambda self, msg: None})()

        def plan(self, ratio, quiet=False):
            planned.append((self.step, ratio))
            return None

    planned = []
    schedule, run = Cyclical(cycles=2, span=1.0, check_every=5), FakeRun()
    schedule.begin(run)
    for step in range(1, 20):
        run.step = step
        schedule._update(run)
    # 20-step cycles, ramp over the first 10 steps: plans at 5 and 10 ramp down; 15 holds the target
    assert [s for s, _ in planned] == [5, 10, 15]
    assert planned[0][1] == pytest.approx(cubic_ramp(0.5, 0.5)) and planned[1][1] == pytest.approx(0.5)


# -- OCSPruner's stability ---------------------------------------------------------------------------------


def test_jaccard_is_the_mean_over_groups_of_intersection_over_union():
    a = {"g1": frozenset({0, 1, 2, 3}), "g2": frozenset({0, 1})}
    b = {"g1": frozenset({0, 1, 2, 4}), "g2": frozenset({0, 1})}
    assert jaccard(a, b) == pytest.approx((3 / 5 + 1) / 2)
    assert jaccard(a, a) == 1.0


def test_ocs_records_its_stability_curve_and_when_it_pruned(make_config):
    result = compress(make_config(schedule="ocs", epochs=4, batch_size=8, check_every=1, schedule_span=0.5))

    d = result.schedule.details
    assert d["pruned_because"] in ("stable", "cap")
    assert d["pruned_at_step"] == result.schedule.events[-1].step <= 0.5 * result.finetune.steps + 1
    assert [p["step"] for p in d["stability"]] == list(range(0, d["pruned_at_step"] + 1))
    assert all(0 <= p["jaccard"] <= 1 for p in d["stability"] if "jaccard" in p)
    if d["pruned_because"] == "stable":
        assert d["stability"][-1]["jaccard_avg"] >= 0.999


def test_ocs_prunes_at_the_cap_when_the_sub_network_never_settles(make_config):
    result = compress(make_config(schedule="ocs", epochs=4, batch_size=8, check_every=1, schedule_span=0.5,
                                  stability_threshold=1.0, criterion="random"))
    assert result.schedule.details["pruned_because"] == "cap"


# -- the learning-rate cycle -----------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [2, 3, 4, 6, 101])
def test_the_cycle_is_torchs_one_cycle_lr(total):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=total, pct_start=0.2)
    for step in range(total):
        lr, momentum = one_cycle(step, total, 0.02)
        assert lr == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        assert momentum == pytest.approx(opt.param_groups[0]["momentum"], abs=1e-12)
        opt.step()
        if step < total - 1:
            sched.step()


def test_a_physical_prune_mid_cycle_keeps_the_learning_rate_schedule(data_path):
    from compressor.finetune import Cycle

    data = load_data(data_path, val_fraction=0.2, seed=0)
    settings = FinetuneSettings(epochs=2, batch_size=8, lr=0.02, optimizer="sgd", weight_decay=0.0, distill=False,
                                temperature=4.0, alpha=0.0, seed=0)
    cycle = Cycle(tiny_resnet20(), data, settings, device=torch.device("cpu"))
    lrs = []

    def hook(c):
        lrs.append(c.optimizer.param_groups[0]["lr"])
        if c.step == 3:
            c.replace_model(tiny_resnet20(seed=1))

    cycle.run(hook)
    assert lrs == pytest.approx([one_cycle(s, cycle.total_steps, 0.02)[0] for s in range(cycle.total_steps)])


# -- the plug-in contract ------------------------------------------------------------------------------------


class DoesNothing(schedules.BaseSchedule):
    """A broken plug-in: never prunes."""


def test_a_schedule_that_never_reaches_the_target_is_an_error(make_config):
    with pytest.raises(GraphError, match="must prune to the target"):
        compress(make_config(schedule="test_schedules:DoesNothing"))


class EveryOtherStep(schedules.BaseSchedule):
    """A third-party schedule: halves the distance to the target every other step."""

    def after_step(self, run):
        if run.step % 2 == 0 and not run.at_target():
            run.prune_to(max(run.target, run.flops_ratio() - 0.2), reason="third party")

    def end(self, run):
        if not run.at_target():
            run.prune_to(run.target, reason="third party, at the end")


def test_a_schedule_from_an_import_path_goes_through_the_same_door(make_config):
    result = compress(make_config(schedule="test_schedules:EveryOtherStep", epochs=3, batch_size=8))
    assert result.prune.achieved_ratio <= 0.5
    assert {e.reason for e in result.schedule.events} <= {"third party", "third party, at the end"}


def test_an_unknown_schedule_is_a_config_error_naming_the_registered_ones(make_config):
    with pytest.raises(ConfigError, match="unknown schedule 'nope'; available: .*oneshot"):
        compress(make_config(schedule="nope"))


def test_the_cli_takes_a_schedule_and_rejects_an_unknown_one(model_path, data_path, tmp_path):
    args = [str(model_path), "--arch", "resnet20", "--data", str(data_path), "--target-flops", "0.5",
            "--epochs", "1", "--latency-runs", "2", "--out", str(tmp_path / "o")]
    bad = CliRunner().invoke(compress_app, args + ["--schedule", "nope"])
    assert bad.exit_code == 2 and "unknown schedule 'nope'" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "o").exists()

    ok = CliRunner().invoke(compress_app, args + ["--schedule", "gradual", "--prune-steps", "2"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "o" / "report.json").read_text())["schedule"]["name"] == "gradual"


@pytest.mark.parametrize(("field", "value", "match"), [
    ("schedule_span", 0.0, "--schedule-span"), ("prune_steps", 0, "--prune-steps"), ("check_every", 0, "--check-every"),
    ("stability_threshold", 1.5, "--stability-threshold"), ("ocs_decay", -1.0, "--ocs-decay"), ("cycles", 0, "--cycles"),
    ("trace_timeout", -1.0, "--trace-timeout"), ("trace_memory", -1.0, "--trace-memory"),
    ("trace_memory", float("nan"), "--trace-memory"),
])
def test_schedule_options_are_validated(make_config, field, value, match):
    with pytest.raises(ConfigError, match=match):
        make_config(**{field: value})


def test_the_toolbox_lists_the_schedules():
    from compressor.cli.toolbox import app as toolbox

    result = CliRunner().invoke(toolbox, ["schedules"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ("oneshot", "gradual", "ocs", "cyclical"):
        assert name in result.output

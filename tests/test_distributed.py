"""Data-parallel fine-tuning (``--nproc-per-node``): two gloo processes against one, and a dead rank."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compressor import compress
from compressor.distributed import DIE_ENV, RankFailedError, prepare_model
from compressor.errors import ConfigError, TrainingError
from compressor.report import to_dict
from compressor.schedules import BaseSchedule


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k not in ("latency", "stage_seconds"):
            out |= _keys(v, prefix + k + ".")
    return out


@pytest.mark.slow
def test_two_gloo_processes_match_one(make_config, tmp_path):
    one = compress(make_config(epochs=2, out_dir=tmp_path / "one"))
    two = compress(make_config(epochs=2, out_dir=tmp_path / "two", nproc_per_node=2))
    # Rank 0 alone searched; the structure is the one process's, channel for channel.
    assert [(l.group, l.after) for l in two.prune.layers] == [(l.group, l.after) for l in one.prune.layers]
    assert two.prune.pruned.macs == one.prune.pruned.macs
    # The tiny validation split holds a dozen images: "within 1 point" can only mean "within one image" here
    # (two shards see the batches in another order, so the weights are not bitwise those of one process).
    one_image = 1 / one.data.val_size
    assert abs(two.accuracy_compressed - one.accuracy_compressed) <= max(0.01, one_image) + 1e-6
    assert one.finetune.processes == 1 and two.finetune.processes == 2
    # The learning-rate cycle saw the global batch: as many steps as one process.
    assert two.finetune.steps == one.finetune.steps
    r1, r2 = to_dict(one), to_dict(two)
    assert _keys(r1) == _keys(r2)
    assert r2["finetune"]["processes"] == 2
    on_disk = json.loads((tmp_path / "two" / "report.json").read_text())
    assert on_disk["finetune"]["processes"] == 2
    assert (tmp_path / "two" / "model.onnx").exists()


@pytest.mark.slow
def test_a_dead_rank_ends_the_run_naming_it_and_writes_nothing(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv(DIE_ENV, "1:2")
    out = tmp_path / "dead"
    with pytest.raises(RankFailedError) as info:
        compress(make_config(epochs=2, out_dir=out, nproc_per_node=2))
    message = info.value.message
    assert "rank 1 of 2 died" in message and "exit code 3" in message
    assert "\n" not in message
    assert not out.exists()


def test_cpu_keeps_plain_batch_norm_cuda_syncs_it():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    cpu, synced = prepare_model(model, "cpu")
    assert not synced and isinstance(cpu[1], nn.BatchNorm2d) and not isinstance(cpu[1], nn.SyncBatchNorm)
    cuda, synced = prepare_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), "cuda")
    assert synced and isinstance(cuda[1], nn.SyncBatchNorm)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gradual", "ocs", "cyclical"])
def test_schedules_acting_between_steps_run_on_every_rank_alike(schedule, make_config, tmp_path):
    # Rank 0 alone plans, masks and prunes; the other rank follows after every step. Had it not (a prune it
    # never received, a mask it never applied), the ranks' weights would end apart and the run would fail.
    one = compress(make_config(epochs=2, schedule=schedule, out_dir=tmp_path / "one"))
    two = compress(make_config(epochs=2, schedule=schedule, out_dir=tmp_path / "two", nproc_per_node=2))
    assert two.finetune.processes == 2 and two.finetune.steps == one.finetune.steps
    assert [e.step for e in two.schedule.events] == [e.step for e in one.schedule.events]
    assert two.prune.achieved_ratio <= 0.5
    assert _keys(to_dict(one)) == _keys(to_dict(two))
    assert (tmp_path / "two" / "model.onnx").exists()


class _Sneaky(BaseSchedule):
    """Prunes before training, then changes weights behind torch's back (through ``.data``) on rank 0."""

    def begin(self, run):
        run.prune_to(run.target, reason="before fine-tuning")

    def after_step(self, run):
        if run.step == 2:
            next(run.model.parameters()).data.mul_(0.5)


def test_ranks_that_end_apart_fail_the_run(make_config, tmp_path):
    out = tmp_path / "apart"
    with pytest.raises(TrainingError, match="rank 1 had weights other than rank 0's at the end of fine-tuning") as info:
        compress(make_config(epochs=1, schedule=f"{__name__}:_Sneaky", out_dir=out, nproc_per_node=2))
    assert "\n" not in info.value.message
    assert not out.exists()


def test_option_checks(make_config):
    with pytest.raises(ConfigError, match="--nproc-per-node must be at least 1"):
        make_config(nproc_per_node=0)
    with pytest.raises(ConfigError, match="global batch"):
        make_config(nproc_per_node=4, batch_size=2)


def test_the_weight_fingerprint_tells_rounding_from_a_change():
    from compressor.distributed import _fingerprint, _same

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    before = _fingerprint(model)
    with torch.no_grad():
        model[0].weight.mul_(1 + 1e-9)  # a rounding difference: still the same weights
    assert _same(before, _fingerprint(model))
    with torch.no_grad():
        model[1].bias[0] += 1e-3  # one entry moved
    assert not _same(before, _fingerprint(model))
    assert not _same(before, _fingerprint(nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))))  # another structure

"""Data-parallel fine-tuning (``--nproc-per-node``): two gloo processes against one, and a dead rank."""

from __future__ import annotations

import json

import pytest
from torch import nn

from compressor import compress
from compressor.distributed import DIE_ENV, RankFailedError, prepare_model
from compressor.errors import ConfigError
from compressor.report import to_dict


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


def test_schedules_acting_between_steps_are_refused_before_any_work(make_config):
    with pytest.raises(ConfigError, match="--schedule gradual acts between steps"):
        compress(make_config(nproc_per_node=2, schedule="gradual"))


def test_option_checks(make_config):
    with pytest.raises(ConfigError, match="--nproc-per-node must be at least 1"):
        make_config(nproc_per_node=0)
    with pytest.raises(ConfigError, match="global batch"):
        make_config(nproc_per_node=4, batch_size=2)

"""``CompressConfig``: frozen, validated up front with messages that name the flag; and the library
raising typed errors (never exiting) when ``compress()`` is called directly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from compressor import compress
from compressor.errors import ConfigError, OutputExistsError, TargetUnreachableError


def test_fast_defaults_are_valid(make_config):
    config = make_config()
    assert config.epochs == 1 and config.latency_runs == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("target_flops", 0, "--target-flops"),
    ("target_flops", 1, "--target-flops"),
    ("target_flops", 1.5, "--target-flops"),
    ("target_flops", float("nan"), "--target-flops"),
    ("target_flops", "0.5", "--target-flops"),
    ("max_prune_per_group", 1.0, "--max-prune-per-group"),
    ("epochs", -1, "--epochs"),
    ("batch_size", 0, "--batch-size"),
    ("lr", 0.0, "--lr"),
    ("lr", float("inf"), "--lr"),
    ("optimizer", "adam", "--optimizer"),
    ("device", "tpu", "--device"),
    ("val_fraction", 0.0, "--val-fraction"),
    ("distill_alpha", 1.5, "--distill-alpha"),
    ("distill_temperature", 0.0, "--distill-temperature"),
    ("mean", (0.5,), "--mean and --std"),
    ("latency_runs", 0, "--latency-runs"),
    ("calibration_batches", 0, "--calibration-batches"),
    ("crop_pct", 1.5, "--crop-pct"),
    ("crop_pct", float("nan"), "--crop-pct"),
    ("interpolation", "cubic", "--interpolation"),
    ("augment", "heavy", "--augment"),
    ("workers", -1, "--workers"),
    ("workers", 10**6, "--workers"),
    ("input_size", (0, 4), "--input-size"),
    ("input_size", (4, 4, 4), "--input-size"),
])
def test_invalid_values_name_their_flag(make_config, field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        make_config(**{field: value})


def test_nan_distill_temperature_is_rejected(make_config):
    with pytest.raises(ConfigError, match="--distill-temperature"):
        make_config(distill_temperature=float("nan"))


def test_output_dir_and_learning_rate_defaults(make_config, model_path):
    assert make_config(out_dir=None).output_dir == Path("runs") / model_path.stem
    assert make_config().peak_lr == 0.005
    assert make_config(optimizer="adamw").peak_lr == 1e-3
    assert make_config(lr=0.05).peak_lr == 0.05


def test_library_raises_typed_errors_and_writes_nothing(make_config, tmp_path):
    config = make_config(target_flops=0.01)
    with pytest.raises(TargetUnreachableError, match="smallest reachable ratio"):
        compress(config)
    assert not config.output_dir.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_existing_output_is_refused_before_any_work(make_config, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # The data path does not exist: the output check must come first, so this is what is reported.
    config = make_config(out_dir=out, data_path=tmp_path / "absent.npz")
    with pytest.raises(OutputExistsError, match="already exists"):
        compress(config)

"""The CUDA path: AMP fine-tuning and onnxruntime's CUDA execution provider. Skipped without a GPU;
the CPU-side decisions (which providers are asked for) are tested everywhere."""

from __future__ import annotations

import pytest
import torch

from compressor import compress, finetune as ft, validate
from compressor.errors import ConfigError

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no usable CUDA GPU")


def test_cpu_device_asks_only_for_the_cpu_provider():
    assert validate.providers_for("cpu") == ["CPUExecutionProvider"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_auto_falls_back_to_the_cpu():
    assert validate.providers_for("auto") == ["CPUExecutionProvider"]
    assert ft.resolve_device("auto").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_device_cuda_is_a_clear_error(make_config):
    with pytest.raises(ConfigError, match="--device cuda"):
        compress(make_config(device="cuda"))


@needs_gpu
def test_gpu_run_uses_amp_and_the_cuda_provider(make_config):
    result = compress(make_config(device="cuda"))
    assert result.finetune is not None and result.finetune.amp in ("bfloat16", "float16")
    assert result.validation.provider == "CUDAExecutionProvider"
    assert result.validation.parity.max_abs_diff < 1e-3  # cuDNN kernels differ from the CPU reference
    assert result.validation.parity.top1_agreement >= 0.99


@needs_gpu
@pytest.mark.parametrize("schedule", ["gradual", "ocs", "cyclical"])
def test_every_schedule_trains_and_prunes_on_the_gpu(make_config, schedule):
    # Masks, decay, calibration and batch-norm recalibration all act on the model where it trains.
    result = compress(make_config(device="cuda", schedule=schedule, criterion="taylor", epochs=3, batch_size=8))
    assert result.prune.achieved_ratio <= 0.5
    assert result.validation.parity.top1_agreement >= 0.99

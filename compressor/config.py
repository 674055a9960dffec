"""The configuration of one ``compress`` run: frozen, validated, each field documented."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


ATTENTION_PRUNING = ("dims", "heads")
"""How attention groups are pruned: head dimensions alike in every head, or whole heads."""


def check_attention_pruning(value: str) -> None:
    """Check ``--attention`` (``compress``, ``inspect`` and the graph's tracing all take it)."""
    if value not in ATTENTION_PRUNING:
        raise ConfigError(f"--attention must be dims or heads, got {value!r}",
                          hint="dims prunes head dimensions alike in every head; heads removes whole heads")


SEED_RANGE = (0, 2**32 - 1)
"""Seeds every generator involved (torch, numpy, CUDA) accepts."""

MAX_INPUT_ELEMENTS = 1 << 28
"""The most values one example input may hold (``--input-shape``): 1 GB of float32."""


DEFAULT_CAP = 0.75
"""The per-group cap without ``--max-prune-per-group``: at most three quarters of a group's channels go
(raised along ``pruning.AUTO_CAPS`` only where the FLOPs target needs it)."""


def check_max_prune_per_group(value: float | None) -> None:
    """Check ``--max-prune-per-group`` (``compress`` and ``inspect`` both take it; None: the default)."""
    if value is not None and not (math.isfinite(value) and 0 < value < 1):
        raise ConfigError(f"--max-prune-per-group must lie strictly between 0 and 1, got {value}",
                          hint="0.75 lets at most three quarters of any group's channels go")


def check_seed(value: int) -> None:
    """Check ``--seed``."""
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise ConfigError(f"--seed must be a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {value}")


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """Read ``--input-shape C,H,W``: three positive integers, together no more than ``MAX_INPUT_ELEMENTS`` values."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--input-shape takes C,H,W, got {text!r}", hint="e.g. --input-shape 3,32,32") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape takes three positive integers C,H,W, got {text!r}")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ConfigError(f"--input-shape {text} holds {math.prod(shape):.3g} values; at most {MAX_INPUT_ELEMENTS} "
                          "(1 GB of float32) are accepted")
    return shape  # type: ignore[return-value]


def check_trace_budgets(trace_timeout: float, trace_memory: float | None) -> None:
    """Check ``--trace-timeout`` and ``--trace-memory`` (``compress`` and ``inspect`` both take them)."""
    if not (math.isfinite(trace_timeout) and trace_timeout >= 0):
        raise ConfigError(f"--trace-timeout must be 0 (no limit) or a number of seconds, got {trace_timeout}")
    if trace_memory is not None and not (math.isfinite(trace_memory) and trace_memory >= 0):
        raise ConfigError(f"--trace-memory must be 0 (no limit) or a number of GB, got {trace_memory}")


@dataclass(frozen=True)
class CompressConfig:
    model_path: Path
    """The trained model: a state dict (with ``arch``) or a pickled module (with ``trust_pickle``)."""
    data_path: Path
    """Labelled images for fine-tuning and validation (.npz, .pt dict, or image folder)."""
    target_flops: float | None = None
    """Fraction of the original MACs to keep, 0 < x < 1 (optional with ``target_latency``)."""
    target_latency: float | None = None
    """Fraction of the original's onnxruntime latency to reach, 0 < x < 1, measured on the run's EP."""
    latency_batch: int = 1
    """Batch size at which ``target_latency`` is measured."""
    arch: str | None = None
    """Architecture of a state dict: a name from ``compressor.models`` or ``package.module:factory``."""
    trust_pickle: bool = False
    """Allow loading a whole pickled module (it can run arbitrary code)."""
    criterion: str = "l2"
    """Registered criterion name or ``package.module:Class``."""
    schedule: str = "oneshot"
    """When channels go within the cycle: a registered schedule (oneshot, gradual, ocs, cyclical) or
    ``package.module:Class``."""
    schedule_span: float | None = None
    """Share of the cycle the schedule acts in (default: the schedule's own, 0.3 for gradual and ocs,
    0.6 for cyclical)."""
    prune_steps: int = 4
    """``gradual``: physical pruning steps along the ramp."""
    check_every: int | None = None
    """``ocs``, ``cyclical``: steps between two searches of the sub-network (default: the schedule's own)."""
    stability_threshold: float = 0.999
    """``ocs``: prune once the mean Jaccard similarity of the kept channel sets reaches this."""
    ocs_decay: float = 1.0
    """``ocs``: start of lambda in the ``(1 - lambda * lr)`` decay of the channels about to be pruned
    (lambda grows by this much per epoch)."""
    cycles: int = 3
    """``cyclical``: mask cycles before the physical prune."""
    from_scratch: bool = False
    """Re-initialise the model's weights before the schedule (OCSPruner's own setting: train from scratch;
    give it many more epochs)."""
    max_prune_per_group: float | None = None
    """At most this fraction of any group's channels is removed. None: 0.75, raised step by step up to
    0.9 only where the FLOPs target needs it (``pruning.AUTO_CAPS``; the report says so)."""
    round_to: int | None = None
    """Kept channel counts are multiples of this (1 disables; default: per execution provider, ``latency.DEFAULT_ROUND_TO``)."""
    attention_pruning: str = "dims"
    """``dims``: prune head dimensions alike in every head; ``heads``: prune whole heads (``head_dim`` kept)."""
    epochs: int = 5
    """Fine-tuning epochs (one OneCycleLR cycle over all of them); 0 skips fine-tuning."""
    batch_size: int = 32
    """Fine-tuning batch size."""
    lr: float | None = None
    """Peak learning rate of the cycle (default: 0.005 for SGD, 0.001 for AdamW; BENCHMARKS.md, "Each piece on its own")."""
    optimizer: str = "sgd"
    """``sgd`` (momentum 0.9, Nesterov) or ``adamw``."""
    weight_decay: float = 5e-4
    """Weight decay on weights (not on norms and biases)."""
    bn_recalibration: bool = True
    """Re-estimate batch-norm statistics on the fine-tuning data right after pruning."""
    reconstruct: bool = True
    """Re-fit the layers after each physical prune so they give their pre-prune outputs (``compressor.reconstruct``)."""
    distill: bool = True
    """Add distillation from the original model's logits to the fine-tuning loss."""
    distill_temperature: float = 4.0
    """Softmax temperature of the distillation term."""
    distill_alpha: float = 0.7
    """Weight of the distillation term (cross-entropy gets 1 - alpha)."""
    distill_features: bool = False
    """Also match the original model's outputs at the pruned layers, on their kept channels
    (``finetune.FEATURE_WEIGHT``); off by default: see BENCHMARKS.md for what it bought."""
    calibration_batches: int = 8
    """Batches of fine-tuning data fed to criteria that need gradients."""
    val_fraction: float = 0.2
    """Share of the data held out (stratified, seeded) for validation."""
    seed: int = 0
    """Seed of the split, the fine-tuning order and the initialisation of randomness."""
    mean: tuple[float, ...] | None = None
    """Per-channel normalisation mean in [0, 1] pixel units (default: computed on the data)."""
    std: tuple[float, ...] | None = None
    """Per-channel normalisation std (default: computed on the data)."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``: fine-tuning device and onnxruntime execution provider."""
    out_dir: Path | None = None
    """Where the outputs go (default ``runs/<model stem>``)."""
    overwrite: bool = False
    """Replace an existing output directory."""
    trace_timeout: float = 600.0
    """Seconds torch-pruning's tracing of the model may take before the run stops with an error (0: no limit)."""
    trace_memory: float | None = None
    """GB (2**30 bytes) of resident memory the process may reach while tracing before the run stops with
    an error (0: no limit; default: what it holds when tracing starts plus 90% of the memory available)."""
    latency_runs: int = 30
    """Timed runs per model at batch 1 (a third of that, at least 5, at batch 64)."""
    parity_tolerance: float | None = None
    """Largest ONNX-vs-PyTorch logit difference accepted, relative to the largest logit (None: the provider's default)."""
    nproc_per_node: int = 1
    """Processes that run the fine-tuning cycle data-parallel (DDP: gloo on the CPU, NCCL on CUDA, one GPU
    each); ``batch_size`` stays the global batch. See ``compressor.distributed``."""
    # -- the plug-ins' own options (compressor.options): validated by the plug-in they are for
    schedule_options: Mapping[str, Any] = field(default_factory=dict)
    """The schedule's options, KEY -> VALUE (``--schedule-opt``; ``compressor schedules`` lists them).
    ``prune_steps``, ``schedule_span``, ``check_every``, ``stability_threshold``, ``ocs_decay`` and
    ``cycles`` are shorthands for the built-in schedules' options."""
    criterion_options: Mapping[str, Any] = field(default_factory=dict)
    """The criterion's options, KEY -> VALUE (``--criterion-opt``; ``compressor criteria`` lists them)."""

    # -- reading the data at the model's resolution (compressor.data, compressor.preprocess) --
    val_data: Path | None = None
    """A separate validation set (same form as ``data_path``) instead of the seeded split."""
    input_size: tuple[int, int] | None = None
    """(H, W) images are resized and center-cropped to (default: the model's data config, else the images'
    own size when they all share one)."""
    crop_pct: float | None = None
    """Center-crop fraction: images are resized to ``input_size / crop_pct`` first (default: the model's,
    else 1 for images already at the input size, else 0.875)."""
    interpolation: str | None = None
    """Resize interpolation: bilinear, bicubic or nearest (default: the model's, else bilinear)."""
    augment: str | None = None
    """Fine-tuning augmentation: none (default: measured to pay on no short budget), light or strong."""
    workers: int | None = None
    """DataLoader worker processes for lazily read data (default: CPU count - 1, at most 8; 0 reads in-process)."""

    def __post_init__(self) -> None:
        if self.target_flops is None and self.target_latency is None:
            raise ConfigError("give --target-flops, --target-latency or both",
                              hint="--target-flops 0.5 keeps half of the original FLOPs; --target-latency 0.5 "
                                   "halves the measured onnxruntime latency")
        for flag, value in (("--target-flops", self.target_flops), ("--target-latency", self.target_latency)):
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < 1):
                raise ConfigError(f"{flag} must lie strictly between 0 and 1, got {value}",
                                  hint="0.5 keeps half of the original FLOPs" if flag == "--target-flops"
                                  else "0.5 asks for half of the original's measured latency")
        if self.latency_batch < 1:
            raise ConfigError(f"--latency-batch must be at least 1, got {self.latency_batch}")
        check_max_prune_per_group(self.max_prune_per_group)
        if self.round_to is not None and self.round_to < 1:
            raise ConfigError(f"--round-to must be at least 1, got {self.round_to}")
        check_attention_pruning(self.attention_pruning)
        if self.epochs < 0:
            raise ConfigError(f"--epochs must be 0 or more, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must lie strictly between 0 and 1, got {self.val_fraction}")
        if not 0 <= self.distill_alpha <= 1:
            raise ConfigError(f"--distill-alpha must lie in [0, 1], got {self.distill_alpha}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise ConfigError(f"--distill-temperature must be positive, got {self.distill_temperature}")
        check_seed(self.seed)
        if (self.mean is None) != (self.std is None):
            raise ConfigError("--mean and --std must be given together")
        check_trace_budgets(self.trace_timeout, self.trace_memory)
        if self.parity_tolerance is not None and not self.parity_tolerance > 0:
            raise ConfigError(f"--parity-tolerance must be a positive number, got {self.parity_tolerance}")
        if self.latency_runs < 1:
            raise ConfigError(f"--latency-runs must be at least 1, got {self.latency_runs}")
        if self.schedule_span is not None and not 0 < self.schedule_span <= 1:
            raise ConfigError(f"--schedule-span must lie in (0, 1], got {self.schedule_span}")
        if self.prune_steps < 1:
            raise ConfigError(f"--prune-steps must be at least 1, got {self.prune_steps}")
        if self.check_every is not None and self.check_every < 1:
            raise ConfigError(f"--check-every must be at least 1, got {self.check_every}")
        if not 0 < self.stability_threshold <= 1:
            raise ConfigError(f"--stability-threshold must lie in (0, 1], got {self.stability_threshold}")
        if not (math.isfinite(self.ocs_decay) and self.ocs_decay >= 0):
            raise ConfigError(f"--ocs-decay must be 0 or more, got {self.ocs_decay}")
        if self.cycles < 1:
            raise ConfigError(f"--cycles must be at least 1, got {self.cycles}")
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if self.batch_size < self.nproc_per_node:
            raise ConfigError(f"--batch-size {self.batch_size} is the global batch: it must be at least "
                              f"--nproc-per-node {self.nproc_per_node}")
        if self.distill_features and self.nproc_per_node > 1:
            raise ConfigError("--distill-features runs in one process for now; drop it or --nproc-per-node")
        if self.calibration_batches < 1:
            raise ConfigError(f"--calibration-batches must be at least 1, got {self.calibration_batches}")
        from .preprocess import check_options

        check_options(crop_pct=self.crop_pct, interpolation=self.interpolation, augment=self.augment or "none")
        if self.workers is not None and not 0 <= self.workers <= 64:
            raise ConfigError(f"--workers must be a whole number from 0 to 64, got {self.workers}")
        if self.input_size is not None:
            # the service's JSON gives a list, or one number for a square
            size = (self.input_size,) * 2 if isinstance(self.input_size, int) else tuple(self.input_size)
            if len(size) != 2 or not all(isinstance(v, int) and v >= 1 for v in size):
                raise ConfigError(f"--input-size takes H or H,W (positive whole numbers), got {self.input_size}")
            object.__setattr__(self, "input_size", size)
        self._check_plugin_options()

    def _check_plugin_options(self) -> None:
        """The plug-ins validate their own options, here where any are given (it imports the plug-in)."""
        for flag, given in (("--schedule-opt", self.schedule_options), ("--criterion-opt", self.criterion_options)):
            if not isinstance(given, Mapping) or not all(isinstance(k, str) for k in given):
                raise ConfigError(f"{flag} options must map names to values, got {given!r}")
        if self.schedule_options:
            from .schedules import schedule_options

            schedule_options(self.schedule, self)
        if self.criterion_options:
            from .criteria import criterion_options

            criterion_options(self.criterion, self.criterion_options)

    @property
    def output_dir(self) -> Path:
        return self.out_dir if self.out_dir is not None else Path("runs") / self.model_path.stem

    @property
    def cap(self) -> float:
        """The per-group cap pruning uses: ``max_prune_per_group``, or :data:`DEFAULT_CAP` (the pipeline
        replaces the field with the cap it resolved, raised or not, before pruning)."""
        return self.max_prune_per_group if self.max_prune_per_group is not None else DEFAULT_CAP

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.005 if self.optimizer == "sgd" else 1e-3

"""``compress()``: the stages in order. Each is a call into the module named after it."""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import (__version__, checkpoint, criteria, distributed, finetune as ft, graph, outputs, profile, pruning, report, schedules,
               validate, watchdog)
from .calibration import activation_stats, calibrate, prepare_criterion  # noqa: F401  (public here too)
from .config import CompressConfig
from .data import LoadedData, prepare_data, scan_data
from .errors import ConfigError, DataError, one_line
from .export import ExportResult, export_onnx
from .loading import LoadedModel, load_model
from .preflight import Inspection, check_prunable, describe, summary
from .resolve import Resolved, resolve
from .events import CancelToken, EventStream
from .progress import Progress


class _Clock:
    """Stage timings, booked where the work happens (see :meth:`book`)."""

    def __init__(self, events: EventStream) -> None:
        self.seconds: dict[str, float] = {}
        self.events = events

    @contextmanager
    def stage(self, name: str):
        self.events.stage_started(name)
        yield
        self.seconds[name] = self.events.stage_finished(name)

    def book(self, seconds: float, *, from_stage: str, to_stage: str) -> None:
        """Move ``seconds`` of work done inside ``from_stage`` to the stage it belongs to."""
        moved = min(round(seconds, 3), self.seconds.get(from_stage, 0.0))
        self.seconds[from_stage] = round(self.seconds.get(from_stage, 0.0) - moved, 3)
        self.seconds[to_stage] = round(self.seconds.get(to_stage, 0.0) + moved, 3)


@dataclass(frozen=True)
class Loaded:
    """The load stage's result."""

    data: LoadedData
    model: LoadedModel
    classes: int
    criterion: criteria.Criterion
    schedule: schedules.Schedule


@dataclass(frozen=True)
class Traced:
    """The trace stage's result: the run's one coupling graph of the original model."""

    graph: graph.CouplingGraph
    preflight: Inspection


@dataclass(frozen=True)
class Exported:
    compressed: ExportResult
    original: ExportResult


def check_fit(model: nn.Module, data: LoadedData) -> int:
    """Run the model on a few images; return its class count or say why the data does not fit."""
    try:
        with torch.no_grad():
            out = model.eval()(data.head(2))
    except Exception as exc:
        took = _sizes_taken(model, data.info.input_shape)
        size = data.info.input_shape
        source = dict(data.preprocessing.sources).get("input_size") if data.preprocessing else None
        raise DataError(f"the model fails on the data's images of shape {tuple(size)}"
                        + (" (--input-size)" if source == "given" else "") + f": {one_line(exc, 200)}"
                        + (f"; it runs on {took}" if took else ""),
                        hint="pass an --input-size the model takes" if took else
                        "check the channel count and image size the model expects") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DataError(f"the model's output has shape {tuple(getattr(out, 'shape', ()))}; a classifier giving (batch, classes) logits is expected")
    if not torch.isfinite(out).all():
        raise DataError("the model's outputs on the data's images hold NaN or infinite values",
                        hint="check the model's weights and the data's scale (--mean, --std)")
    classes = int(out.shape[1])
    if data.info.num_classes > classes:
        raise DataError(f"labels go up to {data.info.num_classes - 1} but the model's classifier has {classes} outputs",
                        hint="the data's labels must be class indices 0..classes-1 of the model")
    return classes


def _sizes_taken(model: nn.Module, shape: tuple[int, ...]) -> str:
    """The first of a few common input sizes the model runs on, said as "CxHxW", or ""."""
    from .preprocess import model_config

    cfg = model_config(model).get("input_size")
    candidates = ([tuple(cfg[1:])] if cfg else []) + [(224, 224), (32, 32), (28, 28), (64, 64), (96, 96), (160, 160)]
    for h, w in dict.fromkeys(candidates):
        if (h, w) == tuple(shape[1:]):
            continue
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, shape[0], h, w))
        except Exception:  # this size does not fit either; try the next
            continue
        return f"{shape[0]}x{h}x{w}"
    return ""


def _metadata(config: CompressConfig, resolved: Resolved, result: pruning.PruneResult, data: LoadedData,
              classes: int) -> dict[str, str]:
    return {
        "producer": f"compressor {__version__}",
        "criterion": config.criterion,
        "schedule": config.schedule,
        "attention_pruning": config.attention_pruning,
        "target_flops_ratio": f"{result.target_ratio:g}",
        "achieved_flops_ratio": f"{result.achieved_ratio:.6f}",
        "flops_original": str(result.original.macs),
        "flops_compressed": str(result.pruned.macs),
        "params_original": str(result.original.params),
        "params_compressed": str(result.pruned.params),
        "input_shape": json.dumps([None, *data.info.input_shape]),
        "mean": json.dumps(list(data.info.mean)),
        "std": json.dumps(list(data.info.std)),
        "num_classes": str(classes),
        "class_names": json.dumps(list(data.info.class_names) if data.info.class_names else None),
        "preprocessing": json.dumps(data.info.preprocessing),
        "requested": json.dumps(_requested(config)),
        "resolved": json.dumps(resolved.to_dict()),
    }


def _requested(config: CompressConfig) -> dict[str, Any]:
    """The targets and rounding as the user asked for them."""
    return {"target_flops": config.target_flops, "target_latency": config.target_latency,
            "latency_batch": config.latency_batch, "round_to": config.round_to,
            "max_prune_per_group": config.max_prune_per_group}


def _finetune_settings(config: CompressConfig, data: LoadedData) -> ft.FinetuneSettings:
    # Off unless asked for: at the short budgets this tool is for (a few epochs of a few thousand images),
    # light augmentation cost 0.1-2.8 points on every measured row (BENCHMARKS.md, "Each piece").
    augment = config.augment or "none"
    return ft.FinetuneSettings(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.peak_lr, optimizer=config.optimizer,
        weight_decay=config.weight_decay, distill=config.distill, temperature=config.distill_temperature,
        alpha=config.distill_alpha, seed=config.seed, augment=augment, features=config.distill_features)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch_pruning

    return {"compressor": __version__, "torch": torch.__version__, "torch_pruning": torch_pruning.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def compress(config: CompressConfig, *, progress: Progress | None = None,
             cancel: CancelToken | None = None) -> report.CompressResult:
    """Load, trace, prune to the FLOPs target, fine-tune, export, validate and report.

    ``progress`` is the sink of the run's events (:mod:`compressor.events`); ``cancel`` a
    ``threading.Event`` (or anything with ``is_set()``) that stops the run with ``Cancelled``,
    checked between optimiser steps, search probes, latency candidates and validation batches.
    """
    events = EventStream.wrap(progress, cancel)
    clock = _Clock(events)
    inputs = (config.model_path, config.data_path) + ((config.val_data,) if config.val_data else ())
    outputs.check_output_dir(config.output_dir, overwrite=config.overwrite, inputs=inputs,
                             needed_bytes=outputs.expected_bytes(config.model_path))
    torch.manual_seed(config.seed)
    device = _device(config)
    with clock.stage("load"):
        loaded = _load(config)
        distributed.check(config, device)
    with clock.stage("trace"):
        traced = _trace(config, loaded, events)
    with clock.stage("prune"):
        resolved = resolve(traced.graph, config, criterion=loaded.criterion, data=loaded.data, progress=events,
                           device=device)
        acc_original = ft.accuracy(loaded.model.model, loaded.data)
        run = _run(config, loaded, traced, resolved, device, events, acc_original)
        run.start(loaded.schedule)
    pruning_before = run.prune_seconds
    with clock.stage("fine-tune"):
        scheduled = run.finish(loaded.schedule, config.schedule, train=distributed.trainer(config))
    clock.book(run.prune_seconds - pruning_before, from_stage="fine-tune", to_stage="prune")
    # The pruned model's logits serve twice: its accuracy, and the reference the ONNX export must match.
    reference = ft.predict(scheduled.model, loaded.data)
    with outputs.staged_output(config.output_dir, overwrite=config.overwrite) as stage:
        with clock.stage("export"):
            exported = _export(config, loaded, resolved, scheduled, reference, acc_original, stage)
        with clock.stage("validate"):
            validation, layers = _validate(config, loaded, scheduled, reference, stage, events)
        result = _result(config, loaded, traced, resolved, scheduled, reference, acc_original, exported,
                         validation, layers, clock.seconds, device)
        for warning in result.warnings + result.speed_warnings:
            events.warning(warning)
        report.write_reports(result, stage)
    return result


def _device(config: CompressConfig) -> torch.device:
    device = ft.resolve_device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no usable GPU", hint="use --device auto or cpu")
    return device


def _load(config: CompressConfig) -> Loaded:
    # The data is scanned first (labels, sizes, no pixels converted): a registry model is built for its
    # image size; then the model's own data config and channel count shape the preprocessing.
    scanned = scan_data(config.data_path, val_path=config.val_data, stats_given=config.mean is not None)
    size = config.input_size or scanned.size
    model = load_model(config.model_path, arch=config.arch, trust_pickle=config.trust_pickle,
                       image_size=size[-1] if size else None)
    data = prepare_data(scanned, model=model.model, val_fraction=config.val_fraction, seed=config.seed,
                        mean=config.mean, std=config.std, input_size=config.input_size, crop_pct=config.crop_pct,
                        interpolation=config.interpolation, workers=config.workers)
    return Loaded(data=data, model=model, classes=check_fit(model.model, data),
                  criterion=criteria.get_criterion(config.criterion, config.criterion_options),
                  schedule=schedules.get_schedule(config.schedule, config))


def _trace(config: CompressConfig, loaded: Loaded, events: EventStream) -> Traced:
    coupling = graph.trace(loaded.model.model, loaded.data.head(1), timeout=config.trace_timeout or None,
                           memory=watchdog.memory_budget(config.trace_memory), progress=events,
                           attention_pruning=config.attention_pruning)
    check_prunable(coupling)
    preflight = describe(coupling)
    events.note(summary(preflight))
    return Traced(graph=coupling, preflight=preflight)


def _run(config: CompressConfig, loaded: Loaded, traced: Traced, resolved: Resolved, device: torch.device,
         events: EventStream, acc_original: float) -> schedules.Run:
    config = dataclasses.replace(config, max_prune_per_group=resolved.max_prune_per_group)
    return schedules.Run(original=loaded.model.model, data=loaded.data, config=config,
                         criterion=resolved.criterion or loaded.criterion,
                         settings=_finetune_settings(config, loaded.data), device=device, progress=events, graph=traced.graph,
                         target=resolved.flops_ratio, round_to=resolved.round_to, floor=resolved.floor,
                         original_accuracy=acc_original)


def _export(config: CompressConfig, loaded: Loaded, resolved: Resolved, scheduled: schedules.ScheduleResult,
            reference: torch.Tensor, acc_original: float, stage: Path) -> Exported:
    data, example = loaded.data, loaded.data.head(1)
    meta = _metadata(config, resolved, scheduled.prune, data, loaded.classes)
    acc_compressed = _accuracy(reference, data)
    compressed = export_onnx(scheduled.model, stage / "model.onnx", example_input=example,
                             metadata={**meta, "model": "compressed", "accuracy_val": f"{acc_compressed:.6f}"})
    original = export_onnx(loaded.model.model, stage / "original.onnx", example_input=example,
                           metadata={**meta, "model": "original", "accuracy_val": f"{acc_original:.6f}"})
    checkpoint.save_pruned(scheduled.model, stage / "model.pt", arch=loaded.model.arch, extra={
        "input_shape": list(data.info.input_shape), "mean": list(data.info.mean), "std": list(data.info.std),
        "preprocessing": data.info.preprocessing,
        "num_classes": loaded.classes, "criterion": config.criterion, "schedule": config.schedule,
        "target_flops": config.target_flops, "requested": _requested(config), "resolved": resolved.to_dict()})
    return Exported(compressed=compressed, original=original)


def _accuracy(logits: torch.Tensor, data: LoadedData) -> float:
    return (logits.argmax(1) == data.labels("val")).float().mean().item()


def _validate(config: CompressConfig, loaded: Loaded, scheduled: schedules.ScheduleResult, reference: torch.Tensor,
              stage: Path, events: EventStream) -> tuple[validate.ValidationResult, profile.LayerProfile]:
    data = loaded.data
    validation = validate.validate(stage / "original.onnx", stage / "model.onnx", reference_logits=reference,
                                   data=data, device=config.device, runs=config.latency_runs,
                                   batches=tuple(sorted({1, 64, config.latency_batch})), check=events.check_cancel,
                                   parity_tolerance=config.parity_tolerance)
    layers = profile.layer_profile(loaded.model.model, scheduled.model, stage / "original.onnx", stage / "model.onnx",
                                   example_input=data.head(1), sample=data.head(64), batch=config.latency_batch,
                                   device=config.device)
    return validation, layers


def _notes(loaded: Loaded, acc_original: float, resolved: Resolved, scheduled: schedules.ScheduleResult) -> list[str]:
    """The run's warnings other than the speed warnings, in the order the stages raise them."""
    prune, finetune = scheduled.prune, scheduled.finetune
    notes = list(loaded.data.notes) + report.chance_warnings(acc_original, loaded.classes)
    notes += [note for note in (resolved.cap_note, resolved.rounding_note) if note]
    notes += [f"group {unsafe} broke the model when pruned; it was left unpruned" for unsafe in prune.unsafe_groups]
    if prune.off_multiple:
        notes.append(f"to land within 1% of the FLOPs target, group {prune.off_multiple[0]} keeps a width "
                     f"that is not a multiple of --round-to {resolved.round_to}")
    if prune.achieved_ratio < prune.target_ratio * (1 - pruning.TOLERANCE):
        notes.append(f"the achieved FLOPs ratio {prune.achieved_ratio:.4f} is more than 1% below the target "
                     f"{prune.target_ratio:g}: no plan with the channels left after the schedule's earlier prunes "
                     "landed closer")
    if finetune is not None and finetune.stopped_early:
        notes.append(f"fine-tuning stopped early: {finetune.stopped_early}")
    return notes


def _result(config: CompressConfig, loaded: Loaded, traced: Traced, resolved: Resolved,
            scheduled: schedules.ScheduleResult, reference: torch.Tensor, acc_original: float, exported: Exported,
            validation: validate.ValidationResult, layers: profile.LayerProfile, seconds: dict[str, float],
            device: torch.device) -> report.CompressResult:
    final_prune = scheduled.events[-1]
    return report.CompressResult(
        out_dir=config.output_dir,
        model={"source": str(config.model_path), "kind": loaded.model.kind, "arch": loaded.model.arch,
               "num_classes": loaded.classes},
        data=loaded.data.info, criterion=config.criterion, max_prune_per_group=resolved.max_prune_per_group,
        prune=scheduled.prune,
        accuracy_original=acc_original, accuracy_pruned_before_finetune=final_prune.accuracy_after,
        accuracy_pruned_recalibrated=final_prune.accuracy_recalibrated,
        accuracy_compressed=_accuracy(reference, loaded.data), finetune=scheduled.finetune, validation=validation,
        onnx_bytes=exported.compressed.bytes, onnx_original_bytes=exported.original.bytes,
        stage_seconds=seconds, device=str(device), versions=_versions(), warnings=_notes(loaded, acc_original, resolved, scheduled),
        speed_warnings=report.speed_warnings(validation, resolved.latency_search, round_to=resolved.round_to),
        schedule=scheduled, requested_flops=config.target_flops, latency_search=resolved.latency_search,
        layer_profile=layers,
        preflight=dataclasses.replace(traced.preflight, min_reachable_ratio=resolved.floor.ratio,
                                      unsafe=dict(resolved.unsafe)),
        resolved=resolved, accuracy_pruned_reconstructed=final_prune.accuracy_reconstructed)

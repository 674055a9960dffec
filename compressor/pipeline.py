"""``compress()``: the stages in order. Each is a call into the module named after it."""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager

import torch
from torch import nn

from . import (__version__, checkpoint, criteria, distributed, finetune as ft, graph, latency, outputs, profile, pruning, report,
               schedules, validate, watchdog)
from .calibration import activation_stats, calibrate, prepare_criterion  # noqa: F401  (public here too)
from .config import CompressConfig
from .data import LoadedData, load_data
from .errors import ConfigError, DataError
from .export import export_onnx
from .loading import load_model
from .preflight import check_prunable, describe, summary
from .progress import Progress


class _Clock:
    def __init__(self, progress: Progress) -> None:
        self.seconds: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def stage(self, name: str):
        self.progress.stage(name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


def check_fit(model: nn.Module, data: LoadedData) -> int:
    """Run the model on a few images; return its class count or say why the data does not fit."""
    try:
        with torch.no_grad():
            out = model.eval()(data.val_x[:2])
    except Exception as exc:
        raise DataError(f"the model fails on the data's images of shape {tuple(data.info.input_shape)}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                        hint="check the channel count and image size the model expects") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DataError(f"the model's output has shape {tuple(getattr(out, 'shape', ()))}; a classifier giving (batch, classes) logits is expected")
    classes = int(out.shape[1])
    if data.info.num_classes > classes:
        raise DataError(f"labels go up to {data.info.num_classes - 1} but the model's classifier has {classes} outputs",
                        hint="the data's labels must be class indices 0..classes-1 of the model")
    return classes


def _metadata(config: CompressConfig, result: pruning.PruneResult, data: LoadedData, classes: int) -> dict[str, str]:
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
    }


def _finetune_settings(config: CompressConfig) -> ft.FinetuneSettings:
    return ft.FinetuneSettings(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.peak_lr, optimizer=config.optimizer,
        weight_decay=config.weight_decay, distill=config.distill, temperature=config.distill_temperature,
        alpha=config.distill_alpha, seed=config.seed)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch_pruning

    return {"compressor": __version__, "torch": torch.__version__, "torch_pruning": torch_pruning.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def compress(config: CompressConfig, *, progress: Progress | None = None) -> report.CompressResult:
    """Load, trace, prune to the FLOPs target, fine-tune, export, validate and report."""
    progress = progress or Progress()
    clock = _Clock(progress)
    out = config.output_dir
    outputs.check_output_dir(out, overwrite=config.overwrite, inputs=(config.model_path, config.data_path))
    torch.manual_seed(config.seed)
    device = ft.resolve_device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no usable GPU", hint="use --device auto or cpu")
    notes: list[str] = []

    with clock.stage("load"):
        data = load_data(config.data_path, val_fraction=config.val_fraction, seed=config.seed,
                         mean=config.mean, std=config.std)
        loaded = load_model(config.model_path, arch=config.arch, trust_pickle=config.trust_pickle,
                            image_size=data.info.input_shape[-1])
        original = loaded.model
        classes = check_fit(original, data)
        criterion = criteria.get_criterion(config.criterion)
        schedule = schedules.get_schedule(config.schedule, config)
        distributed.check(config, schedule, device)

    with clock.stage("trace"):
        coupling = graph.trace(original, data.val_x[:1], timeout=config.trace_timeout or None,
                               memory=watchdog.memory_budget(config.trace_memory), progress=progress,
                               attention_pruning=config.attention_pruning)
        check_prunable(coupling)
        preflight = describe(coupling)
        progress.note(summary(preflight))

    with clock.stage("prune"):
        # The schedule prunes to one FLOPs ratio: the latency target, if any, is turned into one first.
        round_to, rounding_note = latency.fit_round_to(coupling, config)
        if rounding_note:
            notes.append(rounding_note)
            progress.note(rounding_note)
        flops_ratio, latency_search = latency.resolve_target(coupling, config, criterion=criterion, data=data,
                                                             round_to=round_to, progress=progress)
        resolved = dataclasses.replace(config, target_flops=flops_ratio, round_to=round_to)
        acc_original = ft.accuracy(original, data.val_x, data.val_y)
        run = schedules.Run(original=original, data=data, config=resolved, criterion=criterion,
                            settings=_finetune_settings(config), device=device, progress=progress,
                            groups=coupling.groups)
        run.start(schedule)

    with clock.stage("fine-tune"):
        scheduled = run.finish(schedule, config.schedule, train=distributed.trainer(config))
    pruned, prune_result, finetune_result = scheduled.model, scheduled.prune, scheduled.finetune
    for unsafe in prune_result.unsafe_groups:
        notes.append(f"group {unsafe} broke the model when pruned; it was left unpruned")
    if prune_result.off_multiple:
        notes.append(f"to land within 1% of the FLOPs target, group {prune_result.off_multiple[0]} keeps a width "
                     f"that is not a multiple of --round-to {round_to}")
    if prune_result.achieved_ratio < prune_result.target_ratio * (1 - pruning.TOLERANCE):
        notes.append(f"the achieved FLOPs ratio {prune_result.achieved_ratio:.4f} is more than 1% below the target "
                     f"{prune_result.target_ratio:g}: no plan with the channels left after the schedule's earlier prunes "
                     "landed closer")
    if finetune_result is not None and finetune_result.stopped_early:
        notes.append(f"fine-tuning stopped early: {finetune_result.stopped_early}")
    final_prune = scheduled.events[-1]
    # The pruned model's logits serve twice: its accuracy, and the reference the ONNX export must match.
    reference = ft.predict(pruned, data.val_x)
    acc_compressed = (reference.argmax(1) == data.val_y).float().mean().item()

    with outputs.staged_output(out, overwrite=config.overwrite) as stage:
        with clock.stage("export"):
            example = data.val_x[:1]
            meta = _metadata(config, prune_result, data, classes)
            exported = export_onnx(pruned, stage / "model.onnx", example_input=example,
                                   metadata={**meta, "model": "compressed", "accuracy_val": f"{acc_compressed:.6f}"})
            exported_original = export_onnx(original, stage / "original.onnx", example_input=example,
                                            metadata={**meta, "model": "original", "accuracy_val": f"{acc_original:.6f}"})
            checkpoint.save_pruned(pruned, stage / "model.pt", arch=loaded.arch, extra={
                "input_shape": list(data.info.input_shape), "mean": list(data.info.mean), "std": list(data.info.std),
                "num_classes": classes, "criterion": config.criterion, "schedule": config.schedule,
                "target_flops": config.target_flops})

        with clock.stage("validate"):
            validation = validate.validate(stage / "original.onnx", stage / "model.onnx", reference_logits=reference,
                                           val_x=data.val_x, val_y=data.val_y, device=config.device,
                                           runs=config.latency_runs, batches=tuple(sorted({1, 64, config.latency_batch})))
            layers = profile.layer_profile(original, pruned, stage / "original.onnx", stage / "model.onnx",
                                           example_input=example, sample=data.val_x[:64], batch=config.latency_batch,
                                           device=config.device)
        notes += report.speed_warnings(validation, latency_search, round_to=round_to)
        result = report.CompressResult(
            out_dir=out,
            model={"source": str(config.model_path), "kind": loaded.kind, "arch": loaded.arch,
                   "num_classes": classes},
            data=data.info, criterion=config.criterion, max_prune_per_group=config.max_prune_per_group,
            prune=prune_result,
            accuracy_original=acc_original, accuracy_pruned_before_finetune=final_prune.accuracy_after,
            accuracy_pruned_recalibrated=final_prune.accuracy_recalibrated,
            accuracy_compressed=acc_compressed, finetune=finetune_result, validation=validation,
            onnx_bytes=exported.bytes, onnx_original_bytes=exported_original.bytes,
            stage_seconds=clock.seconds, device=str(device), versions=_versions(), warnings=notes,
            schedule=scheduled, requested_flops=config.target_flops, latency_search=latency_search,
            layer_profile=layers,
            preflight=dataclasses.replace(preflight, min_reachable_ratio=prune_result.min_reachable_ratio,
                                          unsafe=dict(u.split(": ", 1) for u in prune_result.unsafe_groups)))
        report.write_reports(result, stage)
    return result

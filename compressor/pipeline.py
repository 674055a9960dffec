"""``compress()``: the stages in order. Each is a call into the module named after it."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import torch
from torch import nn

from . import __version__, checkpoint, criteria, finetune as ft, graph, outputs, pruning, report, validate
from .calibration import activation_stats, calibrate, prepare_criterion  # noqa: F401  (public here too)
from .config import CompressConfig
from .data import LoadedData, load_data
from .errors import ConfigError, DataError
from .export import export_onnx
from .loading import load_model
from .preflight import check_prunable
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
        "target_flops_ratio": f"{config.target_flops:g}",
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

    with clock.stage("trace"):
        coupling = graph.trace(original, data.val_x[:1])
        check_prunable(coupling)

    with clock.stage("prune"):
        prepare_criterion(criterion, original, data, batches=config.calibration_batches, batch_size=config.batch_size)
        scores = pruning.score_groups(coupling, criterion)
        original.zero_grad(set_to_none=True)
        progress.task("search for the FLOPs target", 0)
        pruned, prune_result = pruning.search(
            coupling, scores, target_ratio=config.target_flops, max_prune_fraction=config.max_prune_per_group,
            round_to=config.round_to,
            on_probe=lambda n, r: progress.advance(1, flops_ratio=r))
        progress.done()
        for unsafe in prune_result.unsafe_groups:
            notes.append(f"group {unsafe} broke the model when pruned; it was left unpruned")
            progress.note(notes[-1])
        if prune_result.off_multiple:
            notes.append(f"to land within 1% of the FLOPs target, group {prune_result.off_multiple[0]} keeps a width "
                         f"that is not a multiple of --round-to {config.round_to}")
            progress.note(notes[-1])

    with clock.stage("evaluate"):
        acc_original = ft.accuracy(original, data.val_x, data.val_y)
        acc_pruned = ft.accuracy(pruned, data.val_x, data.val_y)
        acc_recalibrated = None
        if config.bn_recalibration and ft.recalibrate_bn(pruned, data.train_x, batch_size=config.batch_size):
            acc_recalibrated = ft.accuracy(pruned, data.val_x, data.val_y)

    finetune_result = None
    if config.epochs > 0:
        with clock.stage("fine-tune"):
            finetune_result = ft.finetune(pruned, data, _finetune_settings(config),
                                          teacher=original if config.distill else None, device=device,
                                          progress=progress)
            if finetune_result.stopped_early:
                notes.append(f"fine-tuning stopped early: {finetune_result.stopped_early}")
                progress.note(notes[-1])
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
                "num_classes": classes, "criterion": config.criterion, "target_flops": config.target_flops})

        with clock.stage("validate"):
            validation = validate.validate(stage / "original.onnx", stage / "model.onnx", reference_logits=reference,
                                           val_x=data.val_x, val_y=data.val_y, device=config.device,
                                           runs=config.latency_runs)
        for lat in validation.latency:
            if lat.speedup < 1:
                notes.append(f"the compressed model is SLOWER than the original at batch {lat.batch} on "
                             f"{validation.provider} ({lat.speedup:.2f}x); channel widths that are not hardware-friendly "
                             "can do this")
        result = report.CompressResult(
            out_dir=out,
            model={"source": str(config.model_path), "kind": loaded.kind, "arch": loaded.arch,
                   "num_classes": classes},
            data=data.info, criterion=config.criterion, max_prune_per_group=config.max_prune_per_group,
            prune=prune_result,
            accuracy_original=acc_original, accuracy_pruned_before_finetune=acc_pruned,
            accuracy_pruned_recalibrated=acc_recalibrated,
            accuracy_compressed=acc_compressed, finetune=finetune_result, validation=validation,
            onnx_bytes=exported.bytes, onnx_original_bytes=exported_original.bytes,
            stage_seconds=clock.seconds, device=str(device), versions=_versions(), warnings=notes)
        report.write_reports(result, stage)
    return result

"""The run's report: ``report.json`` for machines, ``report.md`` and the before/after table for people."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .data import DataInfo
from .finetune import FinetuneResult
from .pruning import PruneResult
from .validate import ValidationResult


@dataclass(frozen=True)
class CompressResult:
    """Everything one ``compress`` run measured."""

    out_dir: Path
    model: dict[str, Any]
    data: DataInfo
    criterion: str
    max_prune_per_group: float
    prune: PruneResult
    accuracy_original: float
    accuracy_pruned_before_finetune: float
    accuracy_pruned_recalibrated: float | None
    accuracy_compressed: float
    finetune: FinetuneResult | None
    validation: ValidationResult
    onnx_bytes: int
    onnx_original_bytes: int
    stage_seconds: dict[str, float]
    device: str
    versions: dict[str, str]
    warnings: list[str]


def to_dict(r: CompressResult) -> dict[str, Any]:
    """The JSON report. Key names are a public contract: add, never rename."""
    lat = {f"batch{l.batch}": {"original": l.original_ms, "compressed": l.compressed_ms, "speedup": l.speedup,
                               "original_spread": l.original_spread_ms, "compressed_spread": l.compressed_spread_ms,
                               "runs": l.runs}
           for l in r.validation.latency}
    p = r.prune
    return {
        "model": r.model,
        "data": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(r.data).items()},
        "criterion": r.criterion,
        "flops": {"original": p.original.macs, "compressed": p.pruned.macs, "target_ratio": p.target_ratio,
                  "achieved_ratio": p.achieved_ratio, "min_reachable_ratio": p.min_reachable_ratio,
                  "unit": "MACs (torch-pruning count_ops_and_params, batch 1)"},
        "params": {"original": p.original.params, "compressed": p.pruned.params},
        "accuracy": {"original": r.accuracy_original, "pruned_before_finetune": r.accuracy_pruned_before_finetune,
                     "pruned_bn_recalibrated": r.accuracy_pruned_recalibrated,
                     "compressed": r.accuracy_compressed, "compressed_onnx": r.validation.accuracy_compressed,
                     "original_onnx": r.validation.accuracy_original, "split": "validation",
                     "samples": r.data.val_size},
        "onnx": {"bytes": r.onnx_bytes, "original_bytes": r.onnx_original_bytes,
                 "max_abs_diff": r.validation.parity.max_abs_diff, "top1_agreement": r.validation.parity.top1_agreement,
                 "parity_samples": r.validation.parity.samples, "provider": r.validation.provider},
        "latency_ms": lat,
        "search": {"probes": p.probes, "seconds": p.seconds, "round_to": p.round_to, "off_multiple": p.off_multiple,
                   "unsafe_groups": p.unsafe_groups,
                   "max_prune_per_group": r.max_prune_per_group,
                   "layers": [{"group": l.group, "before": l.before, "after": l.after} for l in p.layers]},
        "finetune": asdict(r.finetune) if r.finetune else None,
        "stages_seconds": r.stage_seconds,
        "device": r.device,
        "versions": r.versions,
        "warnings": r.warnings,
    }


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def table_rows(r: CompressResult) -> list[tuple[str, str, str, str]]:
    """(metric, original, compressed, change) rows of the before/after table."""
    p, v = r.prune, r.validation
    rows = [
        ("FLOPs (MACs)", f"{p.original.macs / 1e6:.2f}M", f"{p.pruned.macs / 1e6:.2f}M", f"{p.achieved_ratio:.3f} of original"),
        ("Parameters", f"{p.original.params / 1e6:.3f}M", f"{p.pruned.params / 1e6:.3f}M",
         f"{p.pruned.params / p.original.params:.3f} of original"),
        ("ONNX size", f"{r.onnx_original_bytes / 1e6:.2f} MB", f"{r.onnx_bytes / 1e6:.2f} MB",
         f"{r.onnx_bytes / r.onnx_original_bytes:.3f} of original"),
        ("Accuracy (ONNX, val)", f"{v.accuracy_original:.2%}", f"{v.accuracy_compressed:.2%}",
         f"{(v.accuracy_compressed - v.accuracy_original) * 100:+.2f} pts"),
    ]
    for l in v.latency:
        rows.append((f"Latency batch {l.batch} ({v.provider.replace('ExecutionProvider', '')})",
                     f"{l.original_ms:.2f} ms", f"{l.compressed_ms:.2f} ms", f"{_ratio(l.original_ms, l.compressed_ms)} faster"
                     if l.speedup >= 1 else f"{_ratio(l.original_ms, l.compressed_ms)} (SLOWER)"))
    return rows


def to_markdown(r: CompressResult) -> str:
    d = to_dict(r)
    lines = [f"# Compression report: {r.model.get('source', '')}", "",
             f"Target {r.prune.target_ratio:g} of the original FLOPs, criterion `{r.criterion}`; "
             f"achieved {r.prune.achieved_ratio:.4f}.", "",
             "| | original | compressed | change |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in table_rows(r)]
    lines += ["", "## Accuracy on the validation split", "",
              f"- original (PyTorch): {r.accuracy_original:.2%}",
              f"- right after pruning, before fine-tuning: {r.accuracy_pruned_before_finetune:.2%}",
              *([f"- after batch-norm recalibration: {r.accuracy_pruned_recalibrated:.2%}"]
                if r.accuracy_pruned_recalibrated is not None else []),
              f"- after fine-tuning (PyTorch): {r.accuracy_compressed:.2%}",
              f"- after fine-tuning (ONNX, {r.validation.provider}): {r.validation.accuracy_compressed:.2%}",
              f"- validation images: {r.data.val_size} ({r.data.val_fraction:g} of {r.data.num_samples}, seed {r.data.seed})",
              "", "## ONNX parity with the pruned PyTorch model", "",
              f"- max abs difference of logits: {r.validation.parity.max_abs_diff:.2e}",
              f"- top-1 agreement: {r.validation.parity.top1_agreement:.2%} of {r.validation.parity.samples} images",
              "", "## Channels per group", "", "| group (root layer) | before | after |", "|---|---|---|"]
    lines += [f"| {l['group']} | {l['before']} | {l['after']} |" for l in d["search"]["layers"]]
    lines += ["", "## Stages (seconds)", ""] + [f"- {k}: {v:.1f}" for k, v in r.stage_seconds.items()]
    if r.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r.warnings]
    lines += ["", f"Data: {r.data.source}, input {r.data.input_shape}, mean {r.data.mean}, std {r.data.std} "
              f"({r.data.normalization}).", f"Versions: {', '.join(f'{k} {v}' for k, v in r.versions.items())}."]
    return "\n".join(lines) + "\n"


def write_reports(r: CompressResult, directory: Path) -> None:
    (directory / "report.json").write_text(json.dumps(to_dict(r), indent=2) + "\n")
    (directory / "report.md").write_text(to_markdown(r))

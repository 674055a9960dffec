"""The run's report: ``report.json`` for machines, ``report.md`` and the before/after table for people."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import strict_json
from .data import DataInfo
from .finetune import FinetuneResult
from .latency import LatencySearchResult
from .preflight import Inspection
from .profile import LayerProfile
from .pruning import PruneResult
from .schedules import ScheduleResult
from .validate import Latency, ValidationResult

NOT_FASTER_BELOW = 1.05
"""A speed-up under this is reported as not faster: within the noise of a busy machine, or no gain worth a pruned model."""


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
    schedule: ScheduleResult | None = None
    requested_flops: float | None = None
    """``--target-flops`` as given (None when only a latency target was)."""
    latency_search: LatencySearchResult | None = None
    layer_profile: LayerProfile | None = None
    preflight: Inspection | None = None
    """What tracing found (the pre-flight of ``compressor inspect``), with the search's floor and unsafe groups."""
    speed_warnings: list[str] = field(default_factory=list)
    """The warnings about speed (:func:`speed_warnings`, computed once); ``warnings`` holds the others."""
    resolved: Any = None
    """The values the run resolved from the request (:class:`compressor.resolve.Resolved`)."""
    accuracy_pruned_reconstructed: float | None = None
    """After the last physical prune's reconstruction (``--reconstruct``), else None."""


def not_faster(validation: ValidationResult) -> list[Latency]:
    """The batch sizes at which the compressed model is not clearly faster than the original."""
    return [l for l in validation.latency if l.speedup < NOT_FASTER_BELOW]


def speed_warnings(validation: ValidationResult, search: LatencySearchResult | None, *, round_to: int) -> list[str]:
    """What the run must say loudly: a model that is not faster, or a latency target missed at validation."""
    fix = (f"rounding kept widths to hardware-friendly multiples (--round-to 8 or 16; this run used {round_to})"
           + ", or --target-latency X, which measures candidates on this execution provider")
    notes = []
    for l in not_faster(validation):
        how = "SLOWER than" if l.speedup < 1 else "NOT FASTER than"
        notes.append(f"the compressed model is {how} the original at batch {l.batch} on {validation.provider} "
                     f"({l.speedup:.2f}x, medians {l.original_ms:.2f} vs {l.compressed_ms:.2f} ms); try {fix}")
    if search is not None:
        measured = _latency_ratio(validation, search.batch)
        if measured is not None and measured > search.target + search.spread:
            notes.append(f"--target-latency {search.target:g} was met during the search ({search.latency_ratio:.3f}) "
                         f"but validation measured {measured:.3f} at batch {search.batch}, beyond the search's spread "
                         f"({search.spread:.3f}): the machine's load may have changed")
    return notes


def alerts(r: CompressResult) -> list[str]:
    """The warnings about speed, which the command line shows in a panel rather than among the notes."""
    return list(r.speed_warnings)


def _latency_ratio(validation: ValidationResult, batch: int) -> float | None:
    for l in validation.latency:
        if l.batch == batch:
            return l.compressed_ms / l.original_ms
    return None


def chance_warnings(accuracy: float, classes: int) -> list[str]:
    """A warning when the original model is no better than chance on its own data: the data's scale,
    its normalisation or its labels are then most likely not what the model was trained on."""
    chance = 1 / max(classes, 1)
    if classes < 2 or accuracy > chance + CHANCE_MARGIN * (1 - chance):
        return []
    return [f"the original model scores {accuracy:.1%} on the validation data, about chance level for {classes} "
            f"classes ({chance:.1%}): check that the images are scaled as in training (--mean, --std, [0, 1] "
            "pixel units) and that the labels are the model's class indices"]


CHANCE_MARGIN = 0.1
"""An accuracy within this share of the way from chance to 100% counts as chance level."""


def to_dict(r: CompressResult) -> dict[str, Any]:
    """The JSON report, strict JSON: a value that is not finite is ``null``, with the reason under
    ``null_reasons``. Key names are a public contract: add, never rename."""
    return strict_json.nulls_for_non_finite(_raw_dict(r))


def _raw_dict(r: CompressResult) -> dict[str, Any]:
    lat = {f"batch{l.batch}": {"original": l.original_ms, "compressed": l.compressed_ms, "speedup": l.speedup,
                               "original_spread": l.original_spread_ms, "compressed_spread": l.compressed_spread_ms,
                               "runs": l.runs}
           for l in r.validation.latency}
    p = r.prune
    return {
        "model": r.model,
        "data": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(r.data).items()},
        "criterion": r.criterion,
        "criterion_choice": r.resolved.choice.to_dict() if r.resolved is not None and r.resolved.choice else None,
        "flops": {"original": p.original.macs, "compressed": p.pruned.macs, "target_ratio": p.target_ratio,
                  "achieved_ratio": p.achieved_ratio, "min_reachable_ratio": p.min_reachable_ratio,
                  "unit": "MACs (torch-pruning count_ops_and_params, batch 1)"},
        "params": {"original": p.original.params, "compressed": p.pruned.params},
        "accuracy": {"original": r.accuracy_original, "pruned_before_finetune": r.accuracy_pruned_before_finetune,
                     "pruned_bn_recalibrated": r.accuracy_pruned_recalibrated,
                     "pruned_reconstructed": r.accuracy_pruned_reconstructed,
                     "compressed": r.accuracy_compressed, "compressed_onnx": r.validation.accuracy_compressed,
                     "original_onnx": r.validation.accuracy_original, "split": "validation",
                     "samples": r.data.val_size},
        "onnx": {"bytes": r.onnx_bytes, "original_bytes": r.onnx_original_bytes,
                 "max_abs_diff": r.validation.parity.max_abs_diff, "top1_agreement": r.validation.parity.top1_agreement,
                 "mean_abs_diff": r.validation.parity.mean_abs_diff, "max_abs_logit": r.validation.parity.max_abs_logit,
                 "parity_tolerance": r.validation.parity.tolerance,
                 "parity_samples": r.validation.parity.samples, "provider": r.validation.provider},
        "latency_ms": lat,
        "search": {"probes": p.probes, "seconds": p.seconds, "round_to": p.round_to, "off_multiple": p.off_multiple,
                   "unsafe_groups": p.unsafe_groups,
                   "max_prune_per_group": r.max_prune_per_group,
                   "layers": [{"group": l.group, "before": l.before, "after": l.after} for l in p.layers]},
        "schedule": ({"name": r.schedule.name, "events": [asdict(e) for e in r.schedule.events],
                      "details": r.schedule.details} if r.schedule else None),
        "finetune": asdict(r.finetune) if r.finetune else None,
        "stages_seconds": r.stage_seconds,
        "device": r.device,
        "versions": r.versions,
        "warnings": r.warnings + r.speed_warnings,
        "resolved": r.resolved.to_dict() if r.resolved is not None else None,
        "not_faster": [{"batch": l.batch, "speedup": l.speedup, "provider": r.validation.provider}
                       for l in not_faster(r.validation)],
        "targets": _targets(r),
        "layer_profile": _layer_profile(r.layer_profile),
        "attention": {"pruning": p.attention_pruning, "modules": [asdict(h) for h in p.heads]},
        "preflight": _preflight(r.preflight),
    }


def _preflight(i: Inspection | None) -> dict[str, Any] | None:
    if i is None:
        return None
    return {"groups": len(i.groups), "protected": i.protected, "unsafe": i.unsafe, "attention": i.attention,
            "frozen": i.frozen, "unwrapped": i.unwrapped, "min_reachable_ratio": i.min_reachable_ratio,
            "held_macs": i.held_macs}


def _targets(r: CompressResult) -> dict[str, Any]:
    """Requested vs achieved FLOPs and latency."""
    s = r.latency_search
    latency = None
    if s is not None:
        latency = {"requested_ratio": s.target, "batch": s.batch, "provider": s.provider,
                   "achieved_ratio": _latency_ratio(r.validation, s.batch), "search_ratio": s.latency_ratio,
                   "search_spread": s.spread, "limited_by": s.limited_by, "flops_ratio_chosen": s.flops_ratio,
                   "search_seconds": s.seconds,
                   "probes": [asdict(p) for p in s.probes]}
    return {"flops": {"requested_ratio": r.requested_flops, "achieved_ratio": r.prune.achieved_ratio},
            "latency": latency}


def _layer_profile(lp: LayerProfile | None) -> dict[str, Any] | None:
    if lp is None:
        return None
    return {"batch": lp.batch, "provider": lp.provider, "layers": [asdict(l) for l in lp.layers],
            "other_latency_share_original": lp.other_latency_share_original,
            "other_latency_share_compressed": lp.other_latency_share_compressed,
            "note": "latency shares from onnxruntime's profiler at the extended optimisation level"}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


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
    if p.heads:
        before, after = sum(h.heads_before for h in p.heads), sum(h.heads_after for h in p.heads)
        rows.append((f"Attention heads ({len(p.heads)} modules)", str(before), str(after),
                     f"--attention {p.attention_pruning}"))
    for l in v.latency:
        rows.append((f"Latency batch {l.batch} ({v.provider.replace('ExecutionProvider', '')})",
                     f"{l.original_ms:.2f} ms", f"{l.compressed_ms:.2f} ms",
                     f"{_ratio(l.original_ms, l.compressed_ms)} faster" if l.speedup >= NOT_FASTER_BELOW
                     else f"{_ratio(l.original_ms, l.compressed_ms)} (SLOWER)" if l.speedup < 1
                     else f"{_ratio(l.original_ms, l.compressed_ms)} (NOT FASTER)"))
    return rows


def to_markdown(r: CompressResult) -> str:
    d = _raw_dict(r)
    lines = [f"# Compression report: {r.model.get('source', '')}", "",
             f"Target {r.prune.target_ratio:g} of the original FLOPs, criterion `{r.criterion}`"
             + (f" (chose `{r.resolved.choice.chosen}`)" if r.resolved is not None and r.resolved.choice else "")
             + (f", schedule `{r.schedule.name}`" if r.schedule else "") + "; "
             f"achieved {r.prune.achieved_ratio:.4f}.", ""]
    if r.resolved is not None and r.resolved.choice:
        lines += [r.resolved.choice.reason() + ".", ""]
    lines += [f"> **WARNING: {w}**" for w in alerts(r)]
    lines += ["", "| | original | compressed | change |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in table_rows(r)]
    t = d["targets"]
    lines += ["", "## Targets: requested vs achieved", "", "| target | requested | achieved |", "|---|---|---|",
              f"| FLOPs ratio | {_opt(t['flops']['requested_ratio'])} | {t['flops']['achieved_ratio']:.4f} |"]
    if t["latency"]:
        lat = t["latency"]
        lines += [f"| latency ratio, batch {lat['batch']} ({lat['provider']}) | {lat['requested_ratio']:g} | "
                  f"{_opt(lat['achieved_ratio'])} at validation; {lat['search_ratio']:.3f} ± {lat['search_spread']:.3f} "
                  f"in the search (± about one standard error of the median per-round ratio) |", "",
                  f"The latency search timed {len(lat['probes'])} candidates in {lat['search_seconds']:.1f} s and chose "
                  f"FLOPs ratio {lat['flops_ratio_chosen']:.4f} (limited by the {lat['limited_by']} target):", "",
                  "| FLOPs target | FLOPs achieved | latency ratio | spread | meets |", "|---|---|---|---|---|"]
        lines += [f"| {p['flops_target']:.4f} | {p['flops_ratio']:.4f} | {p['latency_ratio']:.3f} | {p['spread']:.3f} | "
                  f"{'yes' if p['meets'] else 'no'} |" for p in lat["probes"]]
    lp = d["layer_profile"]
    if lp:
        lines += ["", f"## Where FLOPs and time go (batch {lp['batch']}, {lp['provider']})", "",
                  "Shares of the model's MACs and of onnxruntime's per-node kernel time (profiler, extended "
                  "optimisation level), original -> compressed.", "",
                  "| layer | channels before | after | FLOPs share | latency share |", "|---|---|---|---|---|"]
        lines += [f"| {l['layer']} | {l['channels_before']} | {l['channels_after']} | "
                  f"{l['flops_share_original']:.1%} -> {l['flops_share_compressed']:.1%} | "
                  f"{l['latency_share_original']:.1%} -> {l['latency_share_compressed']:.1%} |" for l in lp["layers"]]
        lines += [f"| (everything else) | | | | {lp['other_latency_share_original']:.1%} -> "
                  f"{lp['other_latency_share_compressed']:.1%} |"]
    lines += ["", "## Accuracy on the validation split", "",
              f"- original (PyTorch): {r.accuracy_original:.2%}",
              f"- right after the (last) physical prune: {r.accuracy_pruned_before_finetune:.2%}",
              *([f"- after batch-norm recalibration: {r.accuracy_pruned_recalibrated:.2%}"]
                if r.accuracy_pruned_recalibrated is not None else []),
              *([f"- after reconstruction: {r.accuracy_pruned_reconstructed:.2%}"]
                if r.accuracy_pruned_reconstructed is not None else []),
              f"- after fine-tuning (PyTorch): {r.accuracy_compressed:.2%}",
              f"- after fine-tuning (ONNX, {r.validation.provider}): {r.validation.accuracy_compressed:.2%}",
              f"- validation images: {r.data.val_size} ({r.data.val_fraction:g} of {r.data.num_samples}, seed {r.data.seed})",
              "", "## ONNX parity with the pruned PyTorch model", "",
              f"- max abs difference of logits: {r.validation.parity.max_abs_diff:.2e} (mean "
              f"{r.validation.parity.mean_abs_diff:.2e}; largest logit {r.validation.parity.max_abs_logit:.3g}"
              + (f", tolerance {r.validation.parity.tolerance:g} of it" if r.validation.parity.tolerance else "") + ")",
              f"- top-1 agreement: {r.validation.parity.top1_agreement:.2%} of {r.validation.parity.samples} images",
              "", "## Channels per group", "", "| group (root layer) | before | after |", "|---|---|---|"]
    lines += [f"| {l['group']} | {l['before']} | {l['after']} |" for l in d["search"]["layers"]]
    if r.prune.heads:
        how = ("whole heads removed, head_dim kept" if r.prune.attention_pruning == "heads"
               else "head dimensions removed alike in every head, head count kept")
        lines += ["", f"## Attention heads (`--attention {r.prune.attention_pruning}`: {how})", "",
                  "| attention module | heads before | after | head_dim before | after |", "|---|---|---|---|---|"]
        lines += [f"| {h.module} | {h.heads_before} | {h.heads_after} | {h.head_dim_before} | {h.head_dim_after} |"
                  for h in r.prune.heads]
    if r.schedule:
        lines += ["", f"## Schedule `{r.schedule.name}`", "",
                  "| step | epoch | FLOPs ratio | accuracy before | right after | after BN recalibration "
                  "| after reconstruction | why |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {e.step} | {e.epoch:g} | {e.flops_ratio:.3f} | {e.accuracy_before:.2%} | {e.accuracy_after:.2%} | "
                  f"{_pct(e.accuracy_recalibrated)} | {_pct(e.accuracy_reconstructed)} | {e.reason} |"
                  for e in r.schedule.events]
        lines += ["", "After fine-tuning (validation): " + _pct(r.accuracy_compressed) + "."]
        lines += [f"- reconstruction at step {e.step}: {e.reconstruction.summary()}" for e in r.schedule.events
                  if e.reconstruction is not None]
        lines += ["", "Details: `" + json.dumps(r.schedule.details) + "`"]
    if r.preflight:
        i = r.preflight
        lines += ["", "## Pre-flight (what tracing found)", "",
                  f"- {len(i.groups)} prunable groups; smallest reachable FLOPs ratio "
                  f"{_opt(i.min_reachable_ratio)} at `--max-prune-per-group {r.max_prune_per_group:g}`"]
        lines += [f"- protected `{name}`{i.held_share(name)}: {why}" for name, why in i.protected.items()]
        lines += [f"- left unpruned `{name}`{i.held_share(name)} (pruning it breaks the model): {why}"
                  for name, why in i.unsafe.items()]
        if i.attention:
            lines.append("- attention modules: " + ", ".join(f"`{a}`" for a in i.attention))
        if i.frozen:
            lines.append(f"- frozen parameters (pruned, not fine-tuned): {', '.join(f'`{n}`' for n in i.frozen)}")
        if i.unwrapped:
            lines.append(f"- unwrapped parameters (pruned with their groups): {', '.join(f'`{n}`' for n in i.unwrapped)}")
    lines += ["", "## Stages (seconds)", ""] + [f"- {k}: {v:.1f}" for k, v in r.stage_seconds.items()]
    if r.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r.warnings]
    lines += ["", f"Data: {r.data.source}, input {r.data.input_shape}, mean {r.data.mean}, std {r.data.std} "
              f"({r.data.normalization})" + (f"; preprocessing: {r.data.preprocessing['steps']}" if r.data.preprocessing else "")
              + "." + (f" Unreadable images skipped: {len(r.data.skipped)}." if r.data.skipped else ""), f"Versions: {', '.join(f'{k} {v}' for k, v in r.versions.items())}."]
    return "\n".join(lines) + "\n"


def write_reports(r: CompressResult, directory: Path) -> None:
    (directory / "report.json").write_text(json.dumps(to_dict(r), indent=2, allow_nan=False) + "\n")
    (directory / "report.md").write_text(to_markdown(r))
    from .html_report import write_visual_report  # matplotlib only when a report is written
    write_visual_report(directory)

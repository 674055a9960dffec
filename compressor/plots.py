"""The run's plots, drawn from the report's own figures (the dict of ``report.json``).

Every ``draw_*`` function takes that dict and returns a :class:`Drawn` (the figure and the series it
drew) or None when the report has nothing for it (no latency target, no stability curve, ...). They
read only the dict, so a saved ``report.json`` re-renders the same plots, and they tolerate None (and
NaN) wherever a figure is missing. matplotlib is imported here only, and this module only when a
report is written; figures are drawn on the Agg canvas without pyplot, so no global state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

PLOTS_DIR = "plots"
BEFORE, AFTER, MARK, BAD = "#9ecae1", "#08519c", "#e6550d", "#a50f15"


@dataclass(frozen=True)
class Drawn:
    """A figure and the numbers it shows (what a test or another renderer can check)."""

    name: str
    """File stem under ``plots/``."""
    title: str
    figure: Figure = field(repr=False)
    series: dict[str, list[Any]]


@dataclass(frozen=True)
class PlotFile:
    name: str
    title: str
    png: Path
    svg: Path
    series: dict[str, list[Any]]


def num(value: Any) -> float:
    """A figure as a float; None (strict JSON's missing number) and non-numbers become NaN."""
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _ok(value: Any) -> bool:
    return not math.isnan(num(value))


def _figure(width: float, height: float, rows: int = 1, cols: int = 1) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [a for row in axes for a in row]


def _layer_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per layer in the model's order: the layer profile where there is one, else the pruned groups."""
    lp = report.get("layer_profile") or {}
    if lp.get("layers"):
        return [dict(l) for l in lp["layers"]]
    return [{"layer": l.get("group"), "channels_before": l.get("before"), "channels_after": l.get("after")}
            for l in (report.get("search") or {}).get("layers") or []]


def _marks(report: dict[str, Any]) -> tuple[set[str], set[str]]:
    pre = report.get("preflight") or {}
    protected = set(pre.get("protected") or {})
    unsafe = set(pre.get("unsafe") or {})
    unsafe |= {str(g).split(":")[0].strip() for g in (report.get("search") or {}).get("unsafe_groups") or []}
    return protected, unsafe


def _width(n: int) -> float:
    return min(30.0, max(6.0, 0.28 * n + 2))


def draw_channels(report: dict[str, Any]) -> Drawn | None:
    """Channels per layer before and after, in the model's order; protected and unsafe layers marked."""
    rows = _layer_rows(report)
    if not rows:
        return None
    protected, unsafe = _marks(report)
    names = [str(r["layer"]) for r in rows]
    before = [num(r.get("channels_before")) for r in rows]
    after = [num(r.get("channels_after")) for r in rows]
    fig, (ax,) = _figure(_width(len(rows)), 4.2)
    x = list(range(len(rows)))
    ax.bar(x, before, width=0.8, color=BEFORE, label="before")
    bars = ax.bar(x, after, width=0.5, color=AFTER, label="after")
    status = []
    for i, name in enumerate(names):
        kind = "protected" if name in protected else "unsafe" if name in unsafe else ""
        status.append(kind)
        if kind:
            bars[i].set_color(MARK if kind == "protected" else BAD)
            bars[i].set_hatch("//" if kind == "protected" else "xx")
    handles = [Patch(color=BEFORE, label="before"), Patch(color=AFTER, label="after")]
    if "protected" in status:
        handles.append(Patch(facecolor=MARK, hatch="//", label="protected (kept whole)"))
    if "unsafe" in status:
        handles.append(Patch(facecolor=BAD, hatch="xx", label="left unpruned (unsafe)"))
    ax.set_xticks(x, names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("channels (output)")
    ax.set_title("Channels per layer, before and after")
    ax.legend(handles=handles, fontsize=8)
    return Drawn("channels", "Channels per layer", fig,
                 {"layer": names, "before": before, "after": after, "status": status})


def draw_shares(report: dict[str, Any]) -> Drawn | None:
    """Each layer's share of the FLOPs and of the measured latency, original and compressed."""
    lp = report.get("layer_profile") or {}
    rows = lp.get("layers") or []
    if not rows:
        return None
    names = [str(r.get("layer")) for r in rows]
    series: dict[str, list[Any]] = {"layer": names}
    fig, axes = _figure(_width(len(rows)), 6.5, rows=2)
    x = list(range(len(rows)))
    for ax, what, label in ((axes[0], "flops", "FLOPs (MACs)"), (axes[1], "latency", "latency (onnxruntime profiler)")):
        orig = [num(r.get(f"{what}_share_original")) for r in rows]
        comp = [num(r.get(f"{what}_share_compressed")) for r in rows]
        series[f"{what}_original"], series[f"{what}_compressed"] = orig, comp
        ax.bar([i - 0.2 for i in x], [v * 100 for v in orig], width=0.4, color=BEFORE, label="original")
        ax.bar([i + 0.2 for i in x], [v * 100 for v in comp], width=0.4, color=AFTER, label="compressed")
        ax.set_ylabel("% of the model's total")
        ax.set_title(f"Share of {label} per layer")
        ax.set_xticks(x, names if ax is axes[1] else [""] * len(x), rotation=70, ha="right", fontsize=7)
        ax.legend(fontsize=8)
    other = (num(lp.get("other_latency_share_original")), num(lp.get("other_latency_share_compressed")))
    if all(_ok(v) for v in other):
        axes[1].set_title(f"Share of latency per layer (onnxruntime profiler, batch {lp.get('batch')}); "
                          f"everything else {other[0]:.0%} -> {other[1]:.0%}")
    series["other_latency"] = list(other)
    return Drawn("shares", "Share of FLOPs and latency per layer", fig, series)


def accuracy_points(report: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(label, epoch, accuracy) along the run, in order: original, each prune, each epoch, final ONNX."""
    acc = report.get("accuracy") or {}
    points: list[tuple[str, float, float]] = [("original", 0.0, num(acc.get("original")))]
    events = (report.get("schedule") or {}).get("events") or []
    marks = [(num(e.get("epoch")), 0, i, e) for i, e in enumerate(events)]
    history = (report.get("finetune") or {}).get("history") or []
    marks += [(num(h.get("epoch")), 1, i, h) for i, h in enumerate(history)]
    marks.sort(key=lambda m: (m[0] if _ok(m[0]) else 0.0, m[1], m[2]))
    for epoch, kind, i, item in marks:
        epoch = epoch if _ok(epoch) else 0.0
        if kind == 0:
            step = f" {i + 1}" if len(events) > 1 else ""
            points.append((f"pruned{step}", epoch, num(item.get("accuracy_after"))))
            if item.get("accuracy_recalibrated") is not None:
                points.append((f"BN recalibrated{step}", epoch, num(item.get("accuracy_recalibrated"))))
            if item.get("accuracy_reconstructed") is not None:
                points.append((f"reconstructed{step}", epoch, num(item.get("accuracy_reconstructed"))))
        else:
            points.append((f"epoch {int(epoch) if epoch.is_integer() else epoch}", epoch, num(item.get("val_accuracy"))))
    if not events:
        points.append(("pruned", 0.0, num(acc.get("pruned_before_finetune"))))
        if acc.get("pruned_bn_recalibrated") is not None:
            points.append(("BN recalibrated", 0.0, num(acc.get("pruned_bn_recalibrated"))))
    last = max((p[1] for p in points), default=0.0)
    points.append(("final ONNX", last, num(acc.get("compressed_onnx"))))
    return points


def draw_accuracy(report: dict[str, Any]) -> Drawn | None:
    """Validation accuracy along the run."""
    points = [p for p in accuracy_points(report) if _ok(p[2])]
    if not points:
        return None
    fig, (ax,) = _figure(7, 4.2)
    xs, ys = [p[1] for p in points], [p[2] * 100 for p in points]
    ax.plot(xs, ys, color=AFTER, lw=1.2, zorder=1)
    styles = {"original": ("s", "#636363"), "pruned": ("v", BAD), "BN recalibrated": ("^", MARK),
              "reconstructed": ("D", MARK),
              "epoch": ("o", AFTER), "final ONNX": ("*", "#31a354")}
    for label, x, y in zip([p[0] for p in points], xs, ys):
        kind = next(k for k in styles if label.startswith(k))
        marker, color = styles[kind]
        ax.scatter([x], [y], marker=marker, color=color, s=110 if kind == "final ONNX" else 45, zorder=2)
        ax.annotate(f"{label}: {y:.1f}%", (x, y), textcoords="offset points",
                    xytext=(8, 6) if kind == "final ONNX" else (6, -9), fontsize=7)
    span = max(xs) - min(xs)
    ax.set_xlim(min(xs) - 0.05 * (span or 1), max(xs) + 0.3 * (span or 1))
    ax.set_xlabel("fine-tuning epoch (prunes at their place in the cycle)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Accuracy along the run")
    ax.grid(alpha=0.3)
    return Drawn("accuracy", "Accuracy along the run", fig,
                 {"label": [p[0] for p in points], "epoch": xs, "accuracy": [p[2] for p in points]})


def draw_latency(report: dict[str, Any]) -> Drawn | None:
    """Median latency of the original and the compressed model at each validated batch size, with the spread."""
    lat = report.get("latency_ms") or {}
    keys = sorted(lat, key=lambda k: int(k.removeprefix("batch")) if k.removeprefix("batch").isdigit() else 0)
    if not keys:
        return None
    fig, axes = _figure(3.2 * len(keys) + 1, 3.8, cols=len(keys))
    series: dict[str, list[Any]] = {"batch": [], "original": [], "compressed": [], "original_spread": [],
                                    "compressed_spread": [], "speedup": []}
    for ax, k in zip(axes, keys):
        v = lat[k]
        o, c = num(v.get("original")), num(v.get("compressed"))
        so, sc = num(v.get("original_spread")), num(v.get("compressed_spread"))
        series["batch"].append(k.removeprefix("batch"))
        for key, value in (("original", o), ("compressed", c), ("original_spread", so), ("compressed_spread", sc),
                           ("speedup", num(v.get("speedup")))):
            series[key].append(value)
        half = [0 if math.isnan(s) else s / 2 for s in (so, sc)]
        # a spread wider than the median would draw the bar's whisker below zero: a time is never negative
        yerr = [[h if math.isnan(v) else min(h, v) for h, v in zip(half, (o, c))], half]
        ax.bar([0, 1], [o, c], yerr=yerr, capsize=6, color=[BEFORE, AFTER])
        ax.set_xticks([0, 1], ["original", "compressed"])
        speed = num(v.get("speedup"))
        ax.set_title(f"batch {k.removeprefix('batch')}: " + (f"{speed:.2f}x speed-up" if _ok(speed) else "-"))
        ax.set_ylabel("median ms per batch")
    provider = str((report.get("onnx") or {}).get("provider") or "")
    fig.suptitle(f"Latency, {provider.replace('ExecutionProvider', '')} (bars: interquartile range of the runs)",
                 fontsize=10)
    return Drawn("latency", "Latency original vs compressed", fig, series)


def draw_latency_search(report: dict[str, Any]) -> Drawn | None:
    """For a latency target: each candidate's FLOPs ratio vs its measured latency ratio, the chosen one marked."""
    lat = (report.get("targets") or {}).get("latency")
    if not lat or not lat.get("probes"):
        return None
    probes = lat["probes"]
    fr = [num(p.get("flops_ratio")) for p in probes]
    lr = [num(p.get("latency_ratio")) for p in probes]
    sp = [num(p.get("spread")) for p in probes]
    meets = [bool(p.get("meets")) for p in probes]
    chosen_ratio = num(lat.get("flops_ratio_chosen"))
    chosen = [_ok(chosen_ratio) and abs(num(p.get("flops_target")) - chosen_ratio) < 1e-9 for p in probes]
    fig, (ax,) = _figure(6, 4.4)
    for want, color, label in ((True, "#31a354", "meets the target"), (False, BAD, "misses it")):
        idx = [i for i, m in enumerate(meets) if m == want and _ok(fr[i]) and _ok(lr[i])]
        if idx:
            ax.errorbar([fr[i] for i in idx], [lr[i] for i in idx], yerr=[0 if math.isnan(sp[i]) else sp[i] for i in idx],
                        fmt="o", color=color, capsize=3, label=label)
    for i, c in enumerate(chosen):
        if c and _ok(fr[i]) and _ok(lr[i]):
            ax.scatter([fr[i]], [lr[i]], s=260, facecolors="none", edgecolors="black", lw=2, label="chosen", zorder=3)
    target = num(lat.get("requested_ratio"))
    if _ok(target):
        ax.axhline(target, color="#636363", ls="--", lw=1, label=f"target {target:g}")
    ax.plot([0, 1], [0, 1], color="#bdbdbd", lw=0.8, label="latency = FLOPs")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.05 * max([1.0] + [v for v in lr if _ok(v)]))
    ax.set_xlabel("FLOPs ratio of the candidate")
    ax.set_ylabel(f"measured latency ratio (batch {lat.get('batch')})")
    ax.set_title("Candidates of the latency search")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return Drawn("latency_search", "Latency search candidates", fig,
                 {"flops_ratio": fr, "latency_ratio": lr, "spread": sp, "meets": meets, "chosen": chosen})


def stability_points(report: dict[str, Any]) -> tuple[str, list[float], list[float], list[float], float | None] | None:
    """(kind, steps, jaccard, jaccard averaged, step pruned at) of an ``ocs`` or ``cyclical`` schedule."""
    sched = report.get("schedule") or {}
    details = sched.get("details") or {}
    events = sched.get("events") or []
    pruned = num(events[-1].get("step")) if events else math.nan
    if details.get("stability"):
        curve = [p for p in details["stability"] if _ok(p.get("jaccard"))]
        at = num(details.get("pruned_at_step"))
        return ("ocs", [num(p.get("step")) for p in curve], [num(p.get("jaccard")) for p in curve],
                [num(p.get("jaccard_avg")) for p in curve], at if _ok(at) else (pruned if _ok(pruned) else None))
    if details.get("kept_set_change"):
        length = num(details.get("cycle_steps"))
        changes = details["kept_set_change"]
        steps = [(i + 2) * length if _ok(length) else float(i + 1) for i in range(len(changes))]
        return ("cyclical", steps, [num(c.get("jaccard")) for c in changes], [], pruned if _ok(pruned) else None)
    return None


def draw_stability(report: dict[str, Any]) -> Drawn | None:
    """For ``ocs`` and ``cyclical``: how stable the kept channel sets were, and where the schedule pruned."""
    found = stability_points(report)
    if found is None:
        return None
    kind, steps, jac, avg, pruned = found
    fig, (ax,) = _figure(7, 4)
    if kind == "ocs":
        ax.plot(steps, jac, "o-", ms=3, color=BEFORE, label="Jaccard, check t vs t-2")
        if any(_ok(v) for v in avg):
            ax.plot(steps, avg, "-", color=AFTER, lw=1.6, label="mean of the last 3")
        threshold = num((report.get("schedule") or {}).get("details", {}).get("threshold"))
        if _ok(threshold):
            ax.axhline(threshold, color="#636363", ls="--", lw=1, label=f"threshold {threshold:g}")
        ax.set_title("OCS: stability of the kept sub-network")
    else:
        ax.plot(steps, jac, "o-", color=AFTER, label="Jaccard of the kept sets, cycle end vs the previous")
        ax.set_title("Cyclical: change of the kept channels from cycle to cycle")
    if pruned is not None:
        ax.axvline(pruned, color=BAD, lw=1.5, label=f"pruned at step {pruned:g}")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("Jaccard similarity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return Drawn("stability", "Stability of the kept channels", fig,
                 {"kind": [kind], "step": steps, "jaccard": jac, "jaccard_avg": avg,
                  "pruned_at": [] if pruned is None else [pruned]})


DRAWERS: tuple[Callable[[dict[str, Any]], Drawn | None], ...] = (
    draw_channels, draw_shares, draw_accuracy, draw_latency, draw_latency_search, draw_stability)


def draw_all(report: dict[str, Any]) -> list[Drawn]:
    """Every plot this report has the figures for."""
    return [d for d in (draw(report) for draw in DRAWERS) if d is not None]


def save(drawn: Drawn, directory: Path) -> PlotFile:
    """PNG and SVG of one plot under ``directory``; the figure is closed."""
    directory.mkdir(parents=True, exist_ok=True)
    png, svg = directory / f"{drawn.name}.png", directory / f"{drawn.name}.svg"
    drawn.figure.savefig(png, dpi=100)
    drawn.figure.set_layout_engine("none")  # keep the layout the PNG computed: the SVG need not redo it
    drawn.figure.savefig(svg, metadata={"Date": None})
    drawn.figure.clear()
    return PlotFile(drawn.name, drawn.title, png, svg, drawn.series)


def write_plots(report: dict[str, Any], out_dir: Path) -> list[PlotFile]:
    """Draw every plot of ``report`` into ``out_dir/plots/``."""
    return [save(d, out_dir / PLOTS_DIR) for d in draw_all(report)]

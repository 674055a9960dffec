"""Several runs side by side: accuracy against FLOPs and against speed-up, from each run's ``report.json``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ReportError


@dataclass(frozen=True)
class RunSummary:
    """The figures of one run that a comparison shows (None where its report has none)."""

    name: str
    path: Path
    criterion: str | None
    schedule: str | None
    flops_ratio: float | None
    params_ratio: float | None
    accuracy_original: float | None
    accuracy_compressed: float | None
    """ONNX accuracy on the validation split, as validated."""
    speedup_batch1: float | None
    speedup_batch64: float | None
    provider: str | None


@dataclass(frozen=True)
class Comparison:
    runs: list[RunSummary]
    files: list[Path]
    """The figure files written (PNG, SVG, HTML)."""
    series: dict[str, list[Any]]
    """What the figure drew, per run in order."""


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def load_run(directory: Path) -> RunSummary:
    """One run's summary; a ``ReportError`` names a directory without a readable ``report.json``."""
    path = directory / "report.json"
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a directory", hint="pass the --out directories of `compress` runs")
    if not path.is_file():
        raise ReportError(f"{directory} has no report.json", hint="pass the --out directories of `compress` runs")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path} is not a readable JSON report ({exc.__class__.__name__})") from None
    if not isinstance(d, dict):
        raise ReportError(f"{path} is not a compress report (not a JSON object)")
    params = _get(d, "params")
    params_ratio = None
    if _num(_get(params, "original")) and _num(_get(params, "compressed")) is not None:
        params_ratio = _num(params["compressed"]) / _num(params["original"])
    return RunSummary(
        name=directory.resolve().name, path=directory, criterion=_get(d, "criterion"),
        schedule=_get(d, "schedule", "name"), flops_ratio=_num(_get(d, "flops", "achieved_ratio")),
        params_ratio=params_ratio,
        accuracy_original=_num(_get(d, "accuracy", "original_onnx")),
        accuracy_compressed=_num(_get(d, "accuracy", "compressed_onnx")),
        speedup_batch1=_num(_get(d, "latency_ms", "batch1", "speedup")),
        speedup_batch64=_num(_get(d, "latency_ms", "batch64", "speedup")),
        provider=_get(d, "onnx", "provider"))


def _paths(out: Path) -> tuple[Path, Path, Path]:
    stem = out.with_suffix("") if out.suffix.lower() in {".png", ".svg", ".html"} else out
    return stem.with_suffix(".png"), stem.with_suffix(".svg"), stem.with_suffix(".html")


def compare(directories: list[Path], *, out: Path) -> Comparison:
    """Read every run, then draw accuracy vs FLOPs ratio and vs speed-up into ``out`` (.png, .svg and .html)."""
    if not directories:
        raise ReportError("compare needs at least one run directory")
    runs = [load_run(d) for d in directories]
    png, svg, page = _paths(out)
    if not png.parent.is_dir():
        raise ReportError(f"--out {out}: the folder {png.parent} does not exist")
    series = _draw(runs, png, svg)
    _page(runs, png, page)
    return Comparison(runs=runs, files=[png, svg, page], series=series)


def _draw(runs: list[RunSummary], png: Path, svg: Path) -> dict[str, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_f, ax_l = fig.subplots(1, 2)
    series: dict[str, list[Any]] = {"run": [r.name for r in runs], "flops_ratio": [], "accuracy": [],
                                    "speedup_batch1": [], "speedup_batch64": []}
    for r in runs:
        acc = None if r.accuracy_compressed is None else r.accuracy_compressed * 100
        series["flops_ratio"].append(r.flops_ratio)
        series["accuracy"].append(acc)
        series["speedup_batch1"].append(r.speedup_batch1)
        series["speedup_batch64"].append(r.speedup_batch64)
        if acc is None:
            continue
        if r.flops_ratio is not None:
            ax_f.scatter([r.flops_ratio], [acc], color="#08519c", zorder=3)
            ax_f.annotate(r.name, (r.flops_ratio, acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
        for speed, marker, color in ((r.speedup_batch1, "o", "#08519c"), (r.speedup_batch64, "s", "#e6550d")):
            if speed is not None:
                ax_l.scatter([speed], [acc], marker=marker, color=color, zorder=3)
                ax_l.annotate(r.name, (speed, acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    originals = [r.accuracy_original * 100 for r in runs if r.accuracy_original is not None]
    for ax in (ax_f, ax_l):
        for value in sorted(set(round(v, 4) for v in originals)):
            ax.axhline(value, color="#969696", ls=":", lw=1)
            ax.scatter([1.0], [value], marker="D", color="#969696", zorder=2)
        ax.set_ylabel("validation accuracy, ONNX (%)")
        ax.grid(alpha=0.3)
    if originals:
        ax_f.scatter([], [], marker="D", color="#969696", label="original model(s)")
    ax_f.scatter([], [], color="#08519c", label="compressed")
    ax_f.set_xlabel("FLOPs ratio (compressed / original)")
    ax_f.set_title("Accuracy vs FLOPs")
    ax_f.legend(fontsize=8)
    ax_l.scatter([], [], marker="o", color="#08519c", label="batch 1")
    ax_l.scatter([], [], marker="s", color="#e6550d", label="batch 64")
    ax_l.axvline(1.0, color="#969696", ls="--", lw=1)
    providers = sorted({r.provider.replace("ExecutionProvider", "") for r in runs if r.provider})
    ax_l.set_xlabel(f"speed-up (original / compressed latency{', ' + ', '.join(providers) if providers else ''})")
    ax_l.set_title("Accuracy vs speed-up")
    ax_l.legend(fontsize=8)
    fig.savefig(png, dpi=100)
    fig.set_layout_engine("none")
    fig.savefig(svg, metadata={"Date": None})
    return series


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(runs: list[RunSummary]) -> list[tuple[str, ...]]:
    """(run, criterion, schedule, FLOPs ratio, params ratio, accuracy, change in points, speed-ups at batch 1 and 64)."""
    rows = []
    for r in runs:
        change = (None if r.accuracy_original is None or r.accuracy_compressed is None
                  else (r.accuracy_compressed - r.accuracy_original) * 100)
        rows.append((r.name, r.criterion or "-", r.schedule or "-", _fmt(r.flops_ratio, ".3f"), _fmt(r.params_ratio, ".3f"),
                     _fmt(r.accuracy_compressed, ".2%"), "-" if change is None else f"{change:+.2f}",
                     "-" if r.speedup_batch1 is None else f"{r.speedup_batch1:.2f}x",
                     "-" if r.speedup_batch64 is None else f"{r.speedup_batch64:.2f}x"))
    return rows


TABLE_HEADER = ("run", "criterion", "schedule", "FLOPs", "params", "accuracy", "Δ pts", "speed b1", "speed b64")
"""FLOPs and params: ratios to the original; accuracy: ONNX, validation split; speed: speed-up at batch 1 and 64."""


def _page(runs: list[RunSummary], png: Path, page: Path) -> None:
    from .html_report import markdown_to_html

    md = ["# Comparison of compress runs", "", f"![accuracy vs FLOPs and speed-up]({png.name})", "",
          "| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    md += ["| " + " | ".join(row) + " |" for row in table_rows(runs)]
    md += ["", "Runs: " + ", ".join(f"`{r.path}`" for r in runs)]
    page.write_text(markdown_to_html("\n".join(md) + "\n", base=png.parent))

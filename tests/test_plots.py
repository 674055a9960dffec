"""Plots in every report, report.html, and ``compressor compare``: files written, data from the report's figures."""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compressor import html_report, latency, plots
from compressor.cli.compress import app as compress_app
from compressor.cli.toolbox import app as toolbox_app
from _tiny import FlopsTimer, make_images, save_npz, tiny_resnet20

EVERY_PLOT = {"channels", "shares", "accuracy", "latency", "latency_search", "stability"}


def _compress(root: Path, name: str, *extra: str) -> Path:
    model, data = root / "resnet20.pt", root / "data.npz"
    if not model.exists():
        torch.save(tiny_resnet20().state_dict(), model)
        save_npz(data, *make_images())
    out = root / name
    args = [str(model), "--arch", "resnet20", "--data", str(data), "--epochs", "2", "--batch-size", "4",
            "--latency-runs", "4", "--device", "cpu", "--out", str(out), *extra]
    result = CliRunner().invoke(compress_app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny CLI runs: ocs to a latency target (batch 64), and cyclical to half the FLOPs."""
    root = tmp_path_factory.mktemp("plots")
    # The search's candidates are timed by their FLOPs: on a busy machine a tiny model's measured latency
    # can miss any target, and what these tests check is the drawing, not the timing.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(latency, "OnnxTimer", FlopsTimer)
        ocs = _compress(root, "ocs", "--target-latency", "0.9", "--latency-batch", "64", "--schedule", "ocs")
    return {"ocs": ocs, "cyclical": _compress(root, "cyclical", "--target-flops", "0.5", "--schedule", "cyclical")}


@pytest.fixture
def report(runs) -> dict:
    return json.loads((runs["ocs"] / "report.json").read_text())


# -- what a run writes ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_cli_run_writes_every_plot_as_png_and_svg(runs):
    written = {p.stem for p in (runs["ocs"] / "plots").glob("*.png")}
    assert written == EVERY_PLOT
    assert {p.stem for p in (runs["ocs"] / "plots").glob("*.svg")} == EVERY_PLOT
    for p in (runs["ocs"] / "plots").glob("*.png"):
        assert p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 5000
    assert {p.stem for p in (runs["cyclical"] / "plots").glob("*.png")} == EVERY_PLOT - {"latency_search"}


def test_report_md_embeds_every_plot(runs):
    md = (runs["ocs"] / "report.md").read_text()
    linked = set(re.findall(r"!\[[^\]]*\]\(plots/(\w+)\.png\)", md))
    assert linked == EVERY_PLOT
    assert all(f"(plots/{name}.svg)" in md for name in EVERY_PLOT)


def test_report_html_is_self_contained_with_the_images_inlined(runs):
    out = runs["ocs"]
    page = (out / "report.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == len(EVERY_PLOT)
    pngs = {p.read_bytes() for p in (out / "plots").glob("*.png")}
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) in pngs
    for external in ("<script", "<link", "href=", "url(", "src=\"http", "src=\"plots/"):
        assert external not in page
    # The whole report is there, not only the pictures.
    assert "<table>" in page and "Accuracy on the validation split" in page


def test_the_cli_names_the_new_outputs(runs, tmp_path):
    out = _compress(tmp_path, "again", "--target-flops", "0.5", "--epochs", "0")
    assert {"report.html", "plots"} <= {p.name for p in out.iterdir()}


def test_plots_re_render_from_a_saved_report_json(runs, tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "report.json").write_bytes((runs["ocs"] / "report.json").read_bytes())
    files = html_report.write_visual_report(saved)
    assert {p.stem for p in (saved / "plots").glob("*.png")} == EVERY_PLOT
    assert saved / "report.html" in files and "<img" in (saved / "report.html").read_text()


def test_matplotlib_is_imported_only_when_a_report_is_written():
    code = ("import sys, compressor, compressor.report, compressor.pipeline, compressor.cli.compress, "
            "compressor.cli.toolbox; print('matplotlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# -- each plot's data is the report's -----------------------------------------------------------------------------


def _values(seq):
    return [round(v, 6) for v in seq]


def test_channels_come_from_the_report(report):
    changed = copy.deepcopy(report)
    changed["layer_profile"]["layers"][2]["channels_after"] = 3
    drawn = plots.draw_channels(changed)
    assert drawn.series["after"][2] == 3 and plots.draw_channels(report).series["after"][2] != 3
    after_bars = drawn.figure.axes[0].containers[1]
    assert after_bars[2].get_height() == 3
    assert drawn.series["layer"] == [l["layer"] for l in report["layer_profile"]["layers"]]
    # The classifier is protected and marked so.
    assert drawn.series["status"][drawn.series["layer"].index("fc")] == "protected"
    changed["preflight"]["unsafe"] = {"conv1": "pruning it breaks the model"}
    assert plots.draw_channels(changed).series["status"][0] == "unsafe"


def test_shares_come_from_the_report(report):
    changed = copy.deepcopy(report)
    changed["layer_profile"]["layers"][0]["latency_share_compressed"] = 0.4321
    drawn = plots.draw_shares(changed)
    assert drawn.series["latency_compressed"][0] == 0.4321
    heights = [b.get_height() for b in drawn.figure.axes[1].containers[1]]
    assert heights[0] == pytest.approx(43.21)


def test_accuracy_comes_from_the_report(report):
    changed = copy.deepcopy(report)
    changed["finetune"]["history"][-1]["val_accuracy"] = 0.123
    changed["accuracy"]["compressed_onnx"] = 0.456
    drawn = plots.draw_accuracy(changed)
    assert drawn.series["label"][0] == "original" and drawn.series["label"][-1] == "final ONNX"
    assert drawn.series["accuracy"][-1] == 0.456
    assert 0.123 in drawn.series["accuracy"]
    line = drawn.figure.axes[0].lines[0]
    assert 12.3 in _values(line.get_ydata()) and 45.6 in _values(line.get_ydata())
    # Every prune of the schedule and every epoch is a point.
    events, epochs = len(report["schedule"]["events"]), len(report["finetune"]["history"])
    assert sum(l.startswith("pruned") for l in drawn.series["label"]) == events
    assert sum(l.startswith("epoch") for l in drawn.series["label"]) == epochs


def test_latency_comes_from_the_report(report):
    changed = copy.deepcopy(report)
    changed["latency_ms"]["batch64"]["compressed"] = 77.5
    changed["latency_ms"]["batch64"]["compressed_spread"] = 5.0
    drawn = plots.draw_latency(changed)
    assert drawn.series["batch"] == ["1", "64"]
    ax = drawn.figure.axes[1]
    assert ax.patches[1].get_height() == 77.5
    assert drawn.series["compressed_spread"][1] == 5.0
    # a spread wider than the median: the whisker stops at zero, it does not draw a negative time
    changed["latency_ms"]["batch64"]["compressed_spread"] = 400.0
    ax = plots.draw_latency(changed).figure.axes[1]
    lows = [seg[:, 1].min() for coll in ax.collections for seg in coll.get_segments()]
    assert lows and min(lows) == 0.0


def test_latency_search_comes_from_the_report(report):
    lat = report["targets"]["latency"]
    drawn = plots.draw_latency_search(report)
    assert drawn.series["flops_ratio"] == [p["flops_ratio"] for p in lat["probes"]]
    assert sum(drawn.series["chosen"]) == 1
    changed = copy.deepcopy(report)
    changed["targets"]["latency"]["probes"][0]["latency_ratio"] = 0.0123
    changed["targets"]["latency"]["probes"][0]["meets"] = True
    drawn = plots.draw_latency_search(changed)
    assert drawn.series["latency_ratio"][0] == 0.0123
    assert any(0.0123 in _values(l.get_ydata()) for l in drawn.figure.axes[0].lines)


def test_ocs_stability_comes_from_the_report(report):
    curve = report["schedule"]["details"]["stability"]
    i = max(k for k, p in enumerate(curve) if "jaccard" in p)
    changed = copy.deepcopy(report)
    changed["schedule"]["details"]["stability"][i]["jaccard"] = 0.321
    drawn = plots.draw_stability(changed)
    assert drawn.series["kind"] == ["ocs"] and 0.321 in drawn.series["jaccard"]
    assert 0.321 in _values(drawn.figure.axes[0].lines[0].get_ydata())
    assert drawn.series["pruned_at"] == [report["schedule"]["details"]["pruned_at_step"]]


def test_cyclical_stability_comes_from_the_report(runs):
    report = json.loads((runs["cyclical"] / "report.json").read_text())
    changed = copy.deepcopy(report)
    changed["schedule"]["details"]["kept_set_change"][0]["jaccard"] = 0.5
    drawn = plots.draw_stability(changed)
    assert drawn.series["kind"] == ["cyclical"] and drawn.series["jaccard"][0] == 0.5
    assert drawn.series["pruned_at"] == [report["schedule"]["events"][-1]["step"]]


def test_missing_figures_are_tolerated(report):
    bare = copy.deepcopy(report)
    bare.update(layer_profile=None, preflight=None, schedule=None, finetune=None)
    bare["targets"]["latency"] = None
    bare["accuracy"]["pruned_bn_recalibrated"] = None
    bare["latency_ms"]["batch1"]["original_spread"] = None
    bare["latency_ms"]["batch64"]["speedup"] = None
    names = [d.name for d in plots.draw_all(bare)]
    assert names == ["channels", "accuracy", "latency"]
    # Without a layer profile the channels come from the pruned groups.
    assert plots.draw_channels(bare).series["layer"] == [l["group"] for l in report["search"]["layers"]]
    assert plots.draw_all({}) == []


# -- compressor compare -------------------------------------------------------------------------------------------


def test_compare_two_runs(runs, tmp_path):
    out = tmp_path / "cmp.png"
    result = CliRunner().invoke(toolbox_app, ["compare", str(runs["ocs"]), str(runs["cyclical"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for suffix in (".png", ".svg", ".html"):
        assert out.with_suffix(suffix).is_file()
    assert "ocs" in result.stdout and "cyclical" in result.stdout
    page = out.with_suffix(".html").read_text()
    assert 'src="data:image/png;base64,' in page and "<table>" in page


def test_compare_draws_each_runs_figures(runs, tmp_path):
    from compressor.compare import compare

    reports = [json.loads((runs[k] / "report.json").read_text()) for k in ("ocs", "cyclical")]
    c = compare([runs["ocs"], runs["cyclical"]], out=tmp_path / "c.png")
    assert c.series["run"] == ["ocs", "cyclical"]
    assert c.series["flops_ratio"] == [r["flops"]["achieved_ratio"] for r in reports]
    assert c.series["accuracy"] == [pytest.approx(r["accuracy"]["compressed_onnx"] * 100) for r in reports]
    assert c.series["speedup_batch64"] == [r["latency_ms"]["batch64"]["speedup"] for r in reports]
    # Change a figure in one report: the comparison follows.
    edited = tmp_path / "edited"
    edited.mkdir()
    reports[1]["flops"]["achieved_ratio"] = 0.111
    (edited / "report.json").write_text(json.dumps(reports[1]))
    assert compare([runs["ocs"], edited], out=tmp_path / "d.png").series["flops_ratio"][1] == 0.111


def test_compare_a_directory_without_report_json_is_one_line(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(toolbox_app, ["compare", str(runs["ocs"]), str(empty), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "has no report.json" in result.stderr and str(empty) in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "x.png").exists()
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "report.json").write_text("{not json")
    result = CliRunner().invoke(toolbox_app, ["compare", str(broken), "--out", str(tmp_path / "y.png")])
    assert result.exit_code == 2 and "not a readable JSON report" in result.stderr

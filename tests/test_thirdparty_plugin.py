"""A third party's criterion and schedule (with options), packaged on their own in ``thirdparty_plugin/``, work end to end.

Installing it with pip would be slow and need the network, so the test does what an installation
leaves behind: the package on ``sys.path`` and a ``.dist-info`` folder whose ``entry_points.txt`` is
written from the plug-in's own ``pyproject.toml``; ``importlib.metadata`` finds distributions there.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compressor import criteria, schedules
from compressor.cli.compress import app as compress
from compressor.cli.toolbox import app as toolbox
from _tiny import make_images, save_npz, tiny_resnet20

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PLUGIN = Path(__file__).resolve().parent / "thirdparty_plugin"
PROJECT = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
NAME = "example-l1-norm"
SCHEDULE = "example-at"


@contextlib.contextmanager
def installed(site: Path):
    """The plug-in as pip would leave it, for the duration of the block; discovery refreshed both ways."""
    dist_info = site / f"{PROJECT['name'].replace('-', '_')}-{PROJECT['version']}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {PROJECT['name']}\nVersion: {PROJECT['version']}\n")
    (dist_info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
        for group, entry_points in PROJECT["entry-points"].items()))
    added = [str(site), str(PLUGIN)]
    sys.path[:0] = added
    importlib.invalidate_caches()
    criteria.refresh()
    schedules.REGISTRY.refresh()
    try:
        yield
    finally:
        for path in added:
            sys.path.remove(path)
        for module in [m for m in sys.modules if m.split(".")[0] == "compressor_example_criterion"]:
            del sys.modules[module]
        importlib.invalidate_caches()
        criteria.refresh()
        schedules.REGISTRY.refresh()


def test_the_example_registers_what_the_test_expects():
    assert PROJECT["entry-points"][criteria.ENTRY_POINT_GROUP] == {NAME: "compressor_example_criterion:ExampleL1Norm"}
    assert PROJECT["entry-points"][schedules.ENTRY_POINT_GROUP] == {SCHEDULE: "compressor_example_criterion.schedule:PruneAt"}


def test_a_separately_packaged_criterion_runs_through_the_cli(tmp_path):
    model = tmp_path / "resnet20.pt"
    torch.save(tiny_resnet20().state_dict(), model)
    data = save_npz(tmp_path / "data.npz", *make_images())
    out = tmp_path / "out"
    assert NAME not in {info.name for info in criteria.available_criteria()}

    with installed(tmp_path / "site"):
        infos = {info.name: info for info in criteria.available_criteria()}
        listing = CliRunner().invoke(toolbox, ["criteria"], env={"COLUMNS": "200"})
        result = CliRunner().invoke(compress, [
            str(model), "--data", str(data), "--target-flops", "0.5", "--arch", "resnet20", "--criterion", NAME,
            "--epochs", "1", "--batch-size", "16", "--latency-runs", "2", "--device", "cpu", "--out", str(out)])

    assert infos[NAME].distribution == PROJECT["name"] and infos[NAME].version == PROJECT["version"]
    assert "l2" in infos  # the built-ins are still there beside it
    assert listing.exit_code == 0, listing.output
    line = next(line for line in listing.stdout.splitlines() if NAME in line)
    assert PROJECT["name"] in line and "weights" in line and "Example plug-in" in line
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == NAME
    assert report["flops"]["achieved_ratio"] <= 0.5
    # Uninstalled again: discovery no longer sees it and the module is gone.
    assert NAME not in {info.name for info in criteria.available_criteria()}
    assert "compressor_example_criterion" not in sys.modules


def test_a_separately_packaged_schedule_takes_its_own_options(tmp_path):
    model = tmp_path / "resnet20.pt"
    torch.save(tiny_resnet20().state_dict(), model)
    data = save_npz(tmp_path / "data.npz", *make_images())
    out = tmp_path / "out"
    args = [str(model), "--data", str(data), "--target-flops", "0.5", "--arch", "resnet20", "--schedule", SCHEDULE,
            "--epochs", "2", "--batch-size", "16", "--latency-runs", "2", "--device", "cpu", "--out", str(out)]

    with installed(tmp_path / "site"):
        listing = CliRunner().invoke(toolbox, ["schedules"], env={"COLUMNS": "250"})
        unknown = CliRunner().invoke(compress, args + ["--schedule-opt", "when=0.5"])
        bad = CliRunner().invoke(compress, args + ["--schedule-opt", "at=half"])
        out_of_range = CliRunner().invoke(compress, args + ["--schedule-opt", "at=2"])
        result = CliRunner().invoke(compress, args + ["--schedule-opt", "at=0.5", "--schedule-opt", "note=halfway"])

    assert listing.exit_code == 0, listing.output
    assert "at=0.0 (a number): Share of the fine-tuning cycle" in " ".join(listing.stdout.split())
    assert unknown.exit_code == 2 and "--schedule-opt when: schedule 'example-at' has no such option; known: at, note" \
        in unknown.output
    assert bad.exit_code == 2 and "--schedule-opt at=half: expected a number" in bad.output
    assert out_of_range.exit_code == 2 and "at must lie in [0, 1], got 2.0" in out_of_range.output
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["schedule"]["details"]["at"] == 0.5
    [event] = report["schedule"]["events"]
    assert event["reason"] == "halfway at 0.5 of the cycle" and event["step"] == report["schedule"]["details"]["step"] > 0

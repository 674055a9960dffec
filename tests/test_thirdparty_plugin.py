"""A third party's criterion, packaged on its own in ``thirdparty_plugin/``, works end to end.

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

from compressor import criteria
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


@contextlib.contextmanager
def installed(site: Path):
    """The plug-in as pip would leave it, for the duration of the block; discovery refreshed both ways."""
    dist_info = site / f"{PROJECT['name'].replace('-', '_')}-{PROJECT['version']}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {PROJECT['name']}\nVersion: {PROJECT['version']}\n")
    entry_points = PROJECT["entry-points"][criteria.ENTRY_POINT_GROUP]
    (dist_info / "entry_points.txt").write_text(
        f"[{criteria.ENTRY_POINT_GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    added = [str(site), str(PLUGIN)]
    sys.path[:0] = added
    importlib.invalidate_caches()
    criteria.refresh()
    try:
        yield
    finally:
        for path in added:
            sys.path.remove(path)
        for module in [m for m in sys.modules if m.split(".")[0] == "compressor_example_criterion"]:
            del sys.modules[module]
        importlib.invalidate_caches()
        criteria.refresh()


def test_the_example_registers_what_the_test_expects():
    assert PROJECT["entry-points"][criteria.ENTRY_POINT_GROUP] == {NAME: "compressor_example_criterion:ExampleL1Norm"}


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

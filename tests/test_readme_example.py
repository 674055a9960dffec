"""The README's "write your own criterion" example runs as printed, so the README cannot rot.

The Python block is executed as the module its ``pyproject.toml`` snippet names, the snippet must
register it under our entry-point group, and the command printed for the import-path form runs
through the CLI.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compressor import criteria
from compressor.cli.compress import app as compress
from _tiny import make_images, save_npz, tiny_resnet20

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

README = Path(__file__).resolve().parent.parent / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("## Criteria are plug-ins\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", _section(), flags=re.S)


@pytest.fixture
def example(monkeypatch):
    """The README's criterion class, importable under the module name its pyproject snippet uses."""
    (toml,) = _blocks("toml")
    registered = tomllib.loads(toml)["project"]["entry-points"][criteria.ENTRY_POINT_GROUP]
    ((name, value),) = registered.items()
    module_name, _, class_name = value.partition(":")
    (code,) = _blocks("python")
    module = types.ModuleType(module_name)
    monkeypatch.setitem(sys.modules, module_name, module)
    exec(compile(code, f"README.md:{module_name}", "exec"), module.__dict__)
    return name, value, getattr(module, class_name)


def test_the_readme_lists_every_registered_criterion():
    rows = re.findall(r"^\| `([\w-]+)`", _section(), flags=re.M)
    assert sorted(rows) == [info.name for info in criteria.available_criteria()]


def test_the_readme_example_honours_the_contract(example):
    name, value, cls = example
    assert criteria.resolve_criterion(value) is cls
    assert cls.needs_gradients is False
    assert isinstance(cls(), criteria.Criterion)
    assert (cls.__doc__ or "").strip(), "`compressor criteria` shows the docstring's first line"
    commands = [shlex.split(line) for line in _blocks("bash")[0].splitlines() if line.startswith("compress ")]
    assert [c[c.index("--criterion") + 1] for c in commands] == [name, value]


def test_the_readme_example_runs_through_the_cli(example, tmp_path):
    name, value, cls = example
    model = tmp_path / "resnet20.pt"
    torch.save(tiny_resnet20().state_dict(), model)
    data = save_npz(tmp_path / "data.npz", *make_images())
    out = tmp_path / "out"

    result = CliRunner().invoke(compress, [
        str(model), "--data", str(data), "--target-flops", "0.5", "--arch", "resnet20", "--criterion", value,
        "--epochs", "1", "--batch-size", "16", "--latency-runs", "2", "--device", "cpu", "--out", str(out)])

    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == value
    assert 0.495 <= report["flops"]["achieved_ratio"] <= 0.5

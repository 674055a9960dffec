"""The installed package is complete: entry points, console scripts, sub-packages and demo assets."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.loading import load_model
from compressor.plugins.magnitude import GroupL2

DEMO_MODEL = "resnet20_fmnist.pt"
DEMO_DATA = "fmnist_sample.npz"


def test_l2_entry_point_is_installed_and_loads():
    eps = {ep.name: ep for ep in metadata.entry_points(group="compressor.criteria")}
    assert "l2" in eps
    assert eps["l2"].load() is GroupL2
    assert eps["l2"].dist is not None and eps["l2"].dist.name == "compressor"


def test_console_scripts_are_registered():
    scripts = {ep.name: ep for ep in metadata.entry_points(group="console_scripts")
               if ep.dist is not None and ep.dist.name == "compressor"}
    assert scripts["compress"].value == "compressor.cli.compress:main"
    assert scripts["compressor"].value == "compressor.cli.toolbox:main"
    for ep in scripts.values():
        assert callable(ep.load())


def _script(name: str) -> Path:
    path = Path(sys.executable).parent / (name + (".exe" if os.name == "nt" else ""))
    if not path.exists():
        pytest.skip(f"no {name} script next to {sys.executable} (not installed into this environment)")
    return path


def test_compress_help_runs_as_a_program():
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([str(_script("compress")), "--help"], capture_output=True, text=True, timeout=60, env=env)

    assert done.returncode == 0, done.stderr
    assert "--target-flops" in done.stdout
    assert "MACs" in done.stdout


def test_toolbox_runs_as_a_program():
    done = subprocess.run([str(_script("compressor")), "models"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "resnet20" in done.stdout.split()


def test_the_command_line_does_not_import_torch_before_it_is_needed():
    code = "import sys, compressor, compressor.cli.compress, compressor.cli.toolbox; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["compressor", "compressor.models", "compressor.cli", "compressor.cli.compress",
                                  "compressor.cli.toolbox", "compressor.plugins", "compressor.plugins.magnitude"])
def test_subpackages_import(name):
    module = importlib.import_module(name)
    assert module.__name__ == name


def test_public_names():
    import compressor

    for name in compressor.__all__:
        assert getattr(compressor, name) is not None, name
    with pytest.raises(AttributeError):
        compressor.no_such_name  # noqa: B018


def test_demo_assets_are_packaged():
    demo = resources.files("compressor.models") / "demo"
    assert (demo / DEMO_MODEL).is_file()
    assert (demo / DEMO_DATA).is_file()


def test_demo_model_loads_and_classifies_the_demo_sample():
    demo = resources.files("compressor.models") / "demo"
    with resources.as_file(demo / DEMO_MODEL) as model_file, resources.as_file(demo / DEMO_DATA) as data_file:
        loaded = load_model(model_file, arch="resnet20", image_size=28)
        with np.load(data_file) as archive:
            images, labels = archive["images"][:200], archive["labels"][:200]

    assert loaded.kind == "state_dict"
    assert loaded.arch["kwargs"]["in_channels"] == 1 and loaded.arch["kwargs"]["num_classes"] == 10
    # The Makefile's demo normalisation (--mean 0.2860 --std 0.3530).
    x = (torch.from_numpy(images).float().div(255).unsqueeze(1) - 0.2860) / 0.3530
    with torch.no_grad():
        logits = loaded.model(x)
    assert logits.shape == (200, 10)
    # A sanity check that the shipped weights are trained, not a benchmark: chance is 10%.
    assert (logits.argmax(1).numpy() == labels).mean() > 0.5

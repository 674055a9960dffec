"""``compressor inspect`` and the library call behind it."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from compressor import compress
from compressor.errors import GraphError

from compressor.cli.toolbox import app as toolbox
from compressor.models import create_model
from compressor.preflight import inspect_model


def test_inspection_of_the_vit_finds_heads_position_embedding_and_classifier():
    model = create_model("vit_tiny", num_classes=10, in_channels=1, image_size=16).eval()
    model.patch_embed.weight.requires_grad_(False)

    report = inspect_model(model, torch.randn(1, 1, 16, 16))

    assert report.protected == {"head": "classifier (its width is the number of classes)"}
    assert report.attention == [f"blocks.{i}.attn" for i in range(4)]
    assert report.unwrapped == ["pos_embed"]
    assert report.frozen == ["patch_embed.weight"]
    assert {g.root for g in report.groups} >= {"blocks.0.fc1", "blocks.0.attn.proj"}
    assert 0 < report.min_reachable_ratio < 0.5
    head = model.head
    assert report.held_macs == {"head": head.in_features * head.out_features + head.out_features}  # weights and bias
    assert report.held_share("head") == f" ({100 * report.held_macs['head'] / report.macs:.1f}% of the MACs)"


def test_inspect_command_lists_groups_and_the_floor(model_path):
    result = CliRunner().invoke(toolbox, ["inspect", str(model_path), "--arch", "resnet20", "--input-shape", "1,16,16"])

    assert result.exit_code == 0, result.output
    assert "layers.6.shortcut.0" in result.stdout
    assert "protected: fc" in result.stdout
    assert "smallest reachable FLOPs ratio" in result.stdout


def test_inspect_command_rejects_a_bad_shape_in_one_line(model_path):
    result = CliRunner().invoke(toolbox, ["inspect", str(model_path), "--arch", "resnet20", "--input-shape", "16,16"])

    assert result.exit_code == 2
    assert "--input-shape" in result.stderr
    assert "Traceback" not in result.output


def test_a_fully_frozen_model_is_refused_before_any_work():
    model = create_model("resnet20", num_classes=10, in_channels=1, image_size=16).eval().requires_grad_(False)

    with pytest.raises(GraphError, match="every parameter of the model is frozen"):
        inspect_model(model, torch.randn(1, 1, 16, 16))


def test_a_model_with_nothing_prunable_is_refused_with_what_is_protected():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()  # the only layer is the classifier

    with pytest.raises(GraphError, match=r"nothing in the model can be pruned.*\(protected: 1: classifier"):
        inspect_model(model, torch.randn(1, 1, 4, 4))


def test_compress_refuses_a_frozen_model_and_writes_nothing(tmp_path, make_config, data_path, resnet20):
    path = tmp_path / "frozen.pt"
    torch.save(resnet20.requires_grad_(False), path)
    config = make_config(model_path=path, arch=None, trust_pickle=True)

    with pytest.raises(GraphError, match="frozen"):
        compress(config)
    assert not config.output_dir.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []


def test_inspection_names_the_groups_the_safety_net_leaves_unpruned():
    from helpers_arch import HardCodedWidth

    torch.manual_seed(0)
    report = inspect_model(HardCodedWidth().eval(), torch.randn(1, 1, 8, 8))

    assert list(report.unsafe) == ["conv1"] and report.unsafe["conv1"].startswith("RuntimeError")
    assert {g.root for g in report.groups} == {"conv0", "conv1"}  # still a group, just not pruned
    assert report.min_reachable_ratio is not None and report.min_reachable_ratio < 0.5  # conv0 alone


def test_inspect_command_lists_the_unsafe_groups(tmp_path):
    from helpers_arch import HardCodedWidth

    path = tmp_path / "hard.pt"
    torch.save(HardCodedWidth().state_dict(), path)
    result = CliRunner().invoke(toolbox, ["inspect", str(path), "--arch", "helpers_arch:HardCodedWidth",
                                          "--input-shape", "1,8,8"])

    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())  # rich wraps long lines
    assert re.search(r"left unpruned: conv1 \(\d+\.\d% of the MACs\): pruning it breaks the model \(RuntimeError", out)
    assert "smallest reachable FLOPs ratio at --max-prune-per-group 0.75" in out
    assert "smallest reachable FLOPs ratio at 0.9, the most `compress` raises the cap to where a target needs it" in out


def test_a_model_with_no_unsafe_group_lists_none():
    report = inspect_model(create_model("resnet20", num_classes=10, in_channels=1, image_size=16).eval(),
                           torch.randn(1, 1, 16, 16))
    assert report.unsafe == {}


def test_compress_goes_round_a_group_that_breaks_the_model_and_reports_it(tmp_path):
    import json

    import numpy as np

    from compressor.cli.compress import app
    from helpers_arch import HardCodedWidth

    torch.manual_seed(0)
    torch.save(HardCodedWidth().state_dict(), tmp_path / "hard.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", images=rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8),
             labels=np.arange(60) % 3)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(tmp_path / "hard.pt"), "--arch", "helpers_arch:HardCodedWidth",
                                      "--data", str(tmp_path / "data.npz"), "--target-flops", "0.5", "--epochs", "1",
                                      "--round-to", "1", "--out", str(out)])

    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert list(report["preflight"]["unsafe"]) == ["conv1"]
    assert 0.495 <= report["flops"]["achieved_ratio"] <= 0.5
    assert any("conv1" in w and "left unpruned" in w for w in report["warnings"])

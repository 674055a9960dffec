"""``--attention heads``: whole heads go, ``num_heads`` shrinks and ``head_dim`` stays, in timm's
layout (the tiny ViT of ``models/``) and in ``nn.MultiheadAttention`` (torchvision's layout)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from compressor import criteria, flops, graph, pruning
from compressor.errors import ConfigError, GraphError
from compressor.export import INPUT_NAME, export_onnx
from compressor.models import create_model
from compressor.validate import open_session
from test_graph_layouts import TinyMHA

SIZE = 16


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return create_model("vit_tiny", num_classes=4, in_channels=1, image_size=SIZE).eval()


def _mha() -> nn.Module:
    torch.manual_seed(0)
    return TinyMHA().eval()


def _example() -> torch.Tensor:
    return torch.randn(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _search(coupling: graph.CouplingGraph, target: float = 0.5, **kwargs):
    scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))
    kwargs.setdefault("max_prune_fraction", 0.75)
    return pruning.search(coupling, scores, target_ratio=target, **kwargs)


def _qkv_bias(attn: nn.Module) -> torch.Tensor:
    return attn.in_proj_bias if isinstance(attn, nn.MultiheadAttention) else attn.qkv.bias


def _kept_heads(model: nn.Module, plan: pruning.PruningPlan, name: str, head_dim: int) -> list[int]:
    """The heads of attention module ``name`` that ``plan`` keeps, read from q, k and v biases marked
    with their channel index; fails unless q, k and v keep the same whole heads."""
    marked = copy.deepcopy(model)
    bias = _qkv_bias(marked.get_submodule(name))
    width = bias.numel() // 3
    with torch.no_grad():
        bias.copy_(torch.arange(3 * width, dtype=bias.dtype) % width + 1000 * (torch.arange(3 * width) // width))
    pruned = pruning.pruned_copy(graph.trace(marked, _example(), attention_pruning="heads"), plan)
    q, k, v = _qkv_bias(pruned.get_submodule(name)).detach().long().view(3, -1)
    assert torch.equal(k - 1000, q) and torch.equal(v - 2000, q)
    heads = sorted({int(c) // head_dim for c in q})
    assert q.tolist() == [h * head_dim + i for h in heads for i in range(head_dim)], "a head was split"
    return heads


def _onnx_matches(model: nn.Module, path) -> float:
    batch = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        reference = model(batch).numpy()
    export_onnx(model, path, example_input=_example(), metadata={})
    out = open_session(path, device="cpu").run(None, {INPUT_NAME: batch.numpy()})[0]
    return float(np.abs(out - reference).max())


# -- timm's layout ----------------------------------------------------------------------------------------


def test_timm_groups_count_heads():
    coupling = graph.trace(_vit(), _example(), attention_pruning="heads")

    heads = [g for g in coupling.groups if g.heads_of]
    assert [g.heads_of for g in heads] == [(f"blocks.{i}.attn",) for i in (3, 2, 1, 0)]
    for g in heads:
        assert (g.units, g.unit_width, g.ch_groups, g.size) == (4, 24, 1, 96)
        assert g.expand([1]) == list(range(24, 48))
    assert all(g.unit_width == 1 for g in coupling.groups if not g.heads_of)


def test_removing_a_timm_head_equals_silencing_it():
    model = _vit()
    coupling = graph.trace(model, _example(), attention_pruning="heads")
    spec = next(g for g in coupling.groups if g.heads_of == ("blocks.1.attn",))

    pruned = pruning.pruned_copy(coupling, pruning.PruningPlan({spec.index: (1, 3)}))

    attn = pruned.get_submodule("blocks.1.attn")
    assert (attn.num_heads, attn.head_dim, attn.qkv.out_features, attn.proj.in_features) == (2, 24, 144, 48)
    silenced = _vit()
    with torch.no_grad():  # heads 1 and 3 contribute nothing once the projection ignores them
        silenced.get_submodule("blocks.1.attn.proj").weight[:, 24:48] = 0
        silenced.get_submodule("blocks.1.attn.proj").weight[:, 72:96] = 0
        x = torch.randn(2, 1, SIZE, SIZE)
        torch.testing.assert_close(pruned(x), silenced(x), atol=1e-5, rtol=1e-4)


def test_timm_heads_prune_to_the_target_and_match_onnxruntime(tmp_path):
    model = _vit()
    coupling = graph.trace(model, _example(), attention_pruning="heads")

    pruned, result = _search(coupling)

    assert 0.495 <= result.achieved_ratio <= 0.5
    assert result.attention_pruning == "heads"
    assert [h.module for h in result.heads] == coupling.attention
    assert any(h.heads_after < h.heads_before for h in result.heads), "no head was removed"
    for h in result.heads:
        attn = pruned.get_submodule(h.module)
        assert h.heads_before == 4 and 1 <= h.heads_after == attn.num_heads
        assert h.head_dim_before == h.head_dim_after == attn.head_dim == 24
        assert attn.qkv.out_features == 3 * attn.num_heads * 24 == 3 * attn.proj.in_features
        assert len(_kept_heads(model, result.plan, h.module, 24)) == attn.num_heads
    assert model.blocks[0].attn.num_heads == 4  # the original keeps its heads
    assert flops.measure(pruned, coupling.example_input).macs == result.pruned.macs
    assert _onnx_matches(pruned, tmp_path / "vit.onnx") < 1e-4


def test_rounding_never_splits_a_head():
    coupling = graph.trace(_vit(), _example(), attention_pruning="heads")

    pruned, result = _search(coupling, 0.6, round_to=16)

    assert 0.594 <= result.achieved_ratio <= 0.6
    heads = {g.root for g in coupling.groups if g.heads_of}
    assert not heads & set(result.off_multiple)
    for change in result.layers:
        if change.group in heads:
            assert change.after % 24 == 0 and change.after >= 24  # whole heads, whatever --round-to
    assert pruning.min_units(next(g for g in coupling.groups if g.heads_of), max_fraction=0.75, round_to=16) == 1


def test_every_attention_module_keeps_a_head():
    coupling = graph.trace(_vit(), _example(), attention_pruning="heads")
    floor = _search(coupling, 0.9, max_prune_fraction=0.9)[1].min_reachable_ratio

    pruned, result = _search(coupling, min(floor + 0.01, 0.99), max_prune_fraction=0.9)

    assert all(h.heads_after >= 1 for h in result.heads)
    assert any(h.heads_after == 1 for h in result.heads), "the cap never bound, so this test checked nothing"
    with torch.no_grad():
        assert pruned(torch.randn(2, 1, SIZE, SIZE)).shape == (2, 4)


def test_dims_mode_is_unchanged():
    coupling = graph.trace(_vit(), _example())
    assert coupling.attention_pruning == "dims"
    assert [(g.root, g.size, g.ch_groups, g.units) for g in coupling.groups] == [
        (g.root, g.size, g.ch_groups, g.units) for g in graph.trace(_vit(), _example(), attention_pruning="dims").groups]
    assert all(g.unit_width == 1 and not g.heads_of for g in coupling.groups)

    pruned, result = _search(coupling)

    assert result.attention_pruning == "dims"
    assert all(h.heads_after == h.heads_before == 4 for h in result.heads)
    assert any(h.head_dim_after < h.head_dim_before for h in result.heads)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="--attention"):
        graph.trace(_vit(), _example(), attention_pruning="rows")


# -- nn.MultiheadAttention ------------------------------------------------------------------------------


def test_multihead_attention_loses_whole_heads_and_matches_onnxruntime(tmp_path):
    model = _mha()
    coupling = graph.trace(model, _example(), attention_pruning="heads")
    stream = next(g for g in coupling.groups if g.heads_of)
    assert stream.heads_of == ("attn",) and (stream.units, stream.unit_width) == (4, 8)

    pruned, result = _search(coupling)

    assert 0.495 <= result.achieved_ratio <= 0.5
    attn = pruned.attn
    assert [(h.module, h.heads_before, h.head_dim_before, h.head_dim_after) for h in result.heads] == [("attn", 4, 8, 8)]
    assert 1 <= attn.num_heads == result.heads[0].heads_after < 4
    assert attn.head_dim == 8 and attn.embed_dim == attn.num_heads * 8 == attn.out_proj.out_features
    assert attn.in_proj_weight.shape == (3 * attn.embed_dim, attn.embed_dim)
    assert pruned.class_token.shape[-1] == pruned.hidden_dim == attn.embed_dim
    assert len(_kept_heads(model, result.plan, "attn", 8)) == attn.num_heads
    assert _onnx_matches(pruned, tmp_path / "mha.onnx") < 1e-4


class TwoHeadCounts(nn.Module):
    """Two nn.MultiheadAttention on one residual stream, with 4 and 2 heads: a head of one is not a head of the other."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(SIZE, dim)
        self.attn1 = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.attn2 = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x[:, 0])
        x = x + self.attn1(x, x, x, need_weights=False)[0]
        x = x + self.attn2(x, x, x, need_weights=False)[0]
        return self.head(x.mean(1))


def test_different_head_counts_on_one_stream_are_refused_with_heads_and_pruned_with_dims():
    torch.manual_seed(0)
    model = TwoHeadCounts().eval()

    with pytest.raises(GraphError, match="different head counts") as info:
        graph.trace(model, _example(), attention_pruning="heads")
    assert "attn1 (4)" in str(info.value) and "attn2 (2)" in str(info.value)
    assert info.value.hint == "use --attention dims"

    coupling = graph.trace(model, _example(), attention_pruning="dims")
    assert any(g.ch_groups == 4 for g in coupling.groups)


# -- the command line -----------------------------------------------------------------------------------


@pytest.fixture
def vit_path(tmp_path):
    path = tmp_path / "vit.pt"
    torch.save(_vit().state_dict(), path)
    return path


def test_compress_with_attention_heads_reports_the_heads(tmp_path, vit_path, data_path):
    from typer.testing import CliRunner

    from compressor.cli.compress import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(vit_path), "--arch", "vit_tiny", "--data", str(data_path), "--target-flops",
                                      "0.5", "--attention", "heads", "--epochs", "1", "--batch-size", "16",
                                      "--latency-runs", "2", "--device", "cpu", "--round-to", "1", "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert "Attention heads" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["attention"]["pruning"] == "heads"
    modules = report["attention"]["modules"]
    assert [m["module"] for m in modules] == [f"blocks.{i}.attn" for i in range(4)]
    assert all(m["head_dim_before"] == m["head_dim_after"] == 24 for m in modules)
    assert all(1 <= m["heads_after"] <= m["heads_before"] == 4 for m in modules)
    assert any(m["heads_after"] < 4 for m in modules)
    assert 0.495 <= report["flops"]["achieved_ratio"] <= 0.5
    assert report["onnx"]["max_abs_diff"] < 1e-4
    assert "## Attention heads (`--attention heads`" in (out / "report.md").read_text()


def test_compress_refuses_an_unknown_attention_mode(tmp_path, vit_path, data_path):
    from typer.testing import CliRunner

    from compressor.cli.compress import app

    result = CliRunner().invoke(app, [str(vit_path), "--arch", "vit_tiny", "--data", str(data_path), "--target-flops",
                                      "0.5", "--attention", "rows", "--out", str(tmp_path / "out")])

    assert result.exit_code == 2
    assert "--attention must be dims or heads" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_inspect_with_attention_heads_counts_heads(vit_path):
    from typer.testing import CliRunner

    from compressor.cli.toolbox import app as toolbox

    args = ["inspect", str(vit_path), "--arch", "vit_tiny", "--input-shape", f"1,{SIZE},{SIZE}"]
    heads = CliRunner().invoke(toolbox, args + ["--attention", "heads"], env={"COLUMNS": "200"})
    dims = CliRunner().invoke(toolbox, args, env={"COLUMNS": "200"})

    assert heads.exit_code == 0, heads.output
    assert "attention: blocks.0.attn: 4 heads of 24 (whole heads pruned; head_dim stays)" in heads.stdout
    assert "4 heads" in heads.stdout.split("attention:")[0]  # the group table counts its units in heads
    assert dims.exit_code == 0, dims.output
    assert "attention: blocks.0.attn: 4 heads of 24 (head dimensions pruned alike in every head" in dims.stdout

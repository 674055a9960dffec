"""torch-pruning behind one wall: our index mappings act on our graphs only, a missing private name or
an unsupported version is named, and only what a broken prune raises means "this group breaks the model"."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch_pruning as tp
from torch import nn

from compressor import graph, pruning, tp_compat
from compressor.prune import apply
from compressor.errors import GraphError

from helpers_arch import FlatNet, HardCodedWidth


def _shufflenet() -> tuple[nn.Module, torch.Tensor]:
    """A small ShuffleNet whose channel shuffle makes stock torch-pruning divide by zero while tracing."""
    shufflenetv2 = pytest.importorskip("torchvision.models.shufflenetv2")
    torch.manual_seed(0)
    return shufflenetv2.ShuffleNetV2([4, 1, 1], [8, 16, 32, 64, 128], num_classes=3).eval(), torch.randn(1, 3, 32, 32)


def _stock_trace(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)


@pytest.fixture
def fresh_check():
    """``tp_compat.check`` runs again in the test, and again for whoever comes next."""
    tp_compat.check.cache_clear()
    yield
    tp_compat.check.cache_clear()


def test_importing_compressor_changes_nothing_in_torch_pruning():
    code = """
import torch_pruning as tp
from torch_pruning.dependency import index_mapping as im
before = {name: getattr(im, name) for name in dir(im)}
call, groups = im._FlattenIndexMapping.__call__, tp.DependencyGraph.get_all_groups
import compressor, compressor.graph, compressor.pruning, compressor.schedules, compressor.tp_compat
import compressor.plugins.lookahead, compressor.plugins.schedules
assert {name: getattr(im, name) for name in dir(im)} == before
assert im._FlattenIndexMapping.__call__ is call and tp.DependencyGraph.get_all_groups is groups
print("stock")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stock"


def test_a_plain_dependency_graph_behaves_as_stock_after_compressor_traced_the_same_model():
    model, example = _shufflenet()
    traced = graph.trace(model, example)  # ours: the shuffled groups are left unpruned, the trace goes on
    assert traced.groups
    assert any("cannot map" in why for why in traced.protected.values())
    with pytest.raises(ZeroDivisionError):  # stock torch-pruning, in the same process, fails as it always did
        _stock_trace(model, example)


def test_a_plain_graph_gets_torch_pruning_s_own_flatten_mapping_and_no_cache():
    model = FlatNet().eval()
    example = torch.randn(1, 1, 16, 16)
    ours = graph.trace(model, example).dg
    plain = _stock_trace(model, example)
    mappings = lambda dg: [type(m).__name__ for node in dg.module2node.values() for dep in node.dependencies
                           for m in dep.index_mapping if m is not None]
    assert "_BoundedFlatten" in mappings(ours)
    assert "_BoundedFlatten" not in mappings(plain) and "_FlattenIndexMapping" in mappings(plain)
    assert not hasattr(plain, "_mapping_key")


@pytest.mark.parametrize("module, name", [(m, n) for m, names in tp_compat.PRIVATE_NAMES.items() for n in names])
def test_a_missing_private_name_fails_clearly_naming_it(module, name, monkeypatch, fresh_check):
    monkeypatch.delattr(importlib.import_module(module), name)
    with pytest.raises(GraphError, match=rf"lacks .*{module}\.{name}.*supported: torch-pruning>=1\.5,<1\.7"):
        tp_compat.check()


@pytest.mark.parametrize("name", tp_compat.GRAPH_ATTRIBUTES)
def test_a_missing_graph_attribute_fails_clearly_naming_it(name, monkeypatch, fresh_check):
    init = tp.DependencyGraph.__init__

    def without(self):
        init(self)
        delattr(self, name)

    monkeypatch.setattr(tp.DependencyGraph, "__init__", without)
    with pytest.raises(GraphError, match=rf"DependencyGraph\(\)\.{name}") as caught:
        graph.trace(HardCodedWidth().eval(), torch.randn(1, 1, 8, 8))  # the check runs before the first trace
    assert 'pip install "torch-pruning>=1.5,<1.7"' in caught.value.hint


def test_a_version_outside_the_supported_range_is_named(monkeypatch, fresh_check):
    monkeypatch.setattr(tp, "__version__", "1.7.0")
    with pytest.warns(UserWarning, match=r"torch-pruning 1\.7\.0 is outside the supported range >=1\.5,<1\.7"):
        tp_compat.check()
    assert tp_compat.version("1.6.0") == (1, 6) and tp_compat.version("dev") == (0, 0)


@pytest.mark.parametrize("bug", [TypeError, AttributeError, NameError])
def test_a_bug_of_ours_in_a_probe_propagates_instead_of_marking_a_group_unsafe(bug, monkeypatch):
    model = HardCodedWidth().eval()
    coupling = graph.trace(model, torch.randn(1, 1, 8, 8))

    def buggy(model):
        raise bug("a bug in compressor")

    monkeypatch.setattr(apply, "patch_attention", buggy)  # runs after every probe's prune
    with pytest.raises(bug, match="a bug in compressor"):
        pruning.unsafe_groups(coupling, max_prune_fraction=0.5)
    with pytest.raises(bug):
        pruning.floor(coupling, max_prune_fraction=0.5)
    scores = [torch.ones(s.units) for s in coupling.groups]
    with pytest.raises(bug):
        pruning.search(coupling, scores, target_ratio=0.5, max_prune_fraction=0.75)


def test_what_a_broken_prune_raises_still_marks_the_group_unsafe():
    coupling = graph.trace(HardCodedWidth().eval(), torch.randn(1, 1, 8, 8))
    unsafe = pruning.unsafe_groups(coupling, max_prune_fraction=0.5)
    assert [coupling.groups[g].root for g in unsafe] == ["conv1"]
    assert unsafe[next(iter(unsafe))].startswith("RuntimeError")

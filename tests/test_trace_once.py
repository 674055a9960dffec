"""One trace per run: every schedule works from the pipeline's traced graph, copied with the model."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp

from compressor import compress
from compressor import graph as graph_module


@pytest.fixture
def traces(monkeypatch):
    """Counts torch-pruning traces, and the traces made outside the tracing budgets' guard."""
    counted = {"traces": 0, "unguarded": 0}
    build = tp.DependencyGraph.build_dependency
    guard = graph_module.watchdog.guard
    depth = {"n": 0}

    def counting(self, *args, **kwargs):
        counted["traces"] += 1
        counted["unguarded"] += depth["n"] == 0
        return build(self, *args, **kwargs)

    def guarded(*args, **kwargs):
        cm = guard(*args, **kwargs)

        class Wrapped:
            def __enter__(self):
                depth["n"] += 1
                return cm.__enter__()

            def __exit__(self, *exc):
                depth["n"] -= 1
                return cm.__exit__(*exc)

        return Wrapped()

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", counting)
    monkeypatch.setattr(graph_module.watchdog, "guard", guarded)
    return counted


@pytest.mark.parametrize("name, overrides", [
    ("gradual", dict(prune_steps=3, epochs=3, batch_size=8)),
    ("ocs", dict(epochs=4, batch_size=8, check_every=1, schedule_span=0.5)),
    ("cyclical", dict(epochs=4, batch_size=8, cycles=2)),
    ("oneshot", dict(epochs=1)),
])
def test_a_run_traces_the_model_once_under_the_budgets(name, overrides, make_config, traces):
    result = compress(make_config(schedule=name, **overrides))
    assert traces == {"traces": 1, "unguarded": 0}
    assert result.prune.achieved_ratio <= 0.5
    if name == "gradual":
        assert len(result.schedule.events) == 3  # three physical prunes, each planned on the pruned graph


class TinyConcat(torch.nn.Module):
    """Two branches joined by a concatenation (DenseNet's coupling), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.a = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 24, 3, padding=1)
        self.mix = torch.nn.Conv2d(16 + 16 + 24, 32, 1)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([x, torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.head(torch.relu(self.mix(x)).mean((2, 3)))


def _specs(coupling):
    return [(s.root, s.handler, s.size, s.ch_groups, s.layers) for s in coupling.groups]


@pytest.mark.parametrize("make", ["concat", "resnet20", "mha-heads"])
def test_a_pruned_copy_of_the_graph_lists_the_groups_a_fresh_trace_finds(make):
    """Pruning through the copied graph, twice, keeps it the graph of the pruned model."""
    import copy

    from _tiny import tiny_resnet20
    from test_graph_layouts import TinyMHA

    from compressor import criteria, pruning

    torch.manual_seed(0)
    model = {"concat": TinyConcat, "resnet20": tiny_resnet20, "mha-heads": TinyMHA}[make]().eval()
    example = torch.randn(1, 1, 16, 16)
    coupling = graph_module.trace(model, example, attention_pruning="heads" if make == "mha-heads" else "dims")
    current = coupling
    for ratio in (0.7, 0.5):
        scores = pruning.score_groups(current, criteria.get_criterion("l2"))
        relative = ratio * pruning.flops.measure(model, example).macs / pruning.flops.measure(current.model, example).macs
        current, _ = pruning.search(current, scores, target_ratio=relative, max_prune_fraction=0.75, with_graph=True)
        fresh = graph_module.trace(copy.deepcopy(current.model), example, attention_pruning=current.attention_pruning)
        assert _specs(current) == _specs(fresh)
        with torch.no_grad():
            assert torch.allclose(current.model(example), fresh.model(example))
    assert pruning.flops.measure(current.model, example).macs <= 0.5 * pruning.flops.measure(model, example).macs

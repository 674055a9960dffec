"""Where FLOPs and time go, per layer: channels before and after, share of MACs, share of measured time.

Times come from onnxruntime's profiler (per-node kernel times), mapped back to PyTorch module names
through the scopes the TorchScript-based exporter writes into node names
(``/layers/layers.0/conv1/Conv`` is module ``layers.0.conv1``). The profile runs at onnxruntime's
"extended" optimisation level: it has every operator fusion of the full level (batch norm folded,
activations fused into the convolution that feeds them, keeping that convolution's name), but not
the CPU EP's NCHWc layout transform, which renames nodes after their outputs so that they no longer
say which layer they came from. Shares are therefore those of a close relative of the timed graph;
the end-to-end latencies in the report are measured at the full level.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import flops
from .graph import module_width

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
PROFILED_RUNS = 10
"""At most this many profiled runs per model, and at least PROFILED_MIN_RUNS: after that, the runs stop
once PROFILE_BUDGET_S seconds have gone (a ResNet-50 at 224 px and batch 64 takes about a second a run
on the CPU EP, and the per-node medians of three runs give the same shares to a point)."""
PROFILED_MIN_RUNS = 3
PROFILE_BUDGET_S = 3.0


@dataclass(frozen=True)
class LayerCost:
    """One convolution or linear layer in the original and the compressed model."""

    layer: str
    channels_before: int
    channels_after: int
    flops_share_original: float
    flops_share_compressed: float
    latency_share_original: float
    latency_share_compressed: float


@dataclass(frozen=True)
class LayerProfile:
    batch: int
    provider: str
    layers: list[LayerCost]
    other_latency_share_original: float
    """Time in nodes that belong to no convolution or linear layer (pooling, adds, reshapes, ...)."""
    other_latency_share_compressed: float


def module_for_node(node: str, modules: set[str]) -> str | None:
    """The module a node name's scopes point to (None where they name no module).

    A scope segment is either the child's attribute name (``conv1``) or, for children of
    containers, its name relative to the enclosing scope (``layers.0`` after ``layers``).
    """
    segments = node.strip("/").split("/")[:-1]
    prefix, local = "", ""
    for seg in segments:
        if local and seg.startswith(local + "."):
            local = seg
        else:
            prefix, local = (prefix + local + "." if local else prefix), seg
    name = prefix + local
    return name if name in modules else None


def layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs of every convolution and linear layer on one example."""
    macs: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, LAYER_TYPES):
            def hook(mod, inputs, output, name=name):
                per_output = mod.in_features if isinstance(mod, nn.Linear) else (
                    mod.in_channels // mod.groups * int(torch.tensor(mod.kernel_size).prod()))
                macs[name] = macs.get(name, 0) + output[:1].numel() * per_output
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example_input[:1])
    finally:
        for h in hooks:
            h.remove()
    return macs


def node_times(onnx_path: Path, *, sample: torch.Tensor, batch: int, device: str) -> tuple[dict[str, float], str]:
    """Median kernel microseconds per ONNX node over a few profiled runs, and the provider used.

    Medians, not sums: on a busy machine a stall lands on whichever node happens to be running.
    """
    import onnxruntime as ort

    from .validate import feed_for, open_session

    with tempfile.TemporaryDirectory() as tmp:
        def configure(options):
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / "profile")
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED

        session = open_session(onnx_path, device=device, configure=configure)
        feed = feed_for(sample, batch)
        start = time.perf_counter()
        for n in range(1, PROFILED_RUNS + 1):
            session.run(None, feed)
            if n >= PROFILED_MIN_RUNS and time.perf_counter() - start > PROFILE_BUDGET_S:
                break
        events = json.loads(Path(session.end_profiling()).read_text())
    runs: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            runs[e["name"].removesuffix("_kernel_time")].append(float(e.get("dur", 0)))
    return {node: statistics.median(us) for node, us in runs.items()}, session.get_providers()[0]


def _latency_shares(times: dict[str, float], modules: set[str]) -> tuple[dict[str, float], float]:
    total = sum(times.values()) or 1.0
    per_layer: dict[str, float] = defaultdict(float)
    other = 0.0
    for node, us in times.items():
        name = module_for_node(node, modules)
        if name is None:
            other += us
        else:
            per_layer[name] += us
    return {k: v / total for k, v in per_layer.items()}, other / total


def layer_profile(original: nn.Module, compressed: nn.Module, original_onnx: Path, compressed_onnx: Path, *,
                  example_input: torch.Tensor, sample: torch.Tensor, batch: int, device: str) -> LayerProfile:
    """The per-layer picture of both models at ``batch`` on the run's execution provider."""
    layers = [name for name, m in original.named_modules() if isinstance(m, LAYER_TYPES)]
    modules = set(layers)
    total_o = flops.measure(original, example_input).macs
    total_c = flops.measure(compressed, example_input).macs
    macs_o, macs_c = layer_macs(original, example_input), layer_macs(compressed, example_input)
    times_o, provider = node_times(original_onnx, sample=sample, batch=batch, device=device)
    times_c, _ = node_times(compressed_onnx, sample=sample, batch=batch, device=device)
    lat_o, other_o = _latency_shares(times_o, modules)
    lat_c, other_c = _latency_shares(times_c, modules)

    def width(model: nn.Module, name: str) -> int:
        return module_width(model.get_submodule(name))

    rows = [LayerCost(layer=name, channels_before=width(original, name), channels_after=width(compressed, name),
                      flops_share_original=macs_o.get(name, 0) / total_o,
                      flops_share_compressed=macs_c.get(name, 0) / total_c,
                      latency_share_original=lat_o.get(name, 0.0), latency_share_compressed=lat_c.get(name, 0.0))
            for name in layers]
    return LayerProfile(batch=batch, provider=provider, layers=rows, other_latency_share_original=other_o,
                        other_latency_share_compressed=other_c)

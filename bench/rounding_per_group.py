"""Does rounding pay per group? One group at a time left off the multiple, timed against the rounded model.

Prunes a model to 0.5 of its FLOPs with ``--round-to M`` (the l2 criterion, no fine-tuning: latency
does not depend on the weights), then builds one variant per prunable group in which that group alone
keeps one unit fewer (an off-multiple width; every other group as in the rounded plan), and the
unrounded plan at the same target. The original, the rounded model and every variant are timed
interleaved in one loop under onnxruntime's CPU EP, so they share the machine's load. Per-layer
rounding (issue 16, item 3) can only pay where leaving a group off the multiple costs little.

    python bench/rounding_per_group.py --models demo,mobilenetv2 --multiple 8 --runs 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.latency import _inputs  # noqa: E402
from compressor import criteria, flops, graph, pruning  # noqa: E402
from compressor.data import load_data  # noqa: E402
from compressor.export import to_onnx_bytes  # noqa: E402
from compressor.loading import load_model  # noqa: E402
from compressor.prune.apply import probe_copy  # noqa: E402
from compressor.validate import feed_for, interleaved_times, open_session  # noqa: E402


def variants(coupling, scores, multiple: int) -> dict:
    """name -> pruned model: the rounded plan, the unrounded one, and the rounded plan with each group one unit short."""
    rounded, result = pruning.search(coupling, scores, target_ratio=0.5, max_prune_fraction=0.75, round_to=multiple)
    _, unrounded = pruning.search(coupling, scores, target_ratio=0.5, max_prune_fraction=0.75, round_to=1)
    models = {f"round-to {multiple}": rounded, "round-to 1": probe_copy(coupling, unrounded.plan)}
    for spec, s in zip(coupling.groups, scores):
        removed = set(result.plan.removed.get(spec.index, ()))
        left = [int(u) for u in torch.argsort(s, stable=True) if int(u) not in removed]
        if len(left) <= 1:
            continue
        plan = dict(result.plan.removed)
        plan[spec.index] = tuple(sorted(removed | {left[0]}))
        kept = (spec.units - len(plan[spec.index])) * spec.unit_channels
        models[f"{spec.root} -> {kept}"] = probe_copy(coupling, pruning.PruningPlan(plan))
    return models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="demo,mobilenetv2")
    p.add_argument("--multiple", type=int, default=8)
    p.add_argument("--runs", type=int, default=40, help="interleaved rounds per batch size")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--out", type=Path, help="JSON rows")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            inputs = _inputs(name, Path(tmp))
            data = load_data(inputs["data_path"], val_fraction=0.2, seed=0, mean=inputs.get("mean"), std=inputs.get("std"))
            model = load_model(inputs["model_path"], arch=inputs["arch"], image_size=data.info.input_shape[-1]).model
            example = data.val_x[:1]
            coupling = graph.trace(model, example)
            scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))
            models = variants(coupling, scores, args.multiple)
            base = flops.measure(model, example).macs
            ratios = {n: flops.measure(m, example).macs / base for n, m in models.items()}
            names = list(models)
            sessions = [open_session(to_onnx_bytes(model, example), device="cpu")]
            sessions += [open_session(to_onnx_bytes(m, example), device="cpu") for m in models.values()]
            for batch in (int(b) for b in args.batches.split(",")):
                times = interleaved_times(sessions, feed_for(data.val_x[:64], batch),
                                          runs=args.runs if batch == 1 else max(5, args.runs // 3))
                original = statistics.median(times[0])
                rounded = statistics.median(times[1])
                for n, t in zip(names, times[1:]):
                    row = {"model": name, "batch": batch, "variant": n,
                           "flops_ratio": ratios[n],
                           "speedup": original / statistics.median(t), "vs_rounded": statistics.median(t) / rounded}
                    rows.append(row)
                    print(f"{name:12s} b{batch:<3d} {n:28s} FLOPs {row['flops_ratio']:.3f}  speed-up {row['speedup']:.2f}x"
                          f"  time vs rounded {row['vs_rounded']:.2f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

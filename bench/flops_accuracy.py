"""Requested vs achieved FLOPs ratio on every model of ``models/`` and the torchvision matrix.

Each model is traced once and pruned (criterion ``l2``, ``--max-prune-per-group 0.75``, the
``compress`` defaults) to each requested ratio with channel counts rounded as ``compress`` rounds them
by default on the CPU EP (multiples of 16, lowered where the target needs finer widths; the row
records the multiple used) and without rounding (1). The achieved ratio is measured again on the pruned model
(torch-pruning's counter, the one ``compress`` reports), not taken from the search. A target the
model cannot reach under the per-group cap is recorded as unreachable with its floor. Random
weights: how many FLOPs a plan removes does not depend on them.

    python bench/flops_accuracy.py --out bench/results/flops_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = (0.7, 0.5, 0.3)
ROUNDING = ("default", "1")


def _models():
    """(name, build) pairs: ``build()`` returns a model and an example input."""
    import torch

    from models import create_model, list_models
    from tests.test_torchvision import CASES, _build

    def ours(name):
        def build():
            torch.manual_seed(0)
            return create_model(name, num_classes=10, in_channels=3, image_size=32).eval(), torch.randn(1, 3, 32, 32)
        return build

    pairs = [(name, ours(name)) for name in list_models()]
    pairs += [(f"torchvision {name}", (lambda n: lambda: _build(n))(name)) for name in CASES]
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    p.add_argument("--round-to", nargs="+", default=list(ROUNDING), help="default (as compress on the CPU EP) or N")
    p.add_argument("--models", help="comma-separated subset of the names (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "flops_accuracy.json")
    args = p.parse_args()

    import torch

    from compressor import criteria, flops, graph, pruning
    from compressor.latency import DEFAULT_ROUND_TO, coarsest_reaching
    from compressor.errors import TargetUnreachableError

    torch.set_num_threads(args.threads)
    wanted = set(args.models.split(",")) if args.models else None
    rows = json.loads(args.out.read_text()) if args.out.exists() else []  # a run that stopped goes on
    done = {r["model"] for r in rows}
    for name, build in _models():
        if (wanted and name not in wanted and name.removeprefix("torchvision ") not in wanted) or name in done:
            continue
        model, example = build()
        start = time.perf_counter()
        coupling = graph.trace(model, example)
        scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))
        for rounding in args.round_to:
            for target in args.targets:
                if rounding == "default":
                    round_to, _ = coarsest_reaching(coupling, target, start=DEFAULT_ROUND_TO["CPUExecutionProvider"],
                                                    max_prune_fraction=0.75)
                else:
                    round_to = int(rounding)
                row = {"model": name, "input": example.shape[-1], "rounding": rounding, "round_to": round_to,
                       "requested": target}
                try:
                    pruned, result = pruning.search(coupling, scores, target_ratio=target, max_prune_fraction=0.75,
                                                    round_to=round_to)
                except TargetUnreachableError as exc:
                    row["unreachable"] = str(exc).splitlines()[0]
                else:
                    measured = flops.measure(pruned, example).macs / result.original.macs
                    row |= {"achieved": round(measured, 4), "search_said": round(result.achieved_ratio, 4),
                            "error_pct": round(100 * (measured - target) / target, 2), "probes": result.probes,
                            "off_multiple": len(result.off_multiple), "unsafe": len(result.unsafe_groups)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        print(f"# {name}: {time.perf_counter() - start:.0f} s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

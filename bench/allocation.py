"""Is the allocation (each group's width) or the criterion the lever left? Other allocations and criteria,
each scored by cheap proxies right after prune, recalibration and reconstruction, and by test accuracy after
the run's fine-tuning; then how well each proxy ranks the final accuracies.

An allocation other than the criterion's own comes from multiplying each group's scores by a random factor
``exp(sigma * z)`` (z standard normal, one per group, seeded by the seed; allocation k has the same z at every
sigma, so the sigmas are steps of different lengths in the same directions): the search's global threshold then cuts each
group at another place, and the search still lands the FLOPs target (allocation 0 is the run's own, factors 1).
EagleEye (Li et al. 2020) samples allocations the same way and keeps the best by a proxy. ``--criteria``
runs each named criterion at its own allocation instead.

Every run is ``compress`` with its defaults at the budget of ``bench/recipe.py`` (the 2,000 images after
the baselines' 20,000; 80% train, 3 epochs); the proxies are measured on the model the run fine-tunes,
right after its reconstruction: on the training split (1,600 images, unaugmented), agreement with the original's
predictions, KL divergence from the original's outputs, accuracy and cross-entropy on the labels; on the validation split (400), accuracy
(what ``--criterion auto`` uses today) and KL divergence.

    python bench/allocation.py --model resnet20 --target 0.5 --seeds 0 --sigmas 0.5 0.2 0.05 --allocations 6
    python bench/allocation.py --model resnet20 --target 0.5 --seeds 0 1 --criteria l2 fpgm lamp taylor activation hessian
    python bench/allocation.py --summary
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.fmnist import MEAN, STD, load_split  # noqa: E402
from bench.recipe import BASELINES  # noqa: E402
from bench.schedules import BASELINE_TRAIN_IMAGES, test_accuracy  # noqa: E402

OUT = ROOT / "bench" / "results" / "allocation.json"
PROXIES = {  # name -> (row key, higher is better)
    "val accuracy (auto's proxy)": ("val_accuracy", True),
    "val KL": ("val_kl", False),
    "train agreement": ("train_agreement", True),
    "train KL": ("train_kl", False),
    "train accuracy": ("train_accuracy", True),
    "train cross-entropy": ("train_ce", False),
}


def proxies(model, teacher, data) -> dict[str, float]:
    """The proxies of ``model`` (just pruned, recalibrated and reconstructed) against ``teacher``."""
    import torch.nn.functional as F

    from compressor.finetune import predict

    out = {}
    for split in ("train", "val"):
        student, labels = predict(model, data.batches(split, batch_size=256)), data.labels(split)
        reference = predict(teacher, data.batches(split, batch_size=256))
        out[f"{split}_kl"] = float(F.kl_div(F.log_softmax(student, 1), F.log_softmax(reference, 1), log_target=True,
                                            reduction="batchmean"))
        out[f"{split}_agreement"] = float((student.argmax(1) == reference.argmax(1)).float().mean())
        out[f"{split}_accuracy"] = float((student.argmax(1) == labels).float().mean())
        out[f"{split}_ce"] = float(F.cross_entropy(student, labels))
    model.train()
    return out


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def summary(rows: list[dict]) -> None:
    """Per (model, target, seed, kind): the best by test against the run's own, and each proxy's rank
    correlation with test accuracy and its pick."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["target"], r["seed"], r["kind"]), []).append(r)
    for (model, target, seed, kind), rs in sorted(cells.items()):
        test = [r["test"] for r in rs]
        own = next((r for r in rs if r["label"] in ("own", "l2")), rs[0])
        best = max(rs, key=lambda r: r["test"])
        print(f"{model} {target:g} seed {seed} {kind}: {len(rs)} runs, the run's own {own['test']:.2%}, "
              f"best {best['label']} {best['test']:.2%}, mean {np.mean(test):.2%}")
        if len(rs) < 3:
            continue
        for name, (key, higher) in PROXIES.items():
            values = [r[key] if higher else -r[key] for r in rs]
            pick = rs[int(np.argmax(values))]
            print(f"  {name:28s} rank correlation {spearman(values, test):+.2f}, picks {pick['label']} ({pick['test']:.2%})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(BASELINES), default="resnet20")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--sigmas", nargs="+", type=float, default=[0.5])
    p.add_argument("--allocations", type=int, default=8, help="per sigma, the run's own allocation included once")
    p.add_argument("--criteria", nargs="+", help="run these criteria at their own allocations instead")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--summary", action="store_true", help="print the summary of --out and stop")
    args = p.parse_args()
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    if args.summary:
        return summary(rows)

    import torch

    from compressor import CompressConfig, compress, pruning, schedules

    torch.set_num_threads(2)
    train_x, train_y, test_x, test_y = load_split()
    sl = slice(BASELINE_TRAIN_IMAGES, BASELINE_TRAIN_IMAGES + 2000)
    state: dict = {}

    # Two seams, for this benchmark only: the group scores scaled by the allocation's factors, and the
    # proxies read right after the run's prune (recalibration and reconstruction included).
    score_groups, prune = pruning.score_groups, schedules.Run.prune

    def scaled(graph, criterion, **kw):
        return [s * float(state["factors"][i]) for i, s in enumerate(score_groups(graph, criterion, **kw))]

    def prune_then_measure(run, pruned, *, reason):
        event = prune(run, pruned, reason=reason)
        state["proxies"] = proxies(run.model, run.original, run.data)
        return event

    pruning.score_groups, schedules.Run.prune = scaled, prune_then_measure
    # (kind, label, the criterion to run, sigma and k of the allocation: exp(sigma * z[k]); None for the run's own)
    runs = ([("criterion", c, c, None) for c in args.criteria] if args.criteria else
            [("allocation", "own", None, None)] + [("allocation", f"sigma {s:g} #{k}", None, (s, k))
                                                   for s in args.sigmas for k in range(1, args.allocations)])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "finetune.npz"
        np.savez(path, images=train_x[sl], labels=train_y[sl])
        for seed in args.seeds:
            z = torch.randn(args.allocations, 1000, generator=torch.Generator().manual_seed(1000 + seed))
            for kind, label, criterion, step in runs:
                state["factors"] = torch.ones(1000) if step is None else torch.exp(step[0] * z[step[1]])
                start = time.perf_counter()
                config = CompressConfig(model_path=BASELINES[args.model], data_path=path, arch=args.model,
                                        target_flops=args.target, seed=seed, epochs=args.epochs, mean=(MEAN,), std=(STD,),
                                        out_dir=tmp / "run", overwrite=True, latency_runs=5,
                                        **({"criterion": criterion} if criterion else {}))
                result = compress(config)
                row = {"model": args.model, "target": args.target, "seed": seed, "kind": kind, "label": label,
                       "flops_ratio": round(result.prune.achieved_ratio, 4),
                       "widths": [c.after for c in result.prune.layers], **state["proxies"],
                       "val_final": result.finetune.val_accuracy,
                       "test": test_accuracy(tmp / "run" / "model.onnx", test_x, test_y),
                       "seconds": round(time.perf_counter() - start, 1)}
                rows.append(row)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(rows, indent=1) + "\n")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

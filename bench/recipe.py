"""Our `compress` against the plain torch-pruning recipe a user would write from its README, same budget.

Plain recipe: ``tp.pruner.MetaPruner`` with ``GroupMagnitudeImportance(p=2)``, global pruning, the
classifier ignored, its ``pruning_ratio`` bisected until the measured MACs land in [0.99, 1] x target;
then the same epochs on the same images with SGD (momentum 0.9, weight decay 5e-4, lr 0.01) and a
cosine schedule, no distillation. Ours: `compress` with default settings. Both start from the same
trained model (the demo ResNet-20, or the MobileNetV2 of ``bench/train_baseline.py``, both trained
on the first 20,000 training images) and fine-tune on the same images (`compress`'s training split,
80%, of the next ``--train-size`` training images; the seed also picks that split); test accuracy
is on the 10,000-image test split, used for nothing else.

    python bench/recipe.py --model resnet20 --targets 0.5 0.3 --seeds 0 1 2
    python bench/recipe.py --model mobilenetv2 --targets 0.5 0.3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.fmnist import MEAN, STD, load_split  # noqa: E402
from bench.schedules import BASELINE_TRAIN_IMAGES, MODEL, test_accuracy  # noqa: E402

BASELINES = {"resnet20": MODEL, "mobilenetv2": ROOT / "bench" / "baselines" / "mobilenetv2_fmnist.pt"}
"""The trained models the comparison starts from (``bench/train_baseline.py``)."""


def plain_prune(model, example, target: float):
    """Bisect MetaPruner's global pruning ratio until the MACs land in [0.99, 1] x target."""
    import torch_pruning as tp

    from compressor.graph import find_classifier

    classifier = find_classifier(model, example)

    base, _ = tp.utils.count_ops_and_params(model, example)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(20):
        ratio = (lo + hi) / 2
        candidate = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(candidate, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, global_pruning=True, ignored_layers=[candidate.get_submodule(classifier)])
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(candidate, example)
        r = macs / base
        if r > target:
            lo = ratio
        else:
            hi, best = ratio, (candidate, r)
            if r >= 0.99 * target:
                break
    return best


def plain_finetune(model, x, y, *, epochs: int, seed: int, batch_size: int = 32, lr: float = 0.01):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
    model.eval()
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(BASELINES), default="resnet20")
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="+", default=["plain", "default"],
                   help="plain (the torch-pruning recipe) and compress variants: default, roundN, nodistill, features, "
                        "reconstruct, noreconstruct, schedule:NAME, criterion:NAME, augment:NAME, cfg:FIELD=JSON")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "recipe.json")
    args = p.parse_args()
    baseline = BASELINES[args.model]
    if not baseline.exists():
        raise SystemExit(f"{baseline} not found; train it first: python bench/train_baseline.py --model {args.model} "
                         f"--train-size 20000 --epochs 4 --out {baseline.relative_to(ROOT)}")

    import torch

    from compressor import CompressConfig, compress
    from compressor.data import load_data
    from compressor.export import export_onnx
    from compressor.finetune import accuracy
    from compressor.loading import load_model

    torch.set_num_threads(2)
    train_x, train_y, test_x, test_y = load_split()
    sl = slice(BASELINE_TRAIN_IMAGES, BASELINE_TRAIN_IMAGES + args.train_size)
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    budget = {"model": args.model, "train_size": args.train_size, "epochs": args.epochs}
    done = {(r["method"], r.get("variant", "default"), r["target"], r["seed"]) for r in rows
            if all(r.get(k) == v for k, v in budget.items())}

    def record(row):
        row = budget | row
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_path = tmp / "finetune.npz"
        np.savez(data_path, images=train_x[sl], labels=train_y[sl])
        for target in args.targets:
            for seed in args.seeds:
                if "plain" in args.methods and ("plain", "default", target, seed) not in done:
                    torch.manual_seed(seed)
                    data = load_data(data_path, val_fraction=0.2, seed=seed, mean=(MEAN,), std=(STD,))
                    model = load_model(baseline, arch=args.model, image_size=28).model
                    start = time.perf_counter()
                    pruned, ratio = plain_prune(model, data.val_x[:1], target)
                    ips = plain_finetune(pruned, data.train_x, data.train_y, epochs=args.epochs, seed=seed)
                    export_onnx(pruned, tmp / "plain.onnx", example_input=data.val_x[:1], metadata={})
                    record({"method": "plain", "target": target, "seed": seed, "flops_ratio": round(ratio, 4),
                            "val": accuracy(pruned, data.val_x, data.val_y),
                            "test": test_accuracy(tmp / "plain.onnx", test_x, test_y),
                            "images_per_second": round(ips, 1), "seconds": round(time.perf_counter() - start, 1)})
                for variant in (m for m in args.methods if m != "plain"):
                    if ("compress", variant, target, seed) in done:
                        continue
                    start = time.perf_counter()
                    config = CompressConfig(model_path=baseline, data_path=data_path, arch=args.model,
                                            target_flops=target, seed=seed, epochs=args.epochs, mean=(MEAN,),
                                            std=(STD,), out_dir=tmp / "run", overwrite=True, latency_runs=5,
                                            **overrides(variant))
                    result = compress(config)
                    record({"method": "compress", "variant": variant, "target": target, "seed": seed,
                            "flops_ratio": round(result.prune.achieved_ratio, 4), "round_to": result.prune.round_to,
                            "lr": config.peak_lr,
                            "val": result.finetune.val_accuracy if result.finetune else None,
                            "test": test_accuracy(tmp / "run" / "model.onnx", test_x, test_y),
                            "test_original": test_accuracy(tmp / "run" / "original.onnx", test_x, test_y),
                            "speedup_b1": _speedup(result, 1), "speedup_b64": _speedup(result, 64),
                            "images_per_second": round(result.finetune.images_per_second, 1),
                            "seconds": round(time.perf_counter() - start, 1),
                            "stages_seconds": result.stage_seconds,
                            "reconstruct_seconds": round(sum(e.reconstruction.seconds for e in result.schedule.events
                                                             if e.reconstruction is not None), 2),
                            "val_after_prune": result.accuracy_pruned_before_finetune,
                            "val_after_bn_recal": result.accuracy_pruned_recalibrated,
                            "val_after_reconstruct": result.accuracy_pruned_reconstructed})


def overrides(variant: str) -> dict:
    """``CompressConfig`` fields of a variant: ``default``, ``roundN`` (``--round-to N``), ``nodistill``,
    ``reconstruct`` / ``noreconstruct`` (``--reconstruct`` / ``--no-reconstruct``), ``features``
    (``--distill-features``), ``lrX`` (``--lr X``),
    ``schedule:NAME``, ``criterion:NAME``, ``augment:NAME`` (``--augment``), ``cfg:FIELD=JSON`` (any
    ``CompressConfig`` field); several joined by ``+`` (``features+round8``)."""
    if "+" in variant:
        merged: dict = {}
        for part in variant.split("+"):
            merged |= overrides(part)
        return merged
    if variant == "default":
        return {}
    if variant.startswith("round") and variant[5:].isdigit():
        return {"round_to": int(variant[5:])}
    if variant == "nodistill":
        return {"distill": False}
    if variant == "features":
        return {"distill_features": True}
    if variant in ("reconstruct", "noreconstruct"):
        return {"reconstruct": variant == "reconstruct"}
    if variant.startswith("lr"):
        return {"lr": float(variant[2:])}
    kind, _, name = variant.partition(":")
    if kind in ("schedule", "criterion", "augment") and name:
        return {kind: name}
    if kind == "cfg" and "=" in name:  # any CompressConfig field: cfg:distill_alpha=0.9
        key, _, value = name.partition("=")
        return {key: json.loads(value)}
    raise SystemExit(f"unknown variant {variant!r}")


def _speedup(result, batch: int) -> float | None:
    for entry in result.validation.latency:
        if entry.batch == batch:
            return round(entry.speedup, 3)
    return None


if __name__ == "__main__":
    main()

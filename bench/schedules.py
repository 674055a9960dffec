"""Compare the pruning schedules at the same budget: same model, data, epochs and seed, one target at a time.

The trained demo ResNet-20 (`models/demo/resnet20_fmnist.pt`, trained on the first 20,000 images of
the training split) is compressed with each schedule on a fine-tuning set of the next ``--train-size``
training images (of which `compress` holds out 20% for validation). Accuracy is reported on the
validation split (before pruning, right after the last physical prune, after the cycle: the figures
`compress` itself records) and on the 10,000-image test split (original and compressed ONNX), which
is used for nothing else.

    python bench/schedules.py --targets 0.5 0.3 --seeds 0 --out bench/results/schedules.json
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

MODEL = ROOT / "models" / "demo" / "resnet20_fmnist.pt"
BASELINE_TRAIN_IMAGES = 20_000


def test_accuracy(onnx_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images = ((x.astype(np.float32) / 255.0 - MEAN) / STD)[:, None].astype(np.float32)
    logits = np.concatenate([session.run(None, {"input": images[i : i + 1000]})[0] for i in range(0, len(images), 1000)])
    return float((logits.argmax(1) == y).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedules", nargs="+", default=["oneshot", "gradual", "ocs", "cyclical"])
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ocs-decay", type=float, default=None, help="override the ocs schedule's decay (a variant row)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "schedules.json")
    args = p.parse_args()

    import torch

    from compressor import CompressConfig, compress

    torch.set_num_threads(args.threads)
    train_x, train_y, test_x, test_y = load_split()
    sl = slice(BASELINE_TRAIN_IMAGES, BASELINE_TRAIN_IMAGES + args.train_size)
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["schedule"], r["target"], r["seed"], r.get("ocs_decay")) for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "finetune.npz"
        np.savez(data, images=train_x[sl], labels=train_y[sl])
        for target in args.targets:
            for seed in args.seeds:
                for schedule in args.schedules:
                    variant = args.ocs_decay if schedule == "ocs" else None
                    if (schedule, target, seed, variant) in done:
                        continue
                    extra = {"ocs_decay": variant} if variant is not None else {}
                    start = time.perf_counter()
                    result = compress(CompressConfig(
                        model_path=MODEL, data_path=data, arch="resnet20", target_flops=target, schedule=schedule,
                        epochs=args.epochs, seed=seed, mean=(MEAN,), std=(STD,), out_dir=Path(tmp) / "run",
                        overwrite=True, latency_runs=5, **extra))
                    row = {
                        "schedule": schedule, "target": target, "seed": seed, "epochs": args.epochs, **extra,
                        "train_images": result.data.train_size, "val_images": result.data.val_size,
                        "flops_ratio": round(result.prune.achieved_ratio, 4),
                        "val_before": result.accuracy_original,
                        "val_right_after": result.accuracy_pruned_before_finetune,
                        "val_after_bn_recal": result.accuracy_pruned_recalibrated,
                        "val_after_cycle": result.accuracy_compressed,
                        "test_original": test_accuracy(Path(tmp) / "run" / "original.onnx", test_x, test_y),
                        "test_compressed": test_accuracy(Path(tmp) / "run" / "model.onnx", test_x, test_y),
                        "prune_steps": [e.step for e in result.schedule.events],
                        "details": result.schedule.details,
                        "seconds": round(time.perf_counter() - start, 1),
                    }
                    rows.append(row)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(rows, indent=1) + "\n")
                    print(f"{schedule:9s} target {target:g} seed {seed}: test {row['test_original']:.2%} -> "
                          f"{row['test_compressed']:.2%}, val right after {row['val_right_after']:.2%}, "
                          f"{row['seconds']:.0f} s", flush=True)
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| target | schedule | seed | FLOPs | val before | val right after prune | after BN recal | val after cycle "
             "| test original | test compressed | test diff (pts) | pruned at step | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["target"], r["seed"])):
        recal = "-" if r["val_after_bn_recal"] is None else f"{r['val_after_bn_recal']:.2%}"
        name = r["schedule"] + (f" (decay {r['ocs_decay']:g})" if r.get("ocs_decay") is not None else "")
        lines.append(f"| {r['target']:g} | {name} | {r['seed']} | {r['flops_ratio']:.3f} | {r['val_before']:.2%} | "
                     f"{r['val_right_after']:.2%} | {recal} | {r['val_after_cycle']:.2%} | {r['test_original']:.2%} | "
                     f"{r['test_compressed']:.2%} | {(r['test_compressed'] - r['test_original']) * 100:+.2f} | "
                     f"{','.join(map(str, r['prune_steps']))} | {r['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

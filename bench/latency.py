"""Latency of compressed models on onnxruntime: default rounding vs --round-to 1 (and 16) vs a latency target.

Compresses the demo model (trained weights, its data sample) and the CIFAR-size models of
``compressor.models`` (random weights: latency does not depend on them) with ``epochs=0``
(fine-tuning does not change latency), and prints, per model and variant, the achieved FLOPs ratio
and the measured speed-up at batch 1 and 64 against the ideal 1 / FLOPs ratio. Each speed-up is an
interleaved median of both ONNX models timed in the same process, as ``compress`` reports it.

    python bench/latency.py --out runs/bench_latency            # everything (about half an hour on 2 cores)
    python bench/latency.py --models demo --variants default,round1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import CompressConfig, compress  # noqa: E402
from compressor.errors import TargetUnreachableError  # noqa: E402
from compressor.models import create_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
MODELS = ("demo", "resnet20", "mobilenetv2", "vgg16_bn")
VARIANTS = {
    # name: (CompressConfig overrides, label)
    "default": ({"target_flops": 0.5}, "--target-flops 0.5 (default --round-to)"),
    "round1": ({"target_flops": 0.5, "round_to": 1}, "--target-flops 0.5 --round-to 1"),
    "round16": ({"target_flops": 0.5, "round_to": 16}, "--target-flops 0.5 --round-to 16"),
    "latency": ({"target_latency": 0.6}, "--target-latency 0.6 (batch 1)"),
}


def _inputs(name: str, tmp: Path) -> dict:
    """Model path, data path and config fields of one benchmark model."""
    if name == "demo":
        return {"model_path": DEMO / "resnet20_fmnist.pt", "data_path": DEMO / "fmnist_sample.npz", "arch": "resnet20",
                "mean": (0.2860,), "std": (0.3530,)}
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=3, image_size=32).eval()
    path = tmp / f"{name}.pt"
    torch.save(model.state_dict(), path)
    rng = np.random.default_rng(0)
    data = tmp / "cifar_random.npz"
    if not data.exists():
        np.savez(data, images=rng.integers(0, 256, (320, 32, 32, 3), dtype=np.uint8),
                 labels=np.repeat(np.arange(10), 32))
    return {"model_path": path, "data_path": data, "arch": name}


def run_one(name: str, variant: str, *, out: Path, tmp: Path, runs: int) -> dict:
    overrides, label = VARIANTS[variant]
    config = CompressConfig(**_inputs(name, tmp), **overrides, epochs=0, bn_recalibration=False, device="cpu",
                            latency_runs=runs, out_dir=out / name / variant, overwrite=True)
    start = time.perf_counter()
    try:
        result = compress(config)
    except TargetUnreachableError as exc:
        return {"model": name, "variant": variant, "label": label, "error": exc.message}
    row = {"model": name, "variant": variant, "label": label, "round_to": result.prune.round_to,
           "flops_ratio": result.prune.achieved_ratio, "ideal_speedup": 1 / result.prune.achieved_ratio,
           "seconds": time.perf_counter() - start}
    for lat in result.validation.latency:
        row[f"speedup_b{lat.batch}"] = lat.speedup
        row[f"ms_b{lat.batch}"] = (lat.original_ms, lat.compressed_ms)
        row[f"iqr_b{lat.batch}"] = (lat.original_spread_ms, lat.compressed_spread_ms)
    if result.latency_search is not None:
        s = result.latency_search
        row["latency_search"] = {"target": s.target, "search_ratio": s.latency_ratio, "spread": s.spread,
                                 "probes": len(s.probes)}
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | run | round-to | FLOPs ratio | ideal | speed-up b1 | speed-up b64 | b1 ms (orig / comp) | b64 ms (orig / comp) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['label']} | | | | {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['label']} | {r['round_to']} | {r['flops_ratio']:.3f} | {r['ideal_speedup']:.2f}x | "
            f"{r['speedup_b1']:.2f}x | {r['speedup_b64']:.2f}x | {r['ms_b1'][0]:.2f} / {r['ms_b1'][1]:.2f} | "
            f"{r['ms_b64'][0]:.1f} / {r['ms_b64'][1]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model at batch 1 (a third at batch 64)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_latency"))
    args = p.parse_args()
    torch.set_num_threads(1)  # the pruning search; onnxruntime keeps its own thread pool

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for variant in args.variants.split(","):
                row = run_one(name, variant, out=args.out, tmp=Path(tmp), runs=args.runs)
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()

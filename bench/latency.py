"""Latency of compressed models on onnxruntime: default rounding vs --round-to 1 (and 16) vs a latency target.

Compresses the demo model (trained weights, its data sample) and the CIFAR-size models of
``compressor.models`` (random weights: latency does not depend on them) with ``epochs=0``
(fine-tuning does not change latency), and prints, per model and variant, the achieved FLOPs ratio
and the measured speed-up at batch 1 and 64 against the ideal 1 / FLOPs ratio. Each speed-up is an
interleaved median of both ONNX models timed in the same process, as ``compress`` reports it.

    python bench/latency.py --out runs/bench_latency            # everything (about half an hour on 2 cores)
    python bench/latency.py --models demo --variants default,round1
    python bench/latency.py --rounding 1,8,16 --models demo,mobilenetv2   # rounding only, all widths timed together

``--rounding`` prunes each model to 0.5 FLOPs once per multiple (no fine-tuning, no ``compress`` run)
and times the original and every pruned variant interleaved in one loop, so they share the
machine's load: the measurement behind the per-EP default of ``--round-to``.
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
MODELS = ("demo", "resnet20", "mobilenetv2", "vgg16_bn", "tv_resnet18", "tv_mobilenet_v2")
TORCHVISION_SIZE = 64
"""Input side for the torchvision models (random weights and images, like the CIFAR-size ones)."""
VARIANTS = {
    # name: (CompressConfig overrides, label)
    "default": ({"target_flops": 0.5}, "--target-flops 0.5 (default --round-to)"),
    "round1": ({"target_flops": 0.5, "round_to": 1}, "--target-flops 0.5 --round-to 1"),
    "round8": ({"target_flops": 0.5, "round_to": 8}, "--target-flops 0.5 --round-to 8"),
    "latency": ({"target_flops": 0.5, "target_latency": 0.6}, "--target-flops 0.5 --target-latency 0.6 (batch 1)"),
}


def _inputs(name: str, tmp: Path) -> dict:
    """Model path, data path and config fields of one benchmark model."""
    if name == "demo":
        return {"model_path": DEMO / "resnet20_fmnist.pt", "data_path": DEMO / "fmnist_sample.npz", "arch": "resnet20",
                "mean": (0.2860,), "std": (0.3530,)}
    torch.manual_seed(0)
    if name.startswith("tv_"):  # torchvision's own classifiers, built with weights=None
        import torchvision

        arch, size = f"torchvision.models:{name[3:]}", TORCHVISION_SIZE
        model = getattr(torchvision.models, name[3:])(weights=None, num_classes=10).eval()
    else:
        arch, size = name, 32
        model = create_model(name, num_classes=10, in_channels=3, image_size=32).eval()
    path = tmp / f"{name}.pt"
    torch.save(model.state_dict(), path)
    rng = np.random.default_rng(0)
    data = tmp / f"random_{size}.npz"
    if not data.exists():
        np.savez(data, images=rng.integers(0, 256, (320, size, size, 3), dtype=np.uint8),
                 labels=np.repeat(np.arange(10), 32))
    return {"model_path": path, "data_path": data, "arch": arch}


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


def compare_rounding(name: str, multiples: list[int], *, tmp: Path, runs: int, batches=(1, 64)) -> list[dict]:
    """Speed-ups of one model pruned to 0.5 FLOPs with each rounding multiple, all timed in the same loop."""
    import statistics

    from compressor import criteria, graph, pruning
    from compressor.data import load_data
    from compressor.export import to_onnx_bytes
    from compressor.loading import load_model
    from compressor.validate import feed_for, interleaved_times, iqr, open_session

    inputs = _inputs(name, tmp)
    data = load_data(inputs["data_path"], val_fraction=0.2, seed=0, mean=inputs.get("mean"), std=inputs.get("std"))
    model = load_model(inputs["model_path"], arch=inputs["arch"], image_size=data.info.input_shape[-1]).model
    coupling = graph.trace(model, data.val_x[:1])
    scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))
    variants = {}
    for m in multiples:
        pruned, result = pruning.search(coupling, scores, target_ratio=0.5, max_prune_fraction=0.75, round_to=m)
        variants[m] = (open_session(to_onnx_bytes(pruned, data.val_x[:1]), device="cpu"), result.achieved_ratio)
    sessions = [open_session(to_onnx_bytes(model, data.val_x[:1]), device="cpu")] + [s for s, _ in variants.values()]
    rows = []
    for batch in batches:
        times = interleaved_times(sessions, feed_for(data.val_x[:64], batch), runs=runs if batch == 1 else max(5, runs // 3))
        base = statistics.median(times[0])
        for (m, (_, ratio)), t in zip(variants.items(), times[1:]):
            rows.append({"model": name, "round_to": m, "batch": batch, "flops_ratio": ratio,
                         "speedup": base / statistics.median(t), "original_ms": base, "compressed_ms": statistics.median(t),
                         "original_iqr_ms": iqr(times[0]), "compressed_iqr_ms": iqr(t)})
    return rows


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
    p.add_argument("--rounding", help="comma-separated multiples: only compare rounding, timed together")
    args = p.parse_args()
    torch.set_num_threads(1)  # the pruning search; onnxruntime keeps its own thread pool

    if args.rounding:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models.split(","):
                for row in compare_rounding(name, [int(m) for m in args.rounding.split(",")], tmp=Path(tmp),
                                            runs=args.runs):
                    print(f"{row['model']:12s} round-to {row['round_to']:3d}  batch {row['batch']:3d}  "
                          f"FLOPs {row['flops_ratio']:.3f}  speed-up {row['speedup']:.2f}x  "
                          f"({row['original_ms']:.2f} ± {row['original_iqr_ms']:.2f} -> "
                          f"{row['compressed_ms']:.2f} ± {row['compressed_iqr_ms']:.2f} ms, IQR)", flush=True)
        return

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

"""The GPU path measured: CUDA EP parity and latency, rounding on CUDA, AMP throughput, DDP, TensorRT.

    bash bench/gpu_check.sh [OUT_DIR]        # default runs/gpu_check; under 8 minutes on one H200

Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md. Parts:

1. ``compress --device cuda`` of the demo (1 epoch, AMP) and of a torchvision ResNet-50 at 224 px
   (random weights and images; epochs 0): CUDA EP parity and latency against the original at batch 1, 64, 256.
2. Rounding 1 vs 8 vs 16 on the CUDA EP (the ResNet-50 at 0.5 FLOPs, epochs 0).
3. Fine-tuning throughput of the demo's cycle (AMP) against a bare AMP loop (same model, batch, steps).
4. DDP on the machine's GPUs, when it has more than one (``--nproc-per-node``).
5. The TensorRT EP, where onnxruntime offers it.

Without a usable GPU (torch sees no CUDA device, or onnxruntime has no CUDA EP) it only checks the
installation, prints plainly that it SKIPPED the GPU parts, and writes the files saying so.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor import CompressConfig, compress  # noqa: E402

DEMO = ROOT / "models" / "demo"
BATCHES = (1, 64, 256)


def _demo(**kw) -> CompressConfig:
    return CompressConfig(model_path=DEMO / "resnet20_fmnist.pt", data_path=DEMO / "fmnist_sample.npz",
                          arch="resnet20", mean=(0.2860,), std=(0.3530,), target_flops=0.5, overwrite=True, **kw)


def _resnet50(tmp: Path, **kw) -> CompressConfig:
    import torchvision

    path, data = tmp / "resnet50.pt", tmp / "random_224.npz"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet50(weights=None, num_classes=10).state_dict(), path)
        rng = np.random.default_rng(0)
        np.savez(data, images=rng.integers(0, 256, (320, 224, 224, 3), dtype=np.uint8), labels=np.repeat(np.arange(10), 32))
    return CompressConfig(model_path=path, data_path=data, arch="torchvision.models:resnet50", target_flops=0.5,
                          overwrite=True, **kw)


def _row(name: str, result) -> dict:
    v = result.validation
    row = {"model": name, "round_to": result.prune.round_to, "flops_ratio": result.prune.achieved_ratio,
           "provider": v.provider, "parity_max_abs": v.parity.max_abs_diff, "top1_agreement": v.parity.top1_agreement,
           "accuracy_compressed": result.accuracy_compressed,
           "finetune_images_per_second": result.finetune.images_per_second if result.finetune else None,
           "amp": result.finetune.amp if result.finetune else None}
    for lat in v.latency:
        row[f"b{lat.batch}"] = {"original_ms": lat.original_ms, "compressed_ms": lat.compressed_ms, "speedup": lat.speedup}
    return row


def bare_amp_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int, steps: int) -> float:
    """Images per second of a plain bf16-autocast SGD loop, the floor the cycle's overhead is judged by."""
    model = model.cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = x.cuda(), y.cuda()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        j = (i * batch) % max(1, len(x) - batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x[j : j + batch]).float(), y[j : j + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def gpu_parts(out: Path, tmp: Path) -> dict:
    from compressor.checkpoint import load_pruned  # noqa: F401  (checks the install)
    from compressor.data import load_data
    import onnxruntime as ort

    results: dict = {"gpus": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name(0), "rows": []}
    demo = compress(_demo(epochs=1, device="cuda", latency_batch=256, out_dir=out / "demo"))
    results["rows"].append(_row("demo", demo))
    for r in (1, 8, 16):
        res = compress(_resnet50(tmp, epochs=0, bn_recalibration=False, device="cuda", latency_batch=256, round_to=r,
                                 latency_runs=20, out_dir=out / f"resnet50_round{r}"))
        results["rows"].append(_row(f"tv_resnet50_224 round_to {r}", res))
    # Fine-tuning throughput: the cycle (from the demo run) against a bare AMP loop on the same pruned model.
    data = load_data(DEMO / "fmnist_sample.npz", val_fraction=0.2, seed=0, mean=(0.2860,), std=(0.3530,))
    bare = bare_amp_loop(demo.schedule.model, data.train_x, data.train_y, batch=32, steps=demo.finetune.steps)
    results["amp"] = {"cycle_images_per_second": demo.finetune.images_per_second, "bare_images_per_second": bare,
                      "ratio": demo.finetune.images_per_second / bare}
    if torch.cuda.device_count() > 1:
        n = min(torch.cuda.device_count(), 8)
        ddp = compress(_demo(epochs=1, device="cuda", nproc_per_node=n, out_dir=out / f"demo_ddp{n}"))
        results["ddp"] = {"processes": n, "images_per_second": ddp.finetune.images_per_second,
                          "one_process": demo.finetune.images_per_second,
                          "accuracy": ddp.accuracy_compressed, "accuracy_one": demo.accuracy_compressed}
    else:
        results["ddp"] = "skipped: one GPU"
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        try:
            from compressor.validate import feed_for, interleaved_times
            import statistics

            sessions = [ort.InferenceSession(str(out / "resnet50_round8" / f), providers=["TensorrtExecutionProvider",
                        "CUDAExecutionProvider"]) for f in ("original.onnx", "model.onnx")]
            sample = load_data(tmp / "random_224.npz", val_fraction=0.2, seed=0).val_x[:1]
            t = interleaved_times(sessions, feed_for(sample, 1), runs=30, warmup=10)
            results["tensorrt"] = {"batch": 1, "original_ms": statistics.median(t[0]),
                                   "compressed_ms": statistics.median(t[1])}
        except Exception as exc:  # the EP is offered but may lack its libraries
            results["tensorrt"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    else:
        results["tensorrt"] = "skipped: onnxruntime offers no TensorrtExecutionProvider"
    return results


def markdown(results: dict) -> str:
    if results.get("skipped"):
        return "# GPU check\n\n**SKIPPED: no usable GPU.** " + results["skipped"] + "\n"
    lines = [f"# GPU check: {results['gpu']} x{results['gpus']}", "",
             "| model | round_to | FLOPs | " + " | ".join(f"b{b} orig / comp ms (speed-up)" for b in BATCHES) + " |",
             "|---|---|---|" + "---|" * len(BATCHES)]
    for row in results["rows"]:
        cells = [f"{row[f'b{b}']['original_ms']:.3f} / {row[f'b{b}']['compressed_ms']:.3f} ({row[f'b{b}']['speedup']:.2f}x)"
                 if f"b{b}" in row else "-" for b in BATCHES]
        lines.append(f"| {row['model']} | {row['round_to']} | {row['flops_ratio']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"AMP fine-tuning: {json.dumps(results['amp'])}", "", f"DDP: {json.dumps(results['ddp'])}", "",
              f"TensorRT: {json.dumps(results['tensorrt'])}", ""]
    return "\n".join(lines)


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "gpu_check"
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    providers = ort.get_available_providers()
    print(f"torch {torch.__version__}, CUDA usable: {torch.cuda.is_available()}; onnxruntime {ort.__version__}, "
          f"providers: {', '.join(providers)}")
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in providers:
        why = ("torch sees no CUDA device" if not torch.cuda.is_available()
               else "onnxruntime has no CUDAExecutionProvider")
        results = {"skipped": f"{why}; nothing on the GPU was measured (CUDA EP parity and latency, rounding on "
                              "CUDA, AMP throughput, DDP on GPUs, TensorRT)", "providers": providers}
        print(f"SKIPPED the GPU parts: {results['skipped']}.")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            results = gpu_parts(out, Path(tmp))
            results["seconds"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out}/gpu_check.json and gpu_check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

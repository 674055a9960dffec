"""Cost of the pipeline: wall time per stage, fine-tuning throughput and peak memory against a bare loop.

For each model, three processes run one after another on the same data (each its own process, so
its peak resident memory is its own):

- ``compress``: the whole pipeline through the library (``compress(CompressConfig(...))``), target
  0.5 FLOPs, default settings otherwise; records the stage times ``compress`` measures itself
  (load, trace, prune, fine-tune, export, validate), its fine-tuning throughput and the process's
  peak RSS.
- ``bare``: what a user would write by hand for the same fine-tuning: the same pruned-size model is
  not needed for a throughput ratio, so the *original* model is loaded and trained with SGD and
  cross-entropy for the same epochs, batch size and images, nothing else (no validation, no
  distillation, no progress). Throughput is images/s of the training loop; peak RSS of the process.
- ``bare-kd``: the bare loop plus distillation from a frozen copy of the model (teacher logits
  computed once, as ``compress`` does), i.e. the same arithmetic as ``compress``'s fine-tuning.

``compress`` fine-tunes the *pruned* model (half the FLOPs), the bare loops the original, so
``compress`` should be faster per image; the bare loops are therefore also run on the pruned
model ``compress`` saved (``model.pt``), which is the like-for-like ratio.

Models: the demo ResNet-20 (28x28 Fashion-MNIST, trained weights) and torchvision's ResNet-50 at
224x224 (random weights, Fashion-MNIST images upsampled to 224x224 and repeated to 3 channels; the
weights do not change the cost).

    python bench/cost.py --out bench/results/cost.json
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.fmnist import MEAN, STD, load_split  # noqa: E402

DEMO = ROOT / "models" / "demo" / "resnet20_fmnist.pt"
BASELINE_TRAIN_IMAGES = 20_000
MODELS = {
    # name: (arch, images, epochs, batch size)
    "resnet20": ("resnet20", 2000, 2, 32),
    "tv_resnet50": ("torchvision.models:resnet50", 160, 1, 16),
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _prepare(name: str, tmp: Path) -> tuple[Path, Path]:
    """Write the model file and the fine-tuning data of one benchmark model; return their paths."""
    import torch

    arch, count, _, _ = MODELS[name]
    train_x, train_y, _, _ = load_split()
    images, labels = train_x[BASELINE_TRAIN_IMAGES : BASELINE_TRAIN_IMAGES + count], train_y[BASELINE_TRAIN_IMAGES : BASELINE_TRAIN_IMAGES + count]
    if name == "resnet20":
        model_path = DEMO
        images = images[..., None]
    else:
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None, num_classes=10).eval()
        model_path = tmp / f"{name}.pt"
        torch.save(model.state_dict(), model_path)
        big = torch.nn.functional.interpolate(torch.from_numpy(images)[:, None].float(), size=(224, 224), mode="bilinear")
        images = big.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    data_path = tmp / f"{name}.npz"
    np.savez(data_path, images=images, labels=labels)
    return model_path, data_path


def _channels(name: str) -> int:
    return 1 if name == "resnet20" else 3


def worker_compress(name: str, model_path: Path, data_path: Path, out: Path) -> dict:
    import torch

    from compressor import CompressConfig, compress

    torch.set_num_threads(2)
    arch, _, epochs, batch = MODELS[name]
    c = _channels(name)
    config = CompressConfig(model_path=model_path, data_path=data_path, arch=arch, target_flops=0.5, epochs=epochs,
                            batch_size=batch, device="cpu", mean=(MEAN,) * c, std=(STD,) * c, out_dir=out,
                            overwrite=True, latency_runs=5)
    start = time.perf_counter()
    result = compress(config)
    return {"stage_seconds": result.stage_seconds, "total_seconds": round(time.perf_counter() - start, 1),
            "flops_ratio": round(result.prune.achieved_ratio, 4),
            "finetune_images_per_second": round(result.finetune.images_per_second, 2),
            "finetune_seconds": round(result.finetune.seconds, 1), "peak_rss_mb": round(_peak_rss_mb())}


def worker_bare(name: str, model_path: Path, data_path: Path, *, distill: bool) -> dict:
    """The hand-written loop: SGD + cross-entropy (+ KL to precomputed teacher logits), timed."""
    import copy

    import torch
    import torch.nn.functional as F

    from compressor.data import load_data
    from compressor.loading import load_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    arch, _, epochs, batch = MODELS[name]
    c = _channels(name)
    data = load_data(data_path, val_fraction=0.2, seed=0, mean=(MEAN,) * c, std=(STD,) * c)
    image_size = data.info.input_shape[-1]
    model = load_model(model_path, arch=arch, image_size=image_size).model
    x, y = data.train_x, data.train_y
    soft = None
    if distill:
        teacher = copy.deepcopy(model).eval()
        with torch.no_grad():
            soft = torch.cat([teacher(x[i : i + 64]) for i in range(0, len(x), 64)])
        del teacher
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=epochs * math.ceil(len(x) / batch))
    g = torch.Generator().manual_seed(0)
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            if soft is not None:
                t = 4.0
                kd = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(soft[idx] / t, 1), reduction="batchmean",
                              log_target=True) * t * t
                loss = 0.5 * loss + 0.5 * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
    seconds = time.perf_counter() - start
    return {"images_per_second": round(seen / seconds, 2), "seconds": round(seconds, 1), "peak_rss_mb": round(_peak_rss_mb())}


def _spawn(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"worker {args[:3]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cost.json")
    p.add_argument("--worker", nargs=4, metavar=("KIND", "NAME", "MODEL", "DATA"), help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        kind, name, model_path, data_path = args.worker
        if kind == "compress":
            row = worker_compress(name, Path(model_path), Path(data_path), args.run_dir)
        else:
            row = worker_bare(name, Path(model_path), Path(data_path), distill=kind.endswith("kd"))
        print(json.dumps(row))
        return

    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            model_path, data_path = _prepare(name, tmp)
            run = tmp / f"run_{name}"
            row = {"model": name, "arch": MODELS[name][0], "images": MODELS[name][1], "epochs": MODELS[name][2],
                   "batch_size": MODELS[name][3], "date": time.strftime("%Y-%m-%d")}
            print(f"{name}: compress", flush=True)
            row["compress"] = _spawn(["--worker", "compress", name, str(model_path), str(data_path), "--run-dir", str(run)])
            for kind in ("bare", "bare-kd"):
                for which, path in (("original", model_path), ("pruned", run / "model.pt")):
                    print(f"{name}: {kind} on the {which} model", flush=True)
                    row[f"{kind}_{which}"] = _spawn(["--worker", kind, name, str(path), str(data_path)])
            ours = row["compress"]["finetune_images_per_second"]
            row["throughput_ratio_vs_bare_pruned"] = round(ours / row["bare_pruned"]["images_per_second"], 3)
            row["throughput_ratio_vs_bare_kd_pruned"] = round(ours / row["bare-kd_pruned"]["images_per_second"], 3)
            row["rss_ratio_vs_bare_original"] = round(row["compress"]["peak_rss_mb"] / row["bare_original"]["peak_rss_mb"], 3)
            print(json.dumps(row), flush=True)
            rows = [r for r in rows if r["model"] != name] + [row]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

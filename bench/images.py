"""Real images at real resolution: peak memory of ``compress`` against the image count, and data
throughput against a bare torchvision ImageFolder + DataLoader loop (BENCHMARKS.md, "Image folders").

    python bench/images.py make --count 20000 --out /tmp/imgs       # class folders of JPEG+PNG, 64-320 px
    python bench/images.py rss --folders /tmp/imgs5k,/tmp/imgs20k    # compress --epochs 0 at 224 px, peak PSS
    python bench/images.py rss --arch mobilenet_v3_small --extra "--epochs 1 --val-fraction 0.02" --folders ...
    python bench/images.py throughput --folder /tmp/imgs5k --images 1500
    python bench/images.py finetune --folder /tmp/imgs1k             # compress --epochs 1 (subset)

The images are Fashion-MNIST's (training split of ``fmnist.py``) upscaled to random widths and heights
of 64-320 px, half of them tinted RGB and half greyscale, half JPEG and half PNG. The model is torchvision's
ResNet-18 (or ``--arch``, e.g. MobileNetV3-Small) with random weights and 10 classes, saved as a pickled module.
Runs are kept in ``results/images.json`` per (arch, extra flags, image count); a re-run replaces its own row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "images.json"


def make(count: int, out: Path, seed: int = 0) -> None:
    from PIL import Image

    from fmnist import load_split

    x, y, _, _ = load_split()
    rng = np.random.default_rng(seed)
    for c in range(10):
        (out / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = (int(v) for v in rng.integers(64, 321, 2))
        img = Image.fromarray(x[i]).resize((w, h), Image.Resampling.BILINEAR)
        if i % 2:
            tint = rng.uniform(0.4, 1.0, 3)
            img = Image.fromarray((np.asarray(img)[..., None] * tint).astype(np.uint8), mode="RGB")
        img.save(out / f"class{y[i]}" / f"{i:06d}.{'jpg' if i % 4 < 2 else 'png'}", quality=90)


def _tree_pss(root: int) -> int:
    """Proportional set size (bytes) of ``root`` and all its descendants: shared pages counted once."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; its peak process-tree PSS, sampled every 0.25 s, and its wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_pss(proc.pid))
            time.sleep(0.25)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    output = proc.communicate()[0]
    t.join()
    return {"cmd": " ".join(cmd), "rc": proc.returncode, "peak_pss_gb": round(peak[0] / 2**30, 3),
            "seconds": round(time.perf_counter() - start, 1), "tail": output[-600:] if proc.returncode else ""}


def _model(tmp: Path, arch: str) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp / f"{arch}.pt"
    torch.save(torchvision.models.get_model(arch, num_classes=10).eval(), path)
    return path


def _compress_cmd(model: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "compress"), str(model), "--trust-pickle", "--data", str(folder),
            "--input-size", "224", "--target-flops", "0.5", "--device", "cpu", "--latency-runs", "3",
            "--out", str(out), "--overwrite", "--json", *extra]


def rss(folders: list[Path], extra: list[str], arch: str = "resnet18") -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = _model(Path(tmp), arch)
        for folder in folders:
            count = sum(1 for _ in folder.rglob("*.*"))
            row = run_measured(_compress_cmd(model, folder, Path(tmp) / "out", *extra))
            row.update(arch=arch, extra=" ".join(extra), images=count, folder=str(folder))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def throughput(folder: Path, images: int, workers: int, batch: int, rounds: int) -> dict:
    """Images per second of our loader and of a bare ImageFolder + DataLoader loop with the same workers
    and transforms (eval: resize 256, crop 224, normalise; light: RandomResizedCrop 224 + flip), rounds
    interleaved."""
    import torch
    import torchvision
    from torchvision.transforms import v2

    from compressor.data import load_data

    data = load_data(folder, input_size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), workers=workers)
    prep = data.preprocessing
    n = min(images, len(data.train))
    order = torch.arange(n)
    files = [Path(f) for f in data.train.files[:n]]
    subset = set(map(str, files))

    def bare(transform):
        ds = torchvision.datasets.ImageFolder(str(folder), transform=transform, is_valid_file=lambda p: p in subset)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers)
        return sum(len(x) for x, _ in loader)

    def ours(augment):
        return sum(len(x) for x, _, _ in data.loader("train", batch_size=batch, order=order, augment=augment))

    to_rgb = v2.Lambda(lambda img: img.convert("RGB"))
    tails = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(prep.mean), list(prep.std))]
    eval_tf = v2.Compose([to_rgb, v2.Resize(256, antialias=True), v2.CenterCrop(224), *tails])
    light_tf = v2.Compose([to_rgb, v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), *tails])
    times: dict[str, list[float]] = {k: [] for k in ("ours_eval", "bare_eval", "ours_light", "bare_light")}
    for r in range(rounds):
        jobs = [("ours_eval", lambda: ours("none")), ("bare_eval", lambda: bare(eval_tf)),
                ("ours_light", lambda: ours("light")), ("bare_light", lambda: bare(light_tf))]
        for name, job in (jobs if r % 2 == 0 else jobs[::-1]):
            t = time.perf_counter()
            seen = job()
            times[name].append(time.perf_counter() - t)
            assert seen == n, (name, seen, n)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"images": n, "workers": workers, "batch": batch, "rounds": rounds,
            "images_per_s": {k: round(n / v, 1) for k, v in med.items()},
            "ratio_eval": round(med["bare_eval"] / med["ours_eval"], 3),
            "ratio_light": round(med["bare_light"] / med["ours_light"], 3)}


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--count", type=int, required=True)
    m.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("rss")
    r.add_argument("--folders", required=True)
    r.add_argument("--extra", default="--epochs 0 --val-fraction 0.02")
    r.add_argument("--arch", default="resnet18", help="a torchvision model name (random weights, 10 classes)")
    t = sub.add_parser("throughput")
    t.add_argument("--folder", type=Path, required=True)
    t.add_argument("--images", type=int, default=1500)
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--rounds", type=int, default=3)
    f = sub.add_parser("finetune")
    f.add_argument("--folder", type=Path, required=True)
    f.add_argument("--extra", default="--epochs 1 --val-fraction 0.1 --batch-size 32")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.cmd == "make":
        make(args.count, args.out)
        return
    if args.cmd == "rss":
        new = rss([Path(f) for f in args.folders.split(",")], args.extra.split(), args.arch)
        old = results.get("rss", {}).get("runs", [])
        for row in old:  # rows of the first release carry neither arch nor extra
            row.setdefault("arch", "resnet18")
            row.setdefault("extra", results["rss"].get("extra", ""))
        key = lambda row: (row["arch"], row["extra"], row["images"])  # noqa: E731
        replaced = {key(row) for row in new}
        results["rss"] = {"runs": [row for row in old if key(row) not in replaced] + new}
    elif args.cmd == "throughput":
        results["throughput"] = throughput(args.folder, args.images, args.workers, args.batch, args.rounds)
    else:
        results["finetune"] = {"extra": args.extra, "runs": rss([args.folder], args.extra.split())}
    print(json.dumps(results, indent=1))
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

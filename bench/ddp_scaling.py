"""Fine-tuning throughput against data-parallel processes on this machine (``--nproc-per-node``).

    python bench/ddp_scaling.py [--images 1600] [--procs 1,2]

Fine-tunes the demo ResNet-20 (unpruned: the structure does not matter for the ratio) for one epoch
on the first ``--images`` training images with distillation, global batch 32, once in this process
(``finetune.Cycle``) and once per process count the way ``compress --nproc-per-node`` trains (this
process as rank 0, the other ranks spawned: ``distributed.train``), and prints images per second and
the ratio to the in-process run. ``--schedule-hook`` adds a step hook that changes every weight in place
after every step (``ocs`` and ``cyclical`` change the masked layers'), so the other ranks receive every
weight after every step: the worst case of a schedule acting between steps. All runs are in one invocation, so they share the
machine's load.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor import distributed, finetune as ft  # noqa: E402
from compressor.data import LoadedData, load_data  # noqa: E402
from compressor.loading import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--schedule-hook", action="store_true",
                        help="also run each process count with a step hook that changes a weight after every step")
    args = parser.parse_args()
    # One thread per process, like each launched worker on 2 cores: a spinning second OpenMP thread on a
    # loaded machine made the in-process run 20x slower.
    torch.set_num_threads(max(1, (__import__("os").cpu_count() or 1) // 2))
    data = load_data(ROOT / "models/demo/fmnist_sample.npz", val_fraction=0.2, seed=0, mean=(0.2860,), std=(0.3530,))
    data = LoadedData.from_tensors(data.train_x[: args.images], data.train_y[: args.images], data.val_x, data.val_y,
                                   info=data.info)
    model = load_model(ROOT / "models/demo/resnet20_fmnist.pt", arch="resnet20", trust_pickle=False, image_size=28).model
    settings = ft.FinetuneSettings(epochs=1, batch_size=32, lr=0.01, optimizer="sgd", weight_decay=5e-4, distill=True,
                                   temperature=4.0, alpha=0.7, seed=0)
    cpu = torch.device("cpu")
    rows = []
    start = time.perf_counter()
    res = ft.Cycle(copy.deepcopy(model), data, settings,
                   teacher=model, device=cpu).run()
    base = res.images_per_second
    rows.append({"processes": "in-process", "images_per_second": base, "ratio": 1.0, "val_accuracy": res.val_accuracy})
    print(rows[-1], flush=True)
    for n in (int(p) for p in args.procs.split(",")):
        cycle = distributed.DataParallelCycle(copy.deepcopy(model), data, settings, teacher=model, device=cpu,
                                              rank=0, world=n)
        r = distributed.train(cycle, teacher=model)
        rows.append({"processes": n, "images_per_second": r.images_per_second, "ratio": r.images_per_second / base,
                     "val_accuracy": r.val_accuracy})
        print(rows[-1], flush=True)
        if args.schedule_hook:
            cycle = distributed.DataParallelCycle(copy.deepcopy(model), data, settings, teacher=model, device=cpu,
                                                  rank=0, world=n)
            def touch() -> None:  # an in-place change of every weight: all are sent again (soft masks send theirs)
                with torch.no_grad():
                    for p in cycle.model.parameters():
                        p.mul_(1.0)

            r = distributed.train(cycle, teacher=model, hook=touch, between=True)
            rows.append({"processes": f"{n}, every weight sent every step", "images_per_second": r.images_per_second,
                         "ratio": r.images_per_second / base, "val_accuracy": r.val_accuracy})
            print(rows[-1], flush=True)
    print(json.dumps({"cpus": torch.get_num_threads(), "images": args.images, "rows": rows,
                      "seconds": time.perf_counter() - start}, indent=2))
    print("| processes | images/s | ratio to in-process | val accuracy |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} | {row['images_per_second']:.1f} | {row['ratio']:.2f} | {row['val_accuracy']:.2%} |")


if __name__ == "__main__":
    main()

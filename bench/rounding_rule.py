"""The rounding rule on its own: each chunk of the rounding multiple ranked by its best (max), median or mean
channel, or no rounding (round1); each plan pruned, its batch norms recalibrated and its layers
reconstructed, then scored on the validation and the test split, without fine-tuning.

The search's own rule is the median (``compressor.prune.plan._chunks``); this script swaps the ranking in for
the comparison only (``_chunks``'s ``rank``). The same data as ``bench/recipe.py`` (the 2,000 images after the baselines' 20,000).

    python bench/rounding_rule.py --model resnet20 --target 0.5 --seed 0 --rules max median mean round1
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.fmnist import MEAN, STD, load_split  # noqa: E402
from bench.recipe import BASELINES  # noqa: E402
from bench.schedules import BASELINE_TRAIN_IMAGES  # noqa: E402
from compressor import CompressConfig, criteria, reconstruct, schedules  # noqa: E402
from compressor.data import load_data  # noqa: E402
from compressor.finetune import accuracy, recalibrate_bn  # noqa: E402
from compressor.loading import load_model  # noqa: E402
from compressor.pipeline import _finetune_settings  # noqa: E402
from compressor.prune import plan  # noqa: E402

SEARCH = sys.modules["compressor.prune.search"]  # the module (the package exports a function of that name)
RANK = {"max": max, "median": plan.median_unit, "mean": lambda v: sum(v) / len(v)}
"""How a chunk of the rounding multiple ranks, from its units' scores (ascending)."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(BASELINES), default="resnet20")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multiple", type=int, default=8)
    p.add_argument("--rules", nargs="+", default=["max", "median"], choices=[*RANK, "round1"])
    args = p.parse_args()
    torch.set_num_threads(1)
    train_x, train_y, test_x, test_y = load_split()
    test = ((torch.tensor(test_x[:, None], dtype=torch.float32) / 255 - MEAN) / STD, torch.tensor(test_y))
    sl = slice(BASELINE_TRAIN_IMAGES, BASELINE_TRAIN_IMAGES + 2000)
    for rule in args.rules:
        SEARCH._chunks = functools.partial(plan._chunks, rank=RANK["max" if rule == "round1" else rule])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "finetune.npz"
            np.savez(path, images=train_x[sl], labels=train_y[sl])
            config = CompressConfig(model_path=BASELINES[args.model], data_path=path, arch=args.model, epochs=0,
                                    target_flops=args.target, mean=(MEAN,), std=(STD,), seed=args.seed,
                                    round_to=1 if rule == "round1" else args.multiple, reconstruct=False)
            data = load_data(path, val_fraction=0.2, seed=args.seed, mean=(MEAN,), std=(STD,))
        model = load_model(config.model_path, arch=args.model, image_size=28).model
        run = schedules.Run(original=model, data=data, config=config, criterion=criteria.get_criterion("l2"),
                            settings=_finetune_settings(config, data), device=torch.device("cpu"))
        pruned, result = run.plan(args.target)
        recalibrate_bn(pruned, data.train_x, batch_size=32)
        reconstruct.reconstruct(run.graph().model, pruned, kept=reconstruct.kept_outputs(run.graph(), result.plan),
                                images=reconstruct.calibration_images(data, reconstruct.CALIBRATION_IMAGES))
        print(f"{args.model} {args.target:g} seed {args.seed} {rule:6s} FLOPs {result.achieved_ratio:.3f} "
              f"val {accuracy(pruned, data.val_x, data.val_y):.2%} test {accuracy(pruned, *test):.2%} "
              f"widths {[c.after for c in result.layers]}", flush=True)


if __name__ == "__main__":
    main()

"""Validation accuracy of one one-shot prune, step by step: right after it, after batch-norm recalibration,
after reconstruction, and after a batch-norm recalibration on top of the reconstruction (no fine-tuning).

The same data and split as ``bench/recipe.py`` (seed 0): the 2,000 images after the baselines' 20,000.

    python bench/reconstruct_steps.py --model resnet20 --target 0.5
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.fmnist import MEAN, STD, load_split  # noqa: E402
from bench.recipe import BASELINES  # noqa: E402
from bench.schedules import BASELINE_TRAIN_IMAGES  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(BASELINES), default="resnet20")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--round-to", type=int, default=16)
    args = p.parse_args()

    import torch

    from compressor import CompressConfig, criteria, reconstruct, schedules
    from compressor.data import load_data
    from compressor.finetune import accuracy, recalibrate_bn
    from compressor.loading import load_model
    from compressor.pipeline import _finetune_settings

    torch.set_num_threads(2)
    train_x, train_y, _, _ = load_split()
    sl = slice(BASELINE_TRAIN_IMAGES, BASELINE_TRAIN_IMAGES + 2000)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "finetune.npz"
        np.savez(path, images=train_x[sl], labels=train_y[sl])
        config = CompressConfig(model_path=BASELINES[args.model], data_path=path, arch=args.model, epochs=0,
                                target_flops=args.target, mean=(MEAN,), std=(STD,), round_to=args.round_to,
                                reconstruct=False)
        data = load_data(path, val_fraction=0.2, seed=0, mean=(MEAN,), std=(STD,))
    model = load_model(config.model_path, arch=args.model, image_size=28).model
    run = schedules.Run(original=model, data=data, config=config, criterion=criteria.get_criterion("l2"),
                        settings=_finetune_settings(config, data), device=torch.device("cpu"))
    val = lambda m: f"{accuracy(m, data.val_x, data.val_y):.2%}"  # noqa: E731
    print("original", val(model))
    pruned, result = run.plan(args.target)
    print("right after the prune", val(pruned))
    recalibrate_bn(pruned, data.train_x, batch_size=32)
    print("after BN recalibration", val(pruned))
    start = time.perf_counter()
    done = reconstruct.reconstruct(run.graph().model, pruned, kept=reconstruct.kept_outputs(run.graph(), result.plan),
                                   images=reconstruct.calibration_images(data, reconstruct.CALIBRATION_IMAGES))
    print("after reconstruction", val(pruned), f"({done.summary()}; {time.perf_counter() - start:.1f} s with kept_outputs)")
    again = copy.deepcopy(pruned)
    recalibrate_bn(again, data.train_x, batch_size=32)
    print("after reconstruction and BN recalibration", val(again))


if __name__ == "__main__":
    main()

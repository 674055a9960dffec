"""Which half loses: the plain recipe's pruning or fine-tuning against ours, swapped (2 x 2).

Prunes the trained baseline to ``--target`` FLOPs both ways (the plain torch-pruning recipe of
``recipe.py``, and ``compress``'s search with ``l2``, ``--round-to 1``), then fine-tunes each pruned
model both ways (the plain loop, and ``compress``'s one-cycle fine-tuning with distillation, after
batch-norm recalibration), on the same images as ``recipe.py``. Accuracy on the validation split
(``compress``'s held-out 20%), not the test split: this is a diagnosis, and the test split is kept
for the reported figures.

    python bench/swap.py --model mobilenetv2 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.fmnist import MEAN, STD, load_split  # noqa: E402
from bench.recipe import BASELINES, plain_finetune, plain_prune  # noqa: E402
from bench.schedules import BASELINE_TRAIN_IMAGES  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(BASELINES), default="mobilenetv2")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=2000)
    args = p.parse_args()

    import torch

    from compressor import criteria, graph, pruning
    from compressor.data import load_data
    from compressor.finetune import Cycle, FinetuneSettings, accuracy, recalibrate_bn
    from compressor.loading import load_model

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    train_x, train_y, _, _ = load_split()
    sl = slice(BASELINE_TRAIN_IMAGES, BASELINE_TRAIN_IMAGES + args.train_size)
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "finetune.npz", images=train_x[sl], labels=train_y[sl])
        data = load_data(Path(tmp) / "finetune.npz", val_fraction=0.2, seed=args.seed, mean=(MEAN,), std=(STD,))
    original = load_model(BASELINES[args.model], arch=args.model, image_size=28).model
    example = data.val_x[:1]
    plain, plain_ratio = plain_prune(copy.deepcopy(original), example, args.target)
    coupling = graph.trace(copy.deepcopy(original), example)
    ours, result = pruning.search(coupling, pruning.score_groups(coupling, criteria.get_criterion("l2")),
                                  target_ratio=args.target, max_prune_fraction=0.75)
    print(f"FLOPs ratio: plain pruning {plain_ratio:.4f}, ours {result.achieved_ratio:.4f}")
    settings = FinetuneSettings(epochs=args.epochs, batch_size=32, lr=0.02, optimizer="sgd", weight_decay=5e-4,
                                distill=True, temperature=4.0, alpha=0.7, seed=args.seed)
    for name, model in (("plain pruning", plain), ("our pruning", ours)):
        right_after = accuracy(model, data.val_x, data.val_y)
        recalibrated = copy.deepcopy(model)
        recalibrate_bn(recalibrated, data.train_x, batch_size=32)
        by_plain = copy.deepcopy(model)
        plain_finetune(by_plain, data.train_x, data.train_y, epochs=args.epochs, seed=args.seed)
        by_ours = copy.deepcopy(recalibrated)
        history = Cycle(by_ours, data, settings, teacher=copy.deepcopy(original), device=torch.device("cpu")).run().history
        curve = " -> ".join(f"{h['val_accuracy']:.2%}" for h in history)
        print(f"{name}: right after {right_after:.2%}, after BN recalibration {accuracy(recalibrated, data.val_x, data.val_y):.2%}, "
              f"plain fine-tuning {accuracy(by_plain, data.val_x, data.val_y):.2%}, our fine-tuning "
              f"{curve}", flush=True)


if __name__ == "__main__":
    main()

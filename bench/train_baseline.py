"""Train a model from ``models/`` on Fashion-MNIST and save its state dict.

    python bench/train_baseline.py --model resnet20 --train-size 20000 --epochs 4 --out models/demo/resnet20_fmnist.pt

The split is ``bench/fmnist.py``'s; training uses SGD with a one-cycle schedule.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.fmnist import MEAN, STD, load_split  # noqa: E402
from models import create_model  # noqa: E402


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(x).float() / 255.0 - MEAN) / STD).unsqueeze(1)


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 500):
            correct += (model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum().item()
    return correct / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--half", action="store_true", help="store the weights in float16 (half the file; loads as float32)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = load_split()
    x, y = to_tensor(train_x[: args.train_size]), torch.from_numpy(train_y[: args.train_size])
    tx, ty = to_tensor(test_x), torch.from_numpy(test_y)
    model = create_model(args.model, num_classes=10, in_channels=1, image_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * ((len(x) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.25)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb = x[idx]
            if torch.rand(1, generator=g).item() < 0.5:  # horizontal flip: clothes are left-right symmetric
                xb = xb.flip(3)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, tx, ty)
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f} test acc {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if args.half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB), test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()

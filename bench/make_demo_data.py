"""Write the demo's data sample: 4,000 Fashion-MNIST images (400 per class) from the benchmark test
split, so none of them was seen when the demo model was trained.

    python bench/make_demo_data.py --out models/demo/fmnist_sample.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.fmnist import load_split  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=400)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    _, _, x, y = load_split()
    idx = np.concatenate([np.flatnonzero(y == c)[: args.per_class] for c in range(10)])
    idx = np.random.default_rng(1).permutation(idx)
    np.savez_compressed(args.out, images=x[idx], labels=y[idx].astype(np.uint8))
    print(f"saved {args.out}: {len(idx)} images, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

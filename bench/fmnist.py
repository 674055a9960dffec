"""Fashion-MNIST from the workplace's shared folder, with the fixed split every benchmark uses.

Split: seeded (seed 0) and stratified, 1,000 test images per class (10,000 in all), the remaining
60,000 for training. The test set is never used for choices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion_mnist.npz"
MEAN, STD = 0.2860, 0.3530
SPLIT_SEED = 0
TEST_PER_CLASS = 1000


def load_split(path: Path = DATA) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(train_x, train_y, test_x, test_y)``: uint8 images of shape (N, 28, 28) and labels."""
    if not path.exists():
        raise SystemExit(f"{path} not found: the benchmarks need the workplace's shared Fashion-MNIST file")
    with np.load(path) as f:
        x, y = f["images"], f["labels"].astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    test_idx = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:TEST_PER_CLASS] for c in range(int(y.max()) + 1)]
    )
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[test_idx] = True
    train_idx = rng.permutation(np.flatnonzero(~test_mask))
    test_idx = rng.permutation(test_idx)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]

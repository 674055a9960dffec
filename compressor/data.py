"""Labelled image data for every stage, through one interface: :class:`LoadedData`.

Sources: an ``.npz`` archive or a ``.pt``/``.pth`` dict of tensors (:mod:`compressor.arrays`), a folder
with one sub-folder per class (:mod:`compressor.images`), or ``package.module:function`` returning a
torch ``Dataset`` or a (train, val) pair of them. A seeded, stratified split gives the validation set,
unless a separate one is given (``val_path``). Small arrays are held in memory as normalised float32
tensors (the fast path); folders, factories and large arrays are read lazily through a ``DataLoader``,
so memory does not grow with the number of images. Every problem a user can fix is a ``DataError``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import arrays, images
from .errors import ConfigError, DataError
from .preprocess import Preprocessing, model_channels, resolve
from .sources import Scanned, scan_data, _Prepared

__all__ = ["DataInfo", "LoadedData", "Scanned", "scan_data", "prepare_data", "load_data", "iterate_batches",
           "default_workers"]

EVAL_BATCH_VALUES = 1 << 23
"""Input values per inference batch (:meth:`LoadedData.eval_batch_size`): 256 images up to 3x96x96, 55 at 3x224x224."""
STATS_SAMPLE = 512
"""Training images (seeded sample) the mean/std of lazily read images are computed on, when not given."""


def default_workers() -> int:
    """DataLoader worker processes for lazily read data: one core is left to the training loop."""
    return max(1, min(8, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True)
class DataInfo:
    """What was loaded and how: the facts a report needs to describe the data."""

    source: str  # the path as given
    kind: str  # "npz" | "folder" | "pt" | "factory"
    num_samples: int
    num_classes: int  # max label + 1 (or number of sub-folders for a folder)
    input_shape: tuple[int, int, int]  # (C, H, W) the model is fed
    layout: str  # layout found in the file: "NHW", "NCHW" or "NHWC" (folder: "NHWC")
    dtype: str  # dtype found in the file, e.g. "uint8", "float32"
    mean: tuple[float, ...]  # per channel, in [0,1] pixel units (after uint8 /255)
    std: tuple[float, ...]
    normalization: str  # "given", "model" (its data config) or "inferred" (computed on the training split)
    train_size: int
    val_size: int
    val_fraction: float
    seed: int
    class_names: tuple[str, ...] | None  # folder names for an image folder, else None
    lazy: bool = False  # read image by image (folders, factories, large arrays) rather than held in memory
    val_source: str | None = None  # a separate validation set (--val-data), instead of the split
    preprocessing: dict[str, Any] = field(default_factory=dict)  # Preprocessing.to_dict(): how to prepare an image
    skipped: tuple[str, ...] = ()  # unreadable images left out, "path (why)"


class TensorImages(torch.utils.data.Dataset):
    """The fast path: normalised float32 NCHW images and labels, held in memory."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


class _Indexed(torch.utils.data.Dataset):
    """``(image, label, index)``: the index lets a batch find its cached teacher logits."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, i


@dataclass(frozen=True)
class LoadedData:
    """Both splits as datasets of ``(normalised float32 CHW image, label)``, and how to read them.

    Stages read images only through :meth:`loader`, :meth:`batches` and :meth:`head`, and labels through
    :meth:`labels`; none of them holds a whole lazily read split.
    """

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    info: DataInfo
    notes: tuple[str, ...] = ()
    """What looks wrong but may be right (float images outside [0, 1], skipped files), for the report's warnings."""
    train_labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), repr=False)
    val_labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), repr=False)
    workers: int = 0
    """DataLoader worker processes for lazily read splits (0: in this process)."""
    preprocessing: Preprocessing | None = None
    _heads: dict = field(default_factory=dict, repr=False, compare=False)
    """:meth:`head` results: the example input and latency sample are asked for by several stages."""

    @classmethod
    def from_tensors(cls, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor | None = None,
                     val_y: torch.Tensor | None = None, info: DataInfo | None = None) -> "LoadedData":
        """In-memory data from tensors (tests and benchmarks build theirs this way)."""
        val_x = train_x if val_x is None else val_x
        val_y = train_y if val_y is None else val_y
        info = info or DataInfo(source="tensors", kind="pt", num_samples=len(train_x) + len(val_x),
                                num_classes=int(max(train_y.max(), val_y.max())) + 1,
                                input_shape=tuple(train_x.shape[1:]), layout="NCHW", dtype="float32",
                                mean=(0.0,) * train_x.shape[1], std=(1.0,) * train_x.shape[1], normalization="given",
                                train_size=len(train_x), val_size=len(val_x), val_fraction=0.0, seed=0, class_names=None)
        return cls(train=TensorImages(train_x, train_y), val=TensorImages(val_x, val_y), info=info,
                   train_labels=train_y, val_labels=val_y)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, TensorImages) and isinstance(self.val, TensorImages)

    def eval_batch_size(self, cap: int = 256) -> int:
        """A batch for inference that keeps activations bounded: ``cap`` at 28x28, fewer at 224x224
        (ResNet-18's activations on 256 such images alone take gigabytes)."""
        return max(1, min(cap, EVAL_BATCH_VALUES // max(1, math.prod(self.info.input_shape))))

    def split(self, name: str) -> torch.utils.data.Dataset:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def labels(self, split: str = "val") -> torch.Tensor:
        """Every label of ``split`` (known without reading an image)."""
        return self.train_labels if split == "train" else self.val_labels

    def __len__(self) -> int:
        return len(self.train)

    def head(self, n: int, split: str = "val") -> torch.Tensor:
        """The first ``n`` images of ``split`` as one tensor (example input, latency sample)."""
        ds = self.split(split)
        if isinstance(ds, TensorImages):
            return ds.x[:n]
        n = min(n, len(ds))
        cached = next((x for (s, m), x in self._heads.items() if s == split and m >= n), None)
        if cached is None:
            cached = self._heads[(split, n)] = torch.stack([ds[i][0] for i in range(n)])
        return cached[:n]

    def batches(self, split: str = "val", *, batch_size: int, limit: int | None = None,
                pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` of ``split`` in order, unaugmented; at most ``limit`` batches."""
        for x, y, _ in self.loader(split, batch_size=batch_size, pin_memory=pin_memory, limit=limit):
            yield x, y

    def loader(self, split: str, *, batch_size: int, order: torch.Tensor | None = None, augment: str = "none",
               pin_memory: bool = False, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(images, labels, indices)`` batches of ``split`` in ``order`` (default: as stored).

        ``augment`` (``--augment``) applies to the training split: ``light`` random crops and flips,
        ``strong`` adds TrivialAugment (image files) and MixUp/CutMix, whose labels come as (batch, classes)
        probabilities. ``limit``: stop after that many batches (nothing beyond is read).
        """
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        ds = self.split(split)
        order = torch.arange(len(ds)) if order is None else order
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)][:limit]
        mix = _mixer(self.info.num_classes) if augment == "strong" else None
        if isinstance(ds, TensorImages):
            for idx in chunks:
                x, y = ds.x[idx], ds.y[idx]
                if augment != "none":
                    x = _crop_flip(x)
                if mix is not None:
                    x, y = mix(x, y)
                yield x, y, idx
            return
        if augment != "none":
            ds = self._augmented(ds, augment)
        loader = torch.utils.data.DataLoader(_Indexed(ds), batch_sampler=[c.tolist() for c in chunks],
                                             num_workers=self.workers if len(chunks) > 1 else 0,
                                             pin_memory=pin_memory)
        for x, y, idx in loader:
            if mix is not None:
                x, y = mix(x, y)
            yield x, y, idx

    def _augmented(self, ds, augment: str):
        if isinstance(ds, arrays.ArrayImages):  # arrays at their own (often tiny) size: crop with padding, flip
            return ds.with_transform(_crop_flip_one)
        assert self.preprocessing is not None and hasattr(ds, "with_transform")
        return ds.with_transform(self.preprocessing.train_transform(augment))

    # -- in-memory conveniences (tests, benchmarks): they materialise a lazily read split ----------------

    @property
    def train_x(self) -> torch.Tensor:
        return self._all("train")

    @property
    def val_x(self) -> torch.Tensor:
        return self._all("val")

    @property
    def train_y(self) -> torch.Tensor:
        return self.train_labels

    @property
    def val_y(self) -> torch.Tensor:
        return self.val_labels

    def _all(self, split: str) -> torch.Tensor:
        ds = self.split(split)
        return ds.x if isinstance(ds, TensorImages) else self.head(len(ds), split)


def _crop_flip(x: torch.Tensor) -> torch.Tensor:
    """``light`` on a batch of small in-memory images: each shifted by a random crop of the image padded
    by an eighth of its size (zeros: the mean after normalisation), half of them mirrored. One gather
    for the whole batch, so it stays cheap at 28x28."""
    n, _, h, w = x.shape
    ph, pw = max(1, h // 8), max(1, w // 8)
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    dy = torch.randint(0, 2 * ph + 1, (n, 1, 1))
    dx = torch.randint(0, 2 * pw + 1, (n, 1, 1))
    rows = (dy + torch.arange(h).view(1, h, 1)).expand(n, h, w)
    cols = (dx + torch.arange(w).view(1, 1, w)).expand(n, h, w)
    flip = torch.rand(n) < 0.5
    cols = torch.where(flip.view(n, 1, 1), cols.flip(2), cols)
    batch = torch.arange(n).view(n, 1, 1).expand(n, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def _crop_flip_one(x: torch.Tensor) -> torch.Tensor:
    return _crop_flip(x.unsqueeze(0))[0]


def _mixer(num_classes: int):
    """MixUp or CutMix, one of the two per batch (torchvision v2)."""
    from torchvision.transforms import v2

    return v2.RandomChoice([v2.MixUp(num_classes=num_classes), v2.CutMix(num_classes=num_classes)])


# -- preparing ---------------------------------------------------------------------------------------


def load_data(path: str | Path, *, val_fraction: float = 0.2, seed: int = 0, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None, val_path: str | Path | None = None, model: nn.Module | None = None,
              input_size: tuple[int, int] | None = None, crop_pct: float | None = None,
              interpolation: str | None = None, workers: int | None = 0) -> LoadedData:
    """:func:`scan_data` then :func:`prepare_data`."""
    if (mean is None) != (std is None):
        raise DataError("--mean and --std must be given together", hint="pass both, or neither to infer them")
    return prepare_data(scan_data(path, val_path=val_path, stats_given=mean is not None), model=model,
                        val_fraction=val_fraction, seed=seed, mean=mean, std=std, input_size=input_size,
                        crop_pct=crop_pct, interpolation=interpolation, workers=workers)


def prepare_data(scanned: Scanned, *, model: nn.Module | None = None, val_fraction: float = 0.2, seed: int = 0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 input_size: tuple[int, int] | None = None, crop_pct: float | None = None,
                 interpolation: str | None = None, workers: int | None = None) -> LoadedData:
    """The splits with the preprocessing that matches ``model`` (see :mod:`compressor.preprocess`).

    Without ``mean``/``std`` (and without a model that says), the per-channel statistics are computed on
    the training split only, so nothing about the validation images leaks into the model.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    if (mean is None) != (std is None):
        raise DataError("--mean and --std must be given together", hint="pass both, or neither to infer them")
    channels = scanned.channels
    if scanned.kind in ("folder", "factory"):
        wanted = model_channels(model)
        if wanted is not None and wanted not in (1, 3):
            raise DataError(f"the model takes {wanted} input channels; images are read as 1 (greyscale) or 3 (RGB)")
        channels = wanted or channels
    given = _given_stats(mean, std, channels=channels) if mean is not None else None
    prep = resolve(model=model, given_size=input_size, data_size=scanned.size, crop_pct=crop_pct,
                   interpolation=interpolation, channels=channels, arrays=scanned.kind in ("npz", "pt"),
                   stats=given, stats_source="given", size_example=scanned.size_example)
    train_idx, val_idx, labels = _indices(scanned, val_fraction=val_fraction, seed=seed)
    workers = default_workers() if workers is None else workers
    if scanned.kind in ("npz", "pt"):
        train, val, prep, lazy = _array_splits(scanned, train_idx, val_idx, prep)
    else:
        train, val, prep = _lazy_splits(scanned, train_idx, val_idx, prep, seed=seed, workers=workers)
        lazy = True
    val_labels = scanned.val.labels if scanned.val is not None else scanned.labels[val_idx]
    info = DataInfo(
        source=scanned.source, kind=scanned.kind, num_samples=len(train_idx) + len(val_idx),
        num_classes=scanned.num_classes, input_shape=(channels, *prep.input_size), layout=scanned.layout,
        dtype=scanned.dtype, mean=prep.mean, std=prep.std, normalization=dict(prep.sources)["mean_std"],
        train_size=len(train_idx), val_size=len(val_idx), val_fraction=float(val_fraction), seed=seed,
        class_names=scanned.class_names, lazy=lazy, val_source=scanned.val.source if scanned.val is not None else None,
        preprocessing=prep.to_dict(),
        skipped=tuple(f"{f} ({why})" for s in (scanned, scanned.val) if s is not None and s.folder is not None
                      for f, why in s.folder.unreadable))
    return LoadedData(train=train, val=val, info=info, notes=scanned.notes,
                      train_labels=torch.from_numpy(labels[train_idx]), val_labels=torch.from_numpy(val_labels),
                      workers=workers if lazy else 0, preprocessing=prep)


def _indices(scanned: Scanned, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = scanned.labels
    if len(labels) < scanned.num_classes and scanned.class_names is None:
        raise DataError(f"{len(labels)} images for {scanned.num_classes} classes (labels go up to {scanned.num_classes - 1})")
    if scanned.val is not None:
        train_idx = np.random.default_rng(seed).permutation(len(labels))
        return train_idx, np.arange(len(scanned.val.labels)), labels
    train_idx, val_idx = _split(labels, num_classes=scanned.num_classes, val_fraction=val_fraction, seed=seed)
    if len(val_idx) == 0:
        raise DataError("the validation split is empty: every class has a single image",
                        hint="add at least a second image to one of the classes")
    return train_idx, val_idx, labels


def _array_splits(s: Scanned, train_idx: np.ndarray, val_idx: np.ndarray, prep: Preprocessing):
    val_images = s.val.images if s.val is not None else s.images
    lazy = isinstance(s.images, arrays.PreadArray) or isinstance(val_images, arrays.PreadArray) or \
        len(s.labels) * int(np.prod(s.images.shape[1:])) * 4 > arrays.IN_MEMORY_LIMIT
    import dataclasses

    if lazy:
        stats = (prep.mean, prep.std) if prep.mean else arrays.array_stats(s.images, train_idx, layout=s.layout)
        val_labels = s.val.labels if s.val is not None else s.labels[val_idx]
        train = arrays.ArrayImages(s.images, train_idx, s.labels[train_idx], layout=s.layout, stats=stats)
        val = arrays.ArrayImages(val_images, val_idx, val_labels, layout=s.layout, stats=stats)
        return train, val, dataclasses.replace(prep, mean=stats[0], std=stats[1]), True
    train_x = arrays._to_nchw_float(s.images, train_idx, layout=s.layout)
    val_x = arrays._to_nchw_float(val_images, val_idx, layout=s.layout)
    stats = (prep.mean, prep.std) if prep.mean else arrays._channel_stats(train_x)
    for x in (train_x, val_x):
        arrays._normalise_(x, stats)
    val_labels = s.val.labels if s.val is not None else s.labels[val_idx]
    return (TensorImages(train_x, torch.from_numpy(s.labels[train_idx])),
            TensorImages(val_x, torch.from_numpy(val_labels)), dataclasses.replace(prep, mean=stats[0], std=stats[1]), False)


def _lazy_splits(s: Scanned, train_idx: np.ndarray, val_idx: np.ndarray, prep: Preprocessing, *, seed: int,
                 workers: int):
    import dataclasses

    def build(scanned: Scanned, idx: np.ndarray, transform):
        if scanned.folder is not None:
            return images.FileImages(tuple(scanned.folder.files[i] for i in idx), scanned.labels[idx],
                                     mode=prep.channel_order, transform=transform)
        return _Prepared(scanned.dataset, idx, scanned.labels[idx], prep.channel_order, transform)

    if s.kind == "factory" and prep.resize is None:  # factory images of unknown sizes: always brought to the size
        prep = dataclasses.replace(prep, resize=tuple(prep.input_size))
    if not prep.mean:
        sample = np.random.default_rng(seed).permutation(train_idx)[:STATS_SAMPLE]
        stats = _sample_stats(build(s, sample, prep.unnormalised_transform()), workers=workers)
        prep = dataclasses.replace(prep, mean=stats[0], std=stats[1])
    transform = prep.eval_transform()
    val_source = s.val if s.val is not None else s
    return build(s, train_idx, transform), build(val_source, val_idx, transform), prep


def _sample_stats(ds, *, workers: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a dataset of unnormalised images, in float64, one pass."""
    total = squares = None
    count = 0
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers if len(ds) > 64 else 0)
    for x, _ in loader:
        x = x.double()
        part, sq = x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))
        total, squares = (part, sq) if total is None else (total + part, squares + sq)
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def _given_stats(
    mean: Sequence[float], std: Sequence[float], *, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Check the user's mean/std and broadcast a single value to every channel."""
    values = {}
    for flag, given in (("--mean", mean), ("--std", std)):
        given = [float(v) for v in given]
        if len(given) not in (1, channels):
            raise DataError(f"{flag} has {len(given)} values but the images have {channels} channel(s)")
        if not all(np.isfinite(given)):
            raise DataError(f"{flag} must hold finite numbers, got {given}")
        values[flag] = tuple(given * channels if len(given) == 1 else given)
    if any(s <= 0 for s in values["--std"]):
        raise DataError(f"--std values must be positive, got {list(values['--std'])}")
    return values["--mean"], values["--std"]




def _split(labels: np.ndarray, *, num_classes: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified split: about ``val_fraction`` of each class, never a whole class, to validation."""
    rng = np.random.default_rng(seed)
    # A stable sort groups the indices by class in one pass, instead of one scan of labels per class.
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(np.bincount(labels, minlength=num_classes))[:-1])
    train_parts, val_parts = [], []
    for members in by_class:
        n = len(members)
        if n == 0:
            continue
        n_val = min(max(round(n * val_fraction), 1 if n >= 2 else 0), n - 1)
        members = rng.permutation(members)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    train_idx = rng.permutation(np.concatenate(train_parts))
    val_idx = rng.permutation(np.concatenate(val_parts))
    return train_idx, val_idx




def iterate_batches(
    x: torch.Tensor, y: torch.Tensor, *, batch_size: int, shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches in order, or in a ``generator``-drawn order; the last one may be short."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    n = len(x)
    if not shuffle:
        for start in range(0, n, batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx.to(x.device)], y[idx.to(y.device)]



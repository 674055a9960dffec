"""Where labelled images come from: a file, a folder or a factory, read as far as possible without the model.

:func:`scan_data` returns a :class:`Scanned`: labels, the size the images share (if any), their channel
count, and the images themselves only as a handle (an array, a list of files, the factory's dataset).
No pixel is converted here: what to convert them to depends on the model (``compressor.data``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import arrays, images
from .errors import DataError

SUPPORTED = ("an .npz file, a .pt/.pth file holding a dict of tensors, a folder with one sub-folder per class, "
             "or package.module:function returning a torch Dataset")


@dataclass(frozen=True)
class Scanned:
    """A source read as far as it can be without the model: labels, sizes, channels; no pixel converted."""

    source: str
    kind: str
    labels: np.ndarray
    num_classes: int
    channels: int
    size: tuple[int, int] | None
    """(H, W) shared by every image, or None when they differ."""
    class_names: tuple[str, ...] | None = None
    size_example: str = ""
    images: Any = None
    """Arrays: the images (a numpy array or an :class:`arrays.PreadArray`)."""
    layout: str = "NHWC"
    dtype: str = "uint8"
    notes: tuple[str, ...] = ()
    folder: images.ImageFolderScan | None = None
    dataset: torch.utils.data.Dataset | None = None
    """Factories: the dataset as returned."""
    val: "Scanned | None" = None
    """A separate validation set (``--val-data``), scanned alike."""


def is_factory(path: str | Path) -> bool:
    """``package.module:function`` rather than a path."""
    text = str(path)
    return ":" in text and not Path(text).exists() and all(p.isidentifier() for p in text.split(":")[0].split("."))


def scan_data(path: str | Path, *, val_path: str | Path | None = None, stats_given: bool = False) -> Scanned:
    """Read ``path`` (and ``val_path``) up to what needs no model: see :class:`Scanned`."""
    if is_factory(path):
        scanned, val = _scan_factory(str(path))
        return scanned if val is None else _with_val(scanned, val)
    scanned = _scan_path(Path(path), stats_given=stats_given)
    if val_path is None:
        return scanned
    val = (_scan_factory(str(val_path))[0] if is_factory(val_path) else
           _scan_path(Path(val_path), stats_given=stats_given, class_names=scanned.class_names))
    return _with_val(scanned, val)


def _with_val(train: Scanned, val: Scanned) -> Scanned:
    if val.kind != train.kind and {val.kind, train.kind} != {"npz", "pt"}:
        raise DataError(f"the validation data is a {val.kind} but the training data a {train.kind}",
                        hint="give --val-data in the same form as --data")
    if train.kind in ("npz", "pt") and val.images.shape[1:] != train.images.shape[1:]:
        raise DataError(f"validation images have shape {tuple(val.images.shape[1:])}, training images "
                        f"{tuple(train.images.shape[1:])}: they must match")
    if val.num_classes > train.num_classes and train.class_names is None:
        raise DataError(f"validation labels go up to {val.num_classes - 1}, training labels to {train.num_classes - 1}")
    size = train.size if val.size == train.size else None
    return Scanned(**{**train.__dict__, "val": val, "size": size, "notes": train.notes + val.notes,
                      "size_example": train.size_example or val.size_example})


def _scan_path(path: Path, *, stats_given: bool, class_names: tuple[str, ...] | None = None) -> Scanned:
    if not path.exists():
        raise DataError(f"data path {path} not found")
    if path.is_dir():
        scan = images.scan_folder(path, class_names=class_names)
        notes = ()
        if scan.unreadable:
            shown = ", ".join(f"{f} ({why})" for f, why in scan.unreadable[:5])
            notes = (f"{len(scan.unreadable)} unreadable image(s) of {len(scan.files) + len(scan.unreadable)} in "
                     f"{path} were skipped: {shown}" + (", ..." if len(scan.unreadable) > 5 else ""),)
        return Scanned(source=str(path), kind="folder", labels=scan.labels, num_classes=len(scan.class_names),
                       channels=1 if scan.all_grey else 3, size=scan.common_size, class_names=scan.class_names,
                       size_example=scan.size_example() if scan.example_sizes else "", folder=scan, notes=notes)
    kind = {".npz": "npz", ".pt": "pt", ".pth": "pt"}.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"unsupported data file {path}: expected {SUPPORTED}")
    raw, labels = arrays.read_npz(path) if kind == "npz" else arrays.read_pt(path)
    dtype = str(getattr(raw, "dtype", type(raw).__name__)).removeprefix("torch.")
    raw = raw if isinstance(raw, arrays.PreadArray) else arrays._as_numpy(raw)
    layout = arrays._find_layout(raw.shape)
    notes = arrays._check_values(raw, stats_given=stats_given) if not isinstance(raw, arrays.PreadArray) or \
        raw.dtype != np.uint8 else ()
    labels = arrays._check_labels(arrays._as_numpy(labels), num_images=len(raw))
    channels = raw.shape[-1] if layout == "NHWC" else (1 if layout == "NHW" else raw.shape[1])
    size = tuple(raw.shape[1:3]) if layout in ("NHW", "NHWC") else tuple(raw.shape[2:4])
    return Scanned(source=str(path), kind=kind, labels=labels, num_classes=int(labels.max()) + 1, channels=channels,
                   size=size, images=raw, layout=layout, dtype=dtype, notes=notes)


def _scan_factory(spec: str) -> tuple[Scanned, Scanned | None]:
    module_name, _, attr = spec.partition(":")
    try:
        made = getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError) as exc:
        raise DataError(f"--data {spec}: {type(exc).__name__}: {exc}",
                        hint="package.module:function must be importable and return a torch Dataset") from exc
    except Exception as exc:  # the user's function failed: say so in one line
        raise DataError(f"--data {spec} raised {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from exc
    pair = isinstance(made, (tuple, list))
    if pair and len(made) != 2 or not all(isinstance(d, torch.utils.data.Dataset) for d in (made if pair else [made])):
        raise DataError(f"--data {spec} returned {type(made).__name__}; expected a torch Dataset or a (train, val) pair")
    parts = [_factory_part(spec, d) for d in (made if pair else [made])]
    return parts[0], (parts[1] if pair else None)


def _factory_part(spec: str, ds: torch.utils.data.Dataset) -> Scanned:
    if len(ds) == 0:
        raise DataError(f"--data {spec} returned an empty dataset")
    targets = getattr(ds, "targets", None)
    # Without a ``targets`` attribute every item is read once, for the labels the split needs.
    labels = np.asarray(targets if targets is not None else [int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)
    first = ds[0][0]
    if isinstance(first, torch.Tensor):
        channels, size = int(first.shape[0]) if first.dim() == 3 else 1, tuple(first.shape[-2:])
    elif hasattr(first, "size") and hasattr(first, "mode"):  # a PIL image
        channels, size = (1 if first.mode in ("L", "1", "LA", "I;16", "I", "F") else 3), (first.size[1], first.size[0])
    else:
        raise DataError(f"--data {spec}: items must be (image, label) with a PIL image or a CHW tensor, got {type(first).__name__}")
    return Scanned(source=spec, kind="factory", labels=arrays._check_labels(labels, num_images=len(ds)),
                   num_classes=int(labels.max()) + 1, channels=channels, size=size, dataset=ds,
                   class_names=tuple(getattr(ds, "classes", ())) or None, dtype=type(first).__name__)


class _Prepared(torch.utils.data.Dataset):
    """A factory's items with the preprocessing applied to PIL images (tensors are taken as prepared)."""

    def __init__(self, dataset, indices: np.ndarray, labels: np.ndarray, mode: str, transform) -> None:
        self.dataset, self.indices, self.labels, self.mode, self.transform = dataset, indices, labels, mode, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x = self.dataset[int(self.indices[i])][0]
        if not isinstance(x, torch.Tensor):
            x = self.transform(images.to_mode(x, self.mode))
        return x, int(self.labels[i])

    def with_transform(self, transform) -> "_Prepared":
        return _Prepared(self.dataset, self.indices, self.labels, self.mode, transform)

"""Labelled image data for fine-tuning and validation: read, checked, split and normalised.

Three sources are accepted: an ``.npz`` archive, a ``.pt``/``.pth`` dict of tensors, or a folder with
one sub-folder per class. Every problem a user can fix is raised as a ``DataError``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError

__all__ = ["DataInfo", "LoadedData", "load_data", "iterate_batches"]

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
_KEY_PAIRS = (("images", "labels"), ("x", "y"))
_EXPECTED_KEYS = "'images' and 'labels' (or 'x' and 'y')"
_NPZ_HINT = "save the data with np.savez(path, images=x, labels=y)"
_SUPPORTED = "an .npz file, a .pt/.pth file holding a dict of tensors, or a folder with one sub-folder per class"
_CHANNEL_COUNTS = (1, 3, 4)
_STD_FLOOR = 1e-6
_PIXEL_RANGE = (0.0, 1.0)
_RANGE_SLACK = 1e-3
_MAX_PIXEL = 255.0
"""Float images beyond this magnitude are refused: not even 0-255 pixel values."""
# Statistics and finiteness checks walk the data in slices of about this many values, so that no
# float64 or boolean copy of the whole dataset is ever made.
_CHUNK_VALUES = 1 << 22


@dataclass(frozen=True)
class DataInfo:
    """What was loaded and how: the facts a report needs to describe the data."""

    source: str  # the path as given
    kind: str  # "npz" | "folder" | "pt"
    num_samples: int
    num_classes: int  # max label + 1 (or number of sub-folders for a folder)
    input_shape: tuple[int, int, int]  # (C, H, W)
    layout: str  # layout found in the file: "NHW", "NCHW" or "NHWC" (folder: "NHWC")
    dtype: str  # dtype found in the file, e.g. "uint8", "float32"
    mean: tuple[float, ...]  # per channel, in [0,1] pixel units (after uint8 /255)
    std: tuple[float, ...]
    normalization: str  # "given" (user passed mean/std) or "inferred" (computed on the training split)
    train_size: int
    val_size: int
    val_fraction: float
    seed: int
    class_names: tuple[str, ...] | None  # folder names for an image folder, else None


@dataclass(frozen=True)
class LoadedData:
    """Both splits as float32 NCHW tensors, normalised with ``info.mean``/``info.std``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    info: DataInfo
    notes: tuple[str, ...] = ()
    """What looks wrong but may be right (float images outside [0, 1], for instance), for the report's warnings."""


def load_data(
    path: str | Path, *, val_fraction: float = 0.2, seed: int = 0,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
) -> LoadedData:
    """Read labelled images from ``path`` and return a seeded, stratified train/validation split.

    Without ``mean``/``std`` the per-channel statistics are computed on the training split only, so
    nothing about the validation images leaks into the model.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    if (mean is None) != (std is None):
        raise DataError("--mean and --std must be given together", hint="pass both, or neither to infer them")

    images, labels, kind, class_names = _read_source(Path(path))
    dtype = str(getattr(images, "dtype", type(images).__name__)).removeprefix("torch.")
    images = _as_numpy(images)
    # A folder is read as NHWC by us; guessing would misread images 3 or 4 pixels tall.
    layout = _find_layout(images.shape, known="NHWC" if kind == "folder" else None)
    notes = _check_values(images, stats_given=mean is not None)
    labels = _check_labels(_as_numpy(labels), num_images=len(images))
    num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    if len(images) < num_classes:
        raise DataError(f"{len(images)} images for {num_classes} classes (labels go up to {num_classes - 1})")
    channels = images.shape[-1] if layout == "NHWC" else (1 if layout == "NHW" else images.shape[1])
    given = _given_stats(mean, std, channels=channels) if mean is not None else None

    train_idx, val_idx = _split(labels, num_classes=num_classes, val_fraction=val_fraction, seed=seed)
    if len(val_idx) == 0:
        raise DataError(
            "the validation split is empty: every class has a single image",
            hint="add at least a second image to one of the classes",
        )
    train_x = _to_nchw_float(images, train_idx, layout=layout)
    val_x = _to_nchw_float(images, val_idx, layout=layout)
    del images  # the raw array is no longer needed; free it before the statistics pass

    stats = given if given is not None else _channel_stats(train_x)
    for x in (train_x, val_x):
        _normalise_(x, stats)

    info = DataInfo(
        source=str(path),
        kind=kind,
        num_samples=len(labels),
        num_classes=num_classes,
        input_shape=tuple(train_x.shape[1:]),
        layout=layout,
        dtype=dtype,
        mean=stats[0],
        std=stats[1],
        normalization="given" if given is not None else "inferred",
        train_size=len(train_idx),
        val_size=len(val_idx),
        val_fraction=float(val_fraction),
        seed=seed,
        class_names=class_names,
    )
    return LoadedData(
        train_x=train_x,
        train_y=torch.from_numpy(labels[train_idx]),
        val_x=val_x,
        val_y=torch.from_numpy(labels[val_idx]),
        info=info,
        notes=notes,
    )


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


# -- reading -----------------------------------------------------------------------------------------


def _read_source(path: Path) -> tuple[object, object, str, tuple[str, ...] | None]:
    """Dispatch on what ``path`` is; return raw images, raw labels, the kind and any class names."""
    if not path.exists():
        raise DataError(f"data path {path} not found")
    if path.is_dir():
        images, labels, names = _read_folder(path)
        return images, labels, "folder", names
    kind = {".npz": "npz", ".pt": "pt", ".pth": "pt"}.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"unsupported data file {path}: expected {_SUPPORTED}")
    images, labels = _read_npz(path) if kind == "npz" else _read_pt(path)
    return images, labels, kind, None


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # np.load raises many types for a damaged archive; all mean "unreadable"
        raise DataError(f"could not read {path}: {_one_line(exc)}", hint=_NPZ_HINT) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an .npz archive with {_EXPECTED_KEYS}")
    with archive:
        image_key, label_key = _pick_keys(path, list(archive.files))
        try:
            return archive[image_key], archive[label_key]
        except Exception as exc:  # a damaged member, or an object array that would need pickle
            raise DataError(f"could not read {path}: {_one_line(exc)}") from exc


def _read_pt(path: Path) -> tuple[object, object]:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all mean "not a data file we can read"
        raise DataError(
            f"could not read {path}: {_one_line(exc)}",
            hint=f"save the data with torch.save({{'images': x, 'labels': y}}, {path.name!r})",
        ) from exc
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}, expected a dict with {_EXPECTED_KEYS}")
    image_key, label_key = _pick_keys(path, [str(k) for k in content])
    return content[image_key], content[label_key]


def _pick_keys(path: Path, found: list[str]) -> tuple[str, str]:
    for pair in _KEY_PAIRS:
        if all(key in found for key in pair):
            return pair
    shown = ", ".join(repr(k) for k in found[:8]) + (", ..." if len(found) > 8 else "")
    raise DataError(f"{path} has no arrays named {_EXPECTED_KEYS}; found: {shown or 'nothing'}")


def _read_folder(root: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read a class-per-sub-folder tree into one uint8 NHWC array, checking every size first."""
    from PIL import Image  # only folder data needs Pillow

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class sub-folders", hint="put the images of each class in their own folder")
    files: list[Path] = []
    labels: list[int] = []
    for class_id, class_dir in enumerate(class_dirs):
        found = sorted(p for p in class_dir.iterdir() if p.is_file() and _is_image_name(p.name))
        if not found:
            raise DataError(f"class folder {class_dir} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
        files += found
        labels += [class_id] * len(found)

    # Opening reads only the header: sizes and modes are all known before any pixel is decoded.
    first_size: tuple[int, int] | None = None
    grey = True
    for file in files:
        try:
            with Image.open(file) as img:
                size, bands, mode = img.size, len(img.getbands()), img.mode
        except Exception as exc:  # Pillow raises several types for a damaged or unknown file
            raise DataError(f"could not read image {file}: {_one_line(exc)}") from exc
        if first_size is None:
            first_size = size
        elif size != first_size:
            raise DataError(
                f"images differ in size: {files[0]} is {first_size[0]}x{first_size[1]}, "
                f"{file} is {size[0]}x{size[1]} (width x height)",
                hint="resize all images to one size first",
            )
        grey = grey and bands == 1 and mode != "P"  # a palette image has one band but holds colours

    assert first_size is not None
    width, height = first_size
    mode, channels = ("L", 1) if grey else ("RGB", 3)
    images = np.empty((len(files), height, width, channels), dtype=np.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as img:
                images[i] = np.asarray(img.convert(mode)).reshape(height, width, channels)
        except Exception as exc:
            raise DataError(f"could not read image {file}: {_one_line(exc)}") from exc
    return images, np.asarray(labels, dtype=np.int64), tuple(p.name for p in class_dirs)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in _IMAGE_SUFFIXES


def _as_numpy(value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        # numpy has no bfloat16; widening is exact and the values are converted to float32 anyway
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, np.ndarray):
        return value
    raise DataError(f"expected images and labels as tensors or arrays, got {type(value).__name__}")


# -- checks ------------------------------------------------------------------------------------------


def _find_layout(shape: tuple[int, ...], *, known: str | None = None) -> str:
    if known is not None:
        layout = known
    elif len(shape) == 3:
        layout = "NHW"
    elif len(shape) == 4:
        if shape[-1] in _CHANNEL_COUNTS and shape[1] not in _CHANNEL_COUNTS:
            layout = "NHWC"
        elif shape[1] in _CHANNEL_COUNTS:
            layout = "NCHW"
        else:
            raise DataError(
                f"could not find the channel axis of images with shape {tuple(shape)}: "
                f"expected 1, 3 or 4 channels on axis 1 (NCHW) or on the last axis (NHWC)"
            )
    else:
        raise DataError(f"images must be 3-D (N, H, W) or 4-D (NCHW or NHWC), got shape {tuple(shape)}")
    if shape[0] == 0:
        raise DataError("the data holds zero images")
    spatial = shape[1:3] if layout in ("NHW", "NHWC") else shape[2:4]
    if 0 in spatial:
        raise DataError(f"images with shape {tuple(shape)} have zero height or width")
    return layout


def _check_values(images: np.ndarray, *, stats_given: bool) -> tuple[str, ...]:
    """Refuse non-finite values and float images that cannot be pixels; return a note for float images
    outside [0, 1] that the inferred statistics still normalise correctly."""
    if images.dtype == np.uint8:
        return ()
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError(
            f"images have dtype {images.dtype}; expected uint8 (0-255) or float (already scaled)",
            hint="convert 0-255 images to uint8, or other images to float32 in [0, 1]",
        )
    step = max(1, _CHUNK_VALUES // max(1, images[0].size))
    low, high = np.inf, -np.inf
    for start in range(0, len(images), step):
        chunk = images[start : start + step]
        if not np.isfinite(chunk).all():
            raise DataError("images contain NaN or infinite values")
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    if _PIXEL_RANGE[0] - _RANGE_SLACK <= low and high <= _PIXEL_RANGE[1] + _RANGE_SLACK:
        return ()
    found = f"float images range from {low:.4g} to {high:.4g}; expected [0, 1] pixel units"
    if max(abs(low), abs(high)) > _MAX_PIXEL:
        raise DataError(f"{found}, and values beyond +-{_MAX_PIXEL} cannot be pixels of any scale",
                        hint="scale the images to [0, 1] (or save 0-255 images as uint8)")
    if stats_given:
        raise DataError(f"{found}, and --mean/--std (in [0, 1] pixel units) would mis-normalise them",
                        hint="scale the images to [0, 1] (divide 0-255 values by 255), or omit --mean/--std "
                             "to compute them on the data")
    return (f"{found}; they were normalised with statistics computed on them, which works only if the "
            "deployed model gets images scaled the same way",)


def _check_labels(labels: np.ndarray, *, num_images: int) -> np.ndarray:
    """Return the labels as int64 after checking shape, type, count and sign."""
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D (one class id per image), got shape {labels.shape}")
    if len(labels) != num_images:
        raise DataError(f"{num_images} images but {len(labels)} labels: the counts must match")
    if np.issubdtype(labels.dtype, np.floating):
        if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            raise DataError("labels are floats that are not whole numbers; expected integer class ids")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels have dtype {labels.dtype}; expected integer class ids")
    labels = labels.astype(np.int64)
    if (labels < 0).any():
        raise DataError(f"labels must not be negative, found {int(labels.min())}")
    return labels


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


# -- split and conversion ----------------------------------------------------------------------------


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


def _to_nchw_float(images: np.ndarray, idx: np.ndarray, *, layout: str) -> torch.Tensor:
    """Gather ``idx`` and return a float32 NCHW tensor in [0,1] pixel units; one full-size copy."""
    picked = images[idx]  # fancy indexing copies, in the file's (usually compact) dtype
    if not picked.dtype.isnative:  # torch reads native byte order only
        picked = picked.astype(picked.dtype.newbyteorder("="))
    x = torch.from_numpy(picked)
    if layout == "NHW":
        x = x.unsqueeze(1)
    elif layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    scale = images.dtype == np.uint8
    x = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)
    return x.div_(255.0) if scale else x


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std, accumulated in float64 one slice at a time."""
    step = max(1, _CHUNK_VALUES // max(1, x[0].numel()))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, len(x), step):
        total += x[start : start + step].sum(dim=(0, 2, 3), dtype=torch.float64)
    mean = total / count
    # A second pass around the mean avoids the cancellation of E[x^2] - E[x]^2.
    squares = torch.zeros_like(total)
    for start in range(0, len(x), step):
        centred = x[start : start + step].double() - mean.view(1, -1, 1, 1)
        squares += centred.square().sum(dim=(0, 2, 3))
    std = (squares / count).sqrt().clamp_min(_STD_FLOOR)
    return tuple(mean.tolist()), tuple(std.tolist())


def _normalise_(x: torch.Tensor, stats: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
    mean = torch.tensor(stats[0], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(stats[1], dtype=x.dtype).view(1, -1, 1, 1)
    x.sub_(mean).div_(std)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no details"
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}"

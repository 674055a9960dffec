"""Images held as arrays (an ``.npz`` archive or a ``.pt`` dict of tensors): read, checked, converted.

Small data becomes float32 NCHW tensors in memory (the fast path). An archive whose float32 images would
exceed ``IN_MEMORY_LIMIT`` bytes is read lazily instead: from an uncompressed ``.npz`` row by row with
``os.pread`` (no copy, no mapping that would count as resident memory), otherwise from the archive's own
compact dtype held in memory (uint8 is a quarter of float32).
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

KEY_PAIRS = (("images", "labels"), ("x", "y"))
EXPECTED_KEYS = "'images' and 'labels' (or 'x' and 'y')"
_NPZ_HINT = "save the data with np.savez(path, images=x, labels=y)"
CHANNEL_COUNTS = (1, 3, 4)
_STD_FLOOR = 1e-6
_PIXEL_RANGE = (0.0, 1.0)
_RANGE_SLACK = 1e-3
_MAX_PIXEL = 255.0
"""Float images beyond this magnitude are refused: not even 0-255 pixel values."""
# Statistics and finiteness checks walk the data in slices of about this many values, so that no
# float64 or boolean copy of the whole dataset is ever made.
_CHUNK_VALUES = 1 << 22
IN_MEMORY_LIMIT = 1 << 30
"""Bytes of float32 images above which arrays are read lazily rather than converted in memory."""


def read_npz(path: Path) -> tuple[np.ndarray | "PreadArray", np.ndarray]:
    """Images and labels of an archive; the images lazily (:class:`PreadArray`) where they are large and
    stored uncompressed."""
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # np.load raises many types for a damaged archive; all mean "unreadable"
        raise DataError(f"could not read {path}: {_one_line(exc)}", hint=_NPZ_HINT) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an .npz archive with {EXPECTED_KEYS}")
    with archive:
        image_key, label_key = _pick_keys(path, list(archive.files))
        try:
            lazy = PreadArray.of_member(path, image_key)
            if lazy is None or lazy.nbytes / lazy.dtype.itemsize * 4 <= IN_MEMORY_LIMIT:
                return archive[image_key], archive[label_key]
            return lazy, archive[label_key]
        except DataError:
            raise
        except Exception as exc:  # a damaged member, or an object array that would need pickle
            raise DataError(f"could not read {path}: {_one_line(exc)}") from exc


class PreadArray:
    """An uncompressed ``.npy`` member of an ``.npz`` read row by row with ``os.pread``: nothing held,
    nothing mapped; pickles as a path and an offset (for DataLoader workers)."""

    def __init__(self, path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.offset, self.dtype, self.shape = str(path), offset, np.dtype(dtype), tuple(shape)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.ndim = len(shape)
        self._fd: int | None = None

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.shape[0]

    @classmethod
    def of_member(cls, path: Path, key: str) -> "PreadArray | None":
        """The member ``key`` where it is stored uncompressed in C order, else None."""
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(key + ".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if fortran or dtype.hasobject or len(shape) < 1:
                return None
            return cls(path, f.tell(), dtype, shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def _read(self, start: int, count: int) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        raw = os.pread(self._fd, count * self.row_bytes, self.offset + start * self.row_bytes)
        return np.frombuffer(raw, dtype=self.dtype).reshape((count, *self.shape[1:]))

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._read(int(key) % self.shape[0], 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("PreadArray slices take no step")
            return self._read(start, max(0, stop - start))
        idx = np.asarray(key, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        for i, row in enumerate(idx):
            out[i] = self._read(int(row), 1)[0]
        return out


def read_pt(path: Path) -> tuple[object, object]:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all mean "not a data file we can read"
        raise DataError(
            f"could not read {path}: {_one_line(exc)}",
            hint=f"save the data with torch.save({{'images': x, 'labels': y}}, {path.name!r})",
        ) from exc
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}, expected a dict with {EXPECTED_KEYS}")
    image_key, label_key = _pick_keys(path, [str(k) for k in content])
    return content[image_key], content[label_key]


def _pick_keys(path: Path, found: list[str]) -> tuple[str, str]:
    for pair in KEY_PAIRS:
        if all(key in found for key in pair):
            return pair
    shown = ", ".join(repr(k) for k in found[:8]) + (", ..." if len(found) > 8 else "")
    raise DataError(f"{path} has no arrays named {EXPECTED_KEYS}; found: {shown or 'nothing'}")


def _as_numpy(value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        # numpy has no bfloat16; widening is exact and the values are converted to float32 anyway
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, np.ndarray):
        return value
    raise DataError(f"expected images and labels as tensors or arrays, got {type(value).__name__}")


def _find_layout(shape: tuple[int, ...], *, known: str | None = None) -> str:
    if known is not None:
        layout = known
    elif len(shape) == 3:
        layout = "NHW"
    elif len(shape) == 4:
        if shape[-1] in CHANNEL_COUNTS and shape[1] not in CHANNEL_COUNTS:
            layout = "NHWC"
        elif shape[1] in CHANNEL_COUNTS:
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


def array_stats(images, idx: np.ndarray, *, layout: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`_channel_stats` of the rows ``idx`` without converting them all at once (lazy arrays)."""
    idx = np.sort(idx)  # in file order: sequential reads
    row = int(np.prod(images.shape[1:]))
    step = max(1, _CHUNK_VALUES // max(1, row))
    chunks = [idx[i : i + step] for i in range(0, len(idx), step)]
    total, count = None, 0
    for chunk in chunks:
        x = _to_nchw_float(images, chunk, layout=layout)
        part = x.sum(dim=(0, 2, 3), dtype=torch.float64)
        total = part if total is None else total + part
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    squares = torch.zeros_like(mean)
    for chunk in chunks:
        centred = _to_nchw_float(images, chunk, layout=layout).double() - mean.view(1, -1, 1, 1)
        squares += centred.square().sum(dim=(0, 2, 3))
    std = (squares / count).sqrt().clamp_min(_STD_FLOOR)
    return tuple(mean.tolist()), tuple(std.tolist())


class ArrayImages(torch.utils.data.Dataset):
    """Rows ``indices`` of an array (in memory or a :class:`PreadArray`), each converted when asked for
    to a normalised float32 CHW tensor: memory does not grow with the number of images."""

    def __init__(self, images, indices: np.ndarray, labels: np.ndarray, *, layout: str,
                 stats: tuple[tuple[float, ...], tuple[float, ...]], transform=None) -> None:
        self.images, self.indices, self.labels, self.layout = images, indices, labels, layout
        self.stats, self.transform = stats, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = _to_nchw_float(self.images, self.indices[i : i + 1], layout=self.layout)
        _normalise_(x, self.stats)
        x = x[0]
        return (self.transform(x) if self.transform is not None else x), int(self.labels[i])

    def with_transform(self, transform) -> "ArrayImages":
        return ArrayImages(self.images, self.indices, self.labels, layout=self.layout, stats=self.stats,
                           transform=transform)

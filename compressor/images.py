"""Image folders: found, checked once, then read lazily one image at a time.

The layout is torchvision's ``ImageFolder``: one sub-folder per class, the images anywhere below it
(nested folders are fine). Hidden files and folders and files that are not images by their suffix are
ignored. Every image is decoded once when the folder is scanned, in threads (Pillow releases the GIL),
so that a truncated or corrupt file is found before training rather than in the middle of it; its
pixels are not kept. Unreadable images are skipped and named; more than ``MAX_UNREADABLE`` of them
is an error.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MAX_UNREADABLE = 0.01
"""Share of unreadable images above which the run stops (below, they are skipped with a warning)."""
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_GREY_MODES = frozenset({"L", "LA", "1", "F"})
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees


@dataclass(frozen=True)
class ImageFolderScan:
    """What the scan found: the readable files, their labels and what they hold (no pixels)."""

    root: Path
    files: tuple[Path, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    sizes: frozenset[tuple[int, int]]
    """Distinct (H, W) of the images as a viewer shows them (after EXIF rotation)."""
    example_sizes: tuple[tuple[Path, tuple[int, int]], ...]
    """Two files of different sizes, for a message (empty when all share one)."""
    all_grey: bool
    unreadable: tuple[tuple[str, str], ...]
    """(file, why) of each image skipped."""

    @property
    def common_size(self) -> tuple[int, int] | None:
        return next(iter(self.sizes)) if len(self.sizes) == 1 else None

    def size_example(self) -> str:
        (a, (ha, wa)), (b, (hb, wb)) = self.example_sizes
        return f"{a} is {wa}x{ha}, {b} is {wb}x{hb} (width x height)"


def find_images(root: Path, *, class_names: tuple[str, ...] | None = None) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """The image files below ``root``'s class folders, with class ids (``class_names`` fixes the ids,
    for a separate validation folder)."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{root} has no class sub-folders", hint="put the images of each class in their own folder")
    names = tuple(p.name for p in dirs)
    if class_names is not None:
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise DataError(f"the validation folder {root} has classes the training data lacks: {', '.join(unknown[:5])}",
                            hint="both folders must use the same class folder names")
    ids = {name: i for i, name in enumerate(class_names or names)}
    files: list[Path] = []
    labels: list[int] = []
    for d in dirs:
        found = sorted(_walk(d))
        if not found:
            raise DataError(f"class folder {d} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})",
                            hint="remove the empty folder or add its images")
        files += found
        labels += [ids[d.name]] * len(found)
    return files, labels, class_names or names


def _walk(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames if is_image_name(f)]
    return out


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def scan_folder(root: Path, *, class_names: tuple[str, ...] | None = None, threads: int | None = None) -> ImageFolderScan:
    """Find, open and decode every image once; refuse decompression bombs; collect the unreadable."""
    files, labels, names = find_images(root, class_names=class_names)
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        probes = list(pool.map(_probe, files))
    bad: list[tuple[str, str]] = []
    sizes: dict[tuple[int, int], Path] = {}
    grey = True
    for file, (size, bands, why) in zip(files, probes):
        if why is not None:
            bad.append((str(file), why))
            continue
        sizes.setdefault(size, file)
        grey = grey and bands == 1
    examples = tuple((f, s) for s, f in list(sizes.items())[:2]) if len(sizes) > 1 else ()
    if bad and len(bad) > MAX_UNREADABLE * len(files):
        shown = "; ".join(f"{f} ({why})" for f, why in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DataError(f"could not read image {shown}: {len(bad)} of {len(files)} images are unreadable "
                        f"(more than {MAX_UNREADABLE:.0%})", hint="remove or repair the damaged files")
    ok = [why is None for _, _, why in probes]
    return ImageFolderScan(root=root, files=tuple(f for f, good in zip(files, ok) if good),
                           labels=np.asarray([lab for lab, good in zip(labels, ok) if good], dtype=np.int64),
                           class_names=names, sizes=frozenset(sizes), example_sizes=examples, all_grey=grey,
                           unreadable=tuple(bad))


def _probe(file: Path) -> tuple[tuple[int, int], int, str | None]:
    """(H, W) as shown, band count, and why the image cannot be read (None when it can)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; a bomb is a bomb either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                w, h = img.size
                swapped = img.getexif().get(_EXIF_ORIENTATION) in _SWAPS_SIDES
                bands = 1 if img.mode in _SIXTEEN_BIT or img.mode in _GREY_MODES else 3
                img.draft(img.mode, (1, 1))  # JPEG: decode at reduced scale; a truncated file still fails
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{file} is {_pixels(exc)}, beyond Pillow's decompression-bomb limit of "
                        f"{Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS)",
                        hint="shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except Exception as exc:  # Pillow raises many types for damaged files; each means "skip it"
        return (0, 0), 0, " ".join(str(exc).split())[:120] or type(exc).__name__
    return ((w, h) if swapped else (h, w)), bands, None


def _pixels(exc: BaseException) -> str:
    text = str(exc)
    return text.split("(")[1].split(" pixels")[0] + " pixels" if "(" in text and " pixels" in text else "too large"


def open_image(file: Path | str, mode: str):
    """The image as a viewer shows it (EXIF rotation applied), converted to ``mode`` (``RGB`` or ``L``)."""
    from PIL import Image, ImageOps

    with Image.open(file) as img:
        img = ImageOps.exif_transpose(img)
        return to_mode(img, mode)


def to_mode(img: Any, mode: str):
    """Convert any Pillow mode to ``RGB`` or ``L``: 16-bit scaled down (Pillow's own conversion clips it),
    alpha dropped, palettes and CMYK expanded."""
    from PIL import Image

    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / 257.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == mode:
        return img.copy() if getattr(img, "fp", None) is not None else img
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "palette images with transparency": converting drops it, as intended
        if img.mode in ("P", "PA", "RGBA", "LA") and mode == "L":
            img = img.convert("RGBA" if img.mode != "LA" else "LA")
        return img.convert(mode)


class FileImages(torch.utils.data.Dataset):
    """(image, label) of a list of files, decoded when asked for: memory does not grow with their number."""

    def __init__(self, files: tuple[Path, ...], labels: np.ndarray, *, mode: str, transform: Callable) -> None:
        self.files = tuple(str(f) for f in files)  # strings pickle to worker processes cheaply
        self.labels = labels
        self.mode = mode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(open_image(self.files[i], self.mode)), int(self.labels[i])

    def with_transform(self, transform: Callable) -> "FileImages":
        return FileImages(tuple(Path(f) for f in self.files), self.labels, mode=self.mode, transform=transform)

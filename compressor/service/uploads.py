"""Uploads streamed to disk in chunks (size-limited, sha256 while streaming); safe zip extraction."""

from __future__ import annotations

import hashlib
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import BadUpload, InsufficientStorage, TooLarge

CHUNK = 1 << 20
MODEL_SUFFIXES = (".pt", ".pth", ".safetensors")
DATA_SUFFIXES = (".npz", ".zip")


def check_space(path: Path, need: int, min_free: int) -> None:
    free = shutil.disk_usage(path).free
    if free - need < min_free:
        raise InsufficientStorage(f"the data dir has {free // 2**20} MiB free, below the {min_free // 2**20} MiB "
                                  "the service keeps free", hint="free space or delete old jobs")


def kind_of(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in MODEL_SUFFIXES:
        return "model"
    if suffix in DATA_SUFFIXES:
        return "data"
    raise BadUpload(f"cannot take a {suffix or 'suffix-less'} file ({name}): models are .pt/.pth/.safetensors "
                    "state dicts, data is .npz or a .zip image folder")


def save_stream(src: BinaryIO, dest: Path, max_bytes: int) -> tuple[int, str]:
    """Copy ``src`` to ``dest`` chunk by chunk; stop past ``max_bytes``. Returns (size, sha256)."""
    digest, size = hashlib.sha256(), 0
    tmp = dest.with_name(dest.name + ".part")
    try:
        with open(tmp, "wb") as fh:
            while chunk := src.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(f"the upload is larger than the limit of {max_bytes} bytes")
                digest.update(chunk)
                fh.write(chunk)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return size, digest.hexdigest()


def check_model(path: Path) -> None:
    """A model must load without unpickling code: torch's weights_only loader or safetensors."""
    import torch

    if path.suffix == ".safetensors":
        return
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal of the safe loader is the user's to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadUpload(f"the model does not load as a plain state dict (weights only): {first[:200]}",
                        hint="save model.state_dict() and give arch") from None
    if not isinstance(obj, dict):
        raise BadUpload(f"the model file holds a {type(obj).__name__}, not a state dict")


def check_npz(path: Path) -> None:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            z.files  # noqa: B018
    except Exception as exc:  # noqa: BLE001
        raise BadUpload(f"the data is not a readable .npz (no pickles): {str(exc)[:200]}") from None


def safe_extract(zip_path: Path, dest: Path, *, max_files: int, max_bytes: int) -> None:
    """Extract a zip refusing absolute paths, ``..``, symlinks and device files, past limits of count and size."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise BadUpload("the data .zip is not a valid zip file") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_files:
            raise BadUpload(f"the zip holds {len(infos)} entries, more than the limit of {max_files}")
        total = 0
        for info in infos:
            name = info.filename
            p = PurePosixPath(name)
            if name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts or ":" in name or "\\" in name:
                raise BadUpload(f"the zip entry {name!r} points outside the folder")
            mode = info.external_attr >> 16
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BadUpload(f"the zip entry {name!r} is a link or device file")
            total += info.file_size
            if total > max_bytes:
                raise BadUpload(f"the zip unpacks to more than the limit of {max_bytes} bytes")
        dest.mkdir(parents=True)
        root = dest.resolve()
        written = 0
        for info in infos:
            target = (dest / info.filename).resolve()
            if root not in target.parents and target != root:
                raise BadUpload(f"the zip entry {info.filename!r} points outside the folder")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(CHUNK):  # the header's size may lie: count what comes out
                    written += len(chunk)
                    if written > max_bytes:
                        raise BadUpload(f"the zip unpacks to more than the limit of {max_bytes} bytes")
                    out.write(chunk)

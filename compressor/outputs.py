"""The output directory: staged in a temporary sibling, moved into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError


def check_output_dir(out: Path, *, overwrite: bool, inputs: tuple[Path, ...]) -> None:
    """Fail before any work if ``out`` cannot be written without losing something."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a directory")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"--out {out} already exists", hint="pass --overwrite to replace it, or choose another --out")
    resolved = out.resolve()
    for path in inputs:
        p = path.resolve()
        if p == resolved or resolved in p.parents:
            raise OutputExistsError(f"--out {out} contains the input {path}; replacing it would delete the input",
                                    hint="choose another --out")


@contextlib.contextmanager
def staged_output(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out`` in one rename, on failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        if not overwrite:
            shutil.rmtree(stage, ignore_errors=True)
            raise OutputExistsError(f"--out {out} appeared while compressing", hint="pass --overwrite")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

"""The output directory: checked before any work, staged in a temporary sibling, moved into place only
when complete.

``--out`` may be a symbolic link to a directory: with ``--overwrite`` the directory it points to is
replaced and the link is kept (the output is written where the link leads). A link that leads nowhere,
or to something that is not a directory, is refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError

REPORT_BYTES = 1 << 20
"""Room kept for report.json and report.md on top of the models' expected size."""


class InterruptedAfterOutput(KeyboardInterrupt):
    """SIGINT arrived once the output was complete (at or after its final rename): nothing was lost."""

    def __init__(self, out: Path) -> None:
        super().__init__(str(out))
        self.out = out


def expected_bytes(model_path: Path) -> int:
    """What the outputs take at most: model.onnx, original.onnx and model.pt, each no bigger than the
    original's weights, plus the reports."""
    try:
        size = model_path.stat().st_size
    except OSError:
        size = 0
    return 3 * size + REPORT_BYTES


def check_output_dir(out: Path, *, overwrite: bool, inputs: tuple[Path, ...], needed_bytes: int = 0) -> None:
    """Fail before any work if ``out`` cannot be written, or not without losing something.

    Shared by everything that writes an output directory (``compress``, the service): the location is
    probed by creating and removing a file where the output will be staged, so a read-only or
    immutable directory, a file in the way or a missing parent that cannot be created are all found
    here, and so is a disk without room for ``needed_bytes``.
    """
    if out.is_symlink() and not out.exists():
        raise OutputExistsError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist",
                                hint="remove the link, or point it at a directory")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a directory")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"--out {out} already exists", hint="pass --overwrite to replace it, or choose another --out")
    target = _target(out)
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents or target.parent == target:
        raise OutputExistsError(f"--out {out} is the current directory or one above it; replacing it would delete "
                                "what you are working in", hint="choose a new sub-directory, e.g. --out runs/small")
    for path in inputs:
        p = path.resolve()
        if p == target or target in p.parents:
            raise OutputExistsError(f"--out {out} contains the input {path}; replacing it would delete the input",
                                    hint="choose another --out")
    _probe_writable(out, target, needed_bytes)


def _target(out: Path) -> Path:
    """The directory that will be written: ``out`` itself, or where a symbolic link ``out`` leads."""
    return out.resolve() if out.is_symlink() else Path(os.path.abspath(out))


def _probe_writable(out: Path, target: Path, needed_bytes: int) -> None:
    anchor = target.parent
    while not anchor.exists():  # the first existing ancestor is where missing parents would be created
        if anchor.is_symlink():
            raise OutputExistsError(f"--out {out}: {anchor} is a symbolic link that leads nowhere")
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OutputExistsError(f"--out {out} cannot be created: {anchor} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".compressor-probe.", dir=anchor)
    except OSError as exc:
        raise OutputExistsError(f"--out {out} cannot be written: {anchor} is not writable ({_reason(exc)})",
                                hint="choose another --out, or fix the directory's permissions") from None
    os.close(fd)
    os.unlink(probe)
    free = shutil.disk_usage(anchor).free
    if free < needed_bytes:
        raise OutputExistsError(f"--out {out}: {anchor} has {free / 2**20:.1f} MB free; the outputs need about "
                                f"{needed_bytes / 2**20:.1f} MB", hint="free some space or choose another --out")


def _reason(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_output(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out`` in one rename, on failure it is removed
    (with any parent directory made for it). The output directory gets the permissions of any directory
    the user makes (``0777`` less the umask), not ``mkdtemp``'s ``0700``."""
    target = _target(out)
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        stage.chmod(0o777 & ~_umask())
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for parent in created:  # the deepest first; one the user filled meanwhile stays
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    with _sigint_deferred() as interrupted:
        old = None
        if target.exists():
            if not overwrite:
                shutil.rmtree(stage, ignore_errors=True)
                raise OutputExistsError(f"--out {out} appeared while compressing", hint="pass --overwrite")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
        stage.rename(target)
        if old is not None:  # always a real directory: a symlinked --out is resolved to its target above
            shutil.rmtree(old, ignore_errors=True)
    if interrupted:
        raise InterruptedAfterOutput(out)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[list[int]]:
    """Hold SIGINT back while the output is swapped into place, so that it is never half-replaced; the
    yielded list says whether one came."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield got
    finally:
        signal.signal(signal.SIGINT, previous)

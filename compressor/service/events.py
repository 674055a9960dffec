"""The progress sink of a job: every call becomes one JSON line of ``events.jsonl``.

Kept in one small class so that it can be switched onto compress()'s typed events later.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from compressor.progress import Progress


class JsonlProgress(Progress):
    def __init__(self, path: Path) -> None:
        self._fh = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def emit(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"t": time.time(), "kind": kind, **fields}, default=str, allow_nan=False)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()

    def stage(self, name: str) -> None:
        self.emit("stage", name=name)

    def task(self, description: str, total: int) -> None:
        self.emit("task", description=description, total=total)

    def advance(self, n: int = 1, **metrics: float) -> None:
        clean = {k: (v if isinstance(v, (int, float)) and v == v and abs(v) != float("inf") else None)
                 for k, v in metrics.items()}
        self.emit("advance", n=n, metrics=clean)

    def done(self) -> None:
        self.emit("done")

    def heartbeat(self, what: str, *, seconds: float, rss: int | None) -> None:
        self.emit("heartbeat", what=what, seconds=seconds, rss=rss)

    def note(self, message: str) -> None:
        self.emit("note", message=message)

    def close(self) -> None:
        self._fh.close()


def read_events(path: Path, after: int = 0) -> list[dict[str, Any]]:
    """Events numbered from 1; those after ``after``."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if n <= after or not line.endswith("\n"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            out.append({"n": n, **ev})
    return out

"""Time and memory budgets for work that can run away (torch-pruning's tracing), and a heartbeat.

While the guarded block runs, a watchdog thread polls the clock and the process's resident memory.
Past a budget it interrupts the main thread with a signal whose handler raises, and the block ends
in a :class:`BudgetError` that names the budget and how to get under it. Every few seconds it tells
``Progress.heartbeat`` that the work is still alive, so a long trace does not look hung.

Signals reach only the main thread of a POSIX process: elsewhere (another thread, Windows) the
budgets are not enforced and only the heartbeat runs. Memory is read from ``/proc/self/statm``;
where there is none (macOS) the memory budget is not enforced either. The watchdog polls every
``POLL`` seconds, so a block that allocates many GB faster than that can still meet the kernel's
OOM killer first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

from .errors import BudgetError
from .progress import Progress

GB = 1 << 30
"""What ``--trace-memory`` counts in (and the heartbeat shows): 2**30 bytes."""
AUTO_MEMORY_FRACTION = 0.9
"""The default memory budget lets the process grow by this share of the memory available when tracing starts."""
POLL = 0.2
"""Seconds between two looks at the clock and the resident memory."""
HEARTBEAT_AFTER = 2.0
"""Seconds of silence before the first heartbeat: short blocks say nothing."""
HEARTBEAT_EVERY = 5.0
"""Seconds between two heartbeats after the first."""


def resident_bytes() -> int | None:
    """The process's resident set size, or None where ``/proc`` does not say."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # missing, or "max" (no cgroup limit)


def available_bytes() -> int | None:
    """Memory the process could still take: the kernel's MemAvailable, or what the cgroup limit
    leaves if that is less (in a container the OOM killer acts at the cgroup's limit, not the host's)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 1 << 60:  # cgroup v1 writes "no limit" as a huge number
            found.append(max(cap - used, 0))
    return min(found) if found else None


def memory_budget(gb: float | None) -> int | None:
    """The budget in bytes for ``--trace-memory gb``: None for 0 (no limit); for None, the default.

    The default is the resident memory now plus ``AUTO_MEMORY_FRACTION`` of what is available. It
    only stops a trace that was about to take the whole machine: without it that trace would end in
    swapping or in the OOM killer's SIGKILL, with no message at all. None where memory cannot be read.
    """
    if gb is not None:
        return int(gb * GB) or None
    rss, available = resident_bytes(), available_bytes()
    if rss is None or available is None:
        return None
    return rss + int(AUTO_MEMORY_FRACTION * available)


class _Stop(BaseException):
    """Raised in the main thread by the watchdog's signal; a BaseException so that no
    ``except Exception`` inside torch-pruning swallows it."""


class _Watchdog(threading.Thread):
    def __init__(self, *, seconds: float | None, memory: int | None, progress: Progress | None, label: str,
                 can_interrupt: bool) -> None:
        super().__init__(name="compressor-watchdog", daemon=True)
        self.seconds, self.memory, self.progress, self.label = seconds, memory, progress, label
        self.start_time = time.monotonic()
        self.finished = threading.Event()
        self.lock = threading.Lock()
        self.armed = can_interrupt
        self.tripped: tuple[str, float] | None = None  # ("time", seconds) or ("memory", bytes)
        self.raised = False
        self.blocking = True  # the guarded block is running
        self.sent = self.received = 0  # our signals, to wait for those in flight before the handler goes
        self.previous = None

    def run(self) -> None:
        next_beat = HEARTBEAT_AFTER
        while True:
            elapsed = time.monotonic() - self.start_time
            rss = resident_bytes()
            if self.tripped:
                # Sent again until the block ends: a stop that lands in code with a bare ``except:``
                # (the main thread runs whatever it runs when the signal arrives) is swallowed there.
                self._interrupt(self.tripped)
            elif self.seconds and elapsed >= self.seconds:
                self._interrupt(("time", elapsed))
            elif self.memory and rss is not None and rss > self.memory:
                self._interrupt(("memory", rss))
            if self.progress is not None and elapsed >= next_beat and not self.tripped:
                try:
                    self.progress.heartbeat(self.label, seconds=elapsed, rss=rss)
                except Exception:  # a broken progress sink must not take the budgets down with this thread
                    self.progress = None
                while next_beat <= elapsed:
                    next_beat += HEARTBEAT_EVERY
            wait = POLL if not self.seconds or self.tripped else max(min(POLL, self.seconds - elapsed), 0.001)
            if self.finished.wait(wait):
                return

    def _interrupt(self, why: tuple[str, float]) -> None:
        with self.lock:
            if not self.armed:
                return
            self.tripped = self.tripped or why
            self.sent += 1
            signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)

    def handler(self, signum, frame) -> None:
        if self.tripped:
            self.received += 1
            if self.blocking:  # once the block has ended the guard raises by itself: nothing to interrupt
                self.raised = True
                raise _Stop
        elif callable(self.previous):  # an alarm of someone else's (an outer timer): theirs to handle
            self.previous(signum, frame)

    def stop(self) -> None:
        with self.lock:
            self.armed = False
            self.blocking = False
        self.finished.set()
        if self.ident is not None:
            self.join()


@contextlib.contextmanager
def guard(what: str, *, seconds: float | None = None, memory: int | None = None, progress: Progress | None = None,
          label: str = "working", time_hint: str | None = None, memory_hint: str | None = None):
    """Stop the block with a :class:`BudgetError` after ``seconds`` or past ``memory`` resident bytes
    (None or 0: no limit), and report a heartbeat named ``label`` to ``progress`` while it runs.

    ``what`` names the work in the error; the hints say how to get under each budget.
    """
    can_interrupt = (hasattr(signal, "pthread_kill") and hasattr(signal, "SIGALRM")
                     and threading.current_thread() is threading.main_thread())
    seconds, memory = (seconds or None, memory or None) if can_interrupt else (None, None)
    if not (seconds or memory or progress is not None):
        yield
        return

    dog = _Watchdog(seconds=seconds, memory=memory, progress=progress, label=label, can_interrupt=can_interrupt)
    if can_interrupt:
        dog.previous = signal.signal(signal.SIGALRM, dog.handler)
    try:
        try:
            dog.start()  # the first look happens at once: the signal may arrive before start() returns
            yield
        finally:
            dog.stop()
            # Signals sent but not arrived yet: let them, while our handler is still installed.
            deadline = time.monotonic() + 1.0
            while dog.received < dog.sent and time.monotonic() < deadline:
                time.sleep(0.01)
        if dog.tripped:
            raise _Stop
    except _Stop:
        kind, reached = dog.tripped
        if kind == "time":
            raise BudgetError(f"{what} took longer than {seconds:g} s and was stopped", hint=time_hint) from None
        raise BudgetError(f"{what} reached {_size(reached)} of resident memory, past its budget of {_size(memory)}, "
                          "and was stopped", hint=memory_hint) from None
    finally:
        if can_interrupt:  # None: a handler not set from Python
            signal.signal(signal.SIGALRM, signal.SIG_DFL if dog.previous is None else dog.previous)


def _size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 2**20:.0f} MB"

"""The watchdog around tracing: its budgets, its heartbeat, and where it stands aside.

(Through the command line, a trace stopped by either budget is in ``test_bad_input.py``.)
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch
import torch_pruning as tp

from compressor import graph, watchdog
from compressor.errors import BudgetError
from compressor.progress import Progress

from _tiny import tiny_resnet20

needs_signals = pytest.mark.skipif(not (hasattr(signal, "pthread_kill") and hasattr(signal, "setitimer")),
                                   reason="the budgets need POSIX signals; without them the block is not stopped")


class Beats(Progress):
    def __init__(self) -> None:
        self.beats: list[tuple[str, float, int | None]] = []

    def heartbeat(self, what: str, *, seconds: float, rss: int | None) -> None:
        self.beats.append((what, seconds, rss))


@pytest.fixture
def slow_tracing(monkeypatch):
    """torch-pruning's tracing, made to take 1 s longer."""
    build = tp.DependencyGraph.build_dependency

    def slow(self, *args, **kwargs):
        time.sleep(1.0)
        return build(self, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", slow)


def test_a_slow_trace_reports_that_it_is_alive(slow_tracing, monkeypatch):
    monkeypatch.setattr(watchdog, "HEARTBEAT_AFTER", 0.2)
    monkeypatch.setattr(watchdog, "HEARTBEAT_EVERY", 0.2)
    beats = Beats()

    coupling = graph.trace(tiny_resnet20().eval(), torch.zeros(1, 1, 16, 16), timeout=60, progress=beats)

    assert coupling.groups
    assert len(beats.beats) >= 2
    assert {what for what, _, _ in beats.beats} == {"tracing"}
    seconds = [s for _, s, _ in beats.beats]
    assert seconds == sorted(seconds) and seconds[0] >= 0.2
    assert all(rss is None or rss > 0 for _, _, rss in beats.beats)


def test_a_short_trace_says_nothing():
    beats = Beats()
    graph.trace(tiny_resnet20().eval(), torch.zeros(1, 1, 16, 16), timeout=60, memory=watchdog.memory_budget(None), progress=beats)
    assert beats.beats == []


@needs_signals
@pytest.mark.skipif(watchdog.resident_bytes() is None, reason="no /proc/self/statm to read the resident memory from")
def test_memory_past_the_budget_stops_the_block_with_what_it_reached():
    before = signal.getsignal(signal.SIGALRM)
    start = time.perf_counter()
    with pytest.raises(BudgetError, match=r"^counting reached [\d.]+ [MG]B of resident memory, past its budget of 1 MB"):
        with watchdog.guard("counting", memory=1 << 20, memory_hint="use less"):
            time.sleep(30)
    assert time.perf_counter() - start < 10
    assert signal.getsignal(signal.SIGALRM) is before  # the handler before the block is back


@needs_signals
def test_the_time_budget_stops_a_busy_block():
    with pytest.raises(BudgetError, match="took longer than 0.3 s"):
        with watchdog.guard("counting", seconds=0.3):
            while True:
                sum(range(100))


@needs_signals
def test_an_outer_alarm_still_reaches_its_own_handler():
    rang = []
    previous = signal.signal(signal.SIGALRM, lambda *_: rang.append(True))
    try:
        with watchdog.guard("counting", seconds=30):
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            time.sleep(0.5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert rang == [True]


def test_off_the_main_thread_the_budgets_stand_aside_and_the_heartbeat_still_runs(monkeypatch):
    monkeypatch.setattr(watchdog, "HEARTBEAT_AFTER", 0.1)
    beats, failures = Beats(), []

    def work():
        try:
            with watchdog.guard("counting", seconds=0.1, memory=1, progress=beats):
                time.sleep(0.6)
        except BaseException as exc:  # noqa: BLE001 - the test reports whatever escaped
            failures.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert failures == []
    assert beats.beats


def test_the_default_memory_budget_leaves_room_to_grow():
    budget = watchdog.memory_budget(None)
    if budget is None:
        pytest.skip("the memory of this platform cannot be read")
    assert budget > watchdog.resident_bytes()
    assert watchdog.memory_budget(0) is None
    assert watchdog.memory_budget(1.5) == 3 * 2**29


@needs_signals
def test_a_stop_swallowed_by_a_bare_except_is_sent_again():
    start = time.perf_counter()
    with pytest.raises(BudgetError, match="took longer than 0.2 s"):
        with watchdog.guard("a careless block", seconds=0.2):
            try:
                time.sleep(5)
            except BaseException:  # noqa: BLE001  (what some libraries do)
                pass
            time.sleep(5)
    assert time.perf_counter() - start < 3

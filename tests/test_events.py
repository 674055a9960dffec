"""Typed events and cancellation: the JSON form, the Progress adapter, a cancel mid-run."""

from __future__ import annotations

import json
import threading
import time

import pytest

from compressor import compress
from compressor.errors import Cancelled
from compressor.events import (EventStream, Heartbeat, JsonLines, Note, StageFinished, StageStarted, TaskFinished,
                               TaskProgress, TaskStarted, WarningEvent)
from compressor.progress import Progress


class Recorder(Progress):
    """An old-style sink: only the Progress methods."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def stage(self, name):
        self.calls.append(("stage", name))

    def task(self, description, total):
        self.calls.append(("task", description, total))

    def advance(self, n=1, **metrics):
        self.calls.append(("advance", n, metrics))

    def done(self):
        self.calls.append(("done",))

    def heartbeat(self, what, *, seconds, rss):
        self.calls.append(("heartbeat", what, seconds, rss))

    def note(self, message):
        self.calls.append(("note", message))


def test_every_event_has_a_type_a_timestamp_and_its_fields_as_json():
    events = [StageStarted("load"), StageFinished("load", 1.5), TaskStarted("t", 3),
              TaskProgress("t", 1, 3, 1, {"loss": 0.5}, 2.0), TaskFinished("t", 3, 0.1), Note("n"),
              WarningEvent("w"), Heartbeat("tracing", 10.0, None)]
    for e in events:
        d = json.loads(json.dumps(e.to_dict(), allow_nan=False))
        assert d["type"] == e.type and abs(d["time"] - time.time()) < 60
    assert TaskProgress("t", 1, 3, 1, {"loss": 0.5}, 2.0).to_dict() == {
        "type": "task_progress", "time": pytest.approx(time.time(), abs=60), "description": "t", "done": 1,
        "total": 3, "advanced": 1, "metrics": {"loss": 0.5}, "eta_seconds": 2.0}
    assert TaskProgress("t", 1, 3, 1, {"loss": float("nan")}).to_dict()["metrics"] == {"loss": None}


def test_a_progress_subclass_receives_the_stream_as_its_old_calls():
    sink = Recorder()
    stream = EventStream(sink)
    stream.stage_started("prune")
    stream.task("search", 2)
    stream.advance(1, flops_ratio=0.5)
    stream.done()
    stream.heartbeat("tracing", seconds=5.0, rss=None)
    stream.note("hello")
    stream.stage_finished("prune")
    assert sink.calls == [("stage", "prune"), ("task", "search", 2), ("advance", 1, {"flops_ratio": 0.5}), ("done",),
                          ("heartbeat", "tracing", 5.0, None), ("note", "hello")]


def test_the_stream_counts_a_task_and_gives_an_eta(tmp_path):
    lines = []

    class Sink:
        def event(self, e):
            lines.append(e)

    stream = EventStream(Sink())
    stream.task("epoch", 4)
    stream.advance(1)
    stream.advance(3)
    stream.done()
    progress = [e for e in lines if isinstance(e, TaskProgress)]
    assert [p.done for p in progress] == [1, 4] and progress[0].eta_seconds is not None and progress[1].eta_seconds == 0
    assert isinstance(lines[-1], TaskFinished) and lines[-1].done == 4


def test_json_lines_writes_one_object_per_line(tmp_path):
    path = tmp_path / "events.jsonl"
    with path.open("w") as f:
        stream = EventStream(JsonLines(f))
        stream.stage_started("load")
        stream.stage_finished("load")
    assert [json.loads(line)["type"] for line in path.read_text().splitlines()] == ["stage_started", "stage_finished"]


def test_a_cancel_token_must_have_is_set():
    with pytest.raises(TypeError):
        EventStream(None, cancel=object())


class CancelAt(Progress):
    """Sets ``cancel`` at the first progress of a task whose description starts with ``prefix``."""

    def __init__(self, prefix: str, cancel: threading.Event) -> None:
        self.prefix, self.cancel, self.current, self.at = prefix, cancel, "", None

    def task(self, description, total):
        self.current = description

    def advance(self, n=1, **metrics):
        if self.current.startswith(self.prefix) and not self.cancel.is_set():
            self.cancel.set()
            self.at = time.perf_counter()


@pytest.mark.parametrize("prefix, overrides", [
    ("fine-tune", dict(schedule="gradual", epochs=3, batch_size=8)),
    ("search", dict(schedule="oneshot", epochs=1)),
])
def test_a_cancel_raises_cancelled_within_seconds_and_leaves_no_output(prefix, overrides, make_config):
    config = make_config(**overrides)
    cancel = threading.Event()
    sink = CancelAt(prefix, cancel)
    with pytest.raises(Cancelled):
        compress(config, progress=sink, cancel=cancel)
    assert sink.at is not None and time.perf_counter() - sink.at < 5
    assert not config.output_dir.exists()
    assert not [p for p in config.output_dir.parent.iterdir() if p.name.startswith(f".{config.output_dir.name}.")]


def test_a_cancel_during_validation_leaves_no_output(make_config):
    config = make_config(epochs=0)
    cancel = threading.Event()

    class AtValidate(Progress):
        def stage(self, name):
            if name == "validate":
                cancel.set()

    with pytest.raises(Cancelled):
        compress(config, progress=AtValidate(), cancel=cancel)
    assert not config.output_dir.exists()
    assert not [p for p in config.output_dir.parent.iterdir() if p.name.startswith(f".{config.output_dir.name}.")]

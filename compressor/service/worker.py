"""Running jobs: each in its own subprocess, so a crash or a hang past the timeout ends that process only.

A cancel (or ``--job-timeout``) sends the job's process SIGTERM, which it turns into the library's cancel
token: ``compress`` raises ``Cancelled`` at its next check and writes nothing. A process that has not
stopped ``STOP_GRACE`` seconds later is killed with its process group. ``python -m
compressor.service.worker JOB_DIR`` is the job's process itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .events import Follower
from .store import HEARTBEAT_S, Store

POLL = 0.2
STOP_GRACE = 10.0
"""Seconds a job asked to stop (cancel, --job-timeout) has to raise ``Cancelled`` at its next check
before its process group is killed."""
PROGRESS_EVERY = 0.5
"""Seconds between writes of a running job's stage and progress to the job DB."""
CANCELLED_EXIT = 3
"""Exit code of a job process that stopped at the cancel token."""


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _signal(proc: subprocess.Popen, sig: int, *, group: bool) -> None:
    try:
        (os.killpg if group else os.kill)(proc.pid, sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    """In the job's process: die when the worker thread that started it dies (Linux), so a killed worker
    leaves no orphan job running unseen."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_job(data_dir: Path, job_id: str, settings: dict[str, Any]) -> None:
    store = Store(data_dir)
    if not store.claim(job_id):
        return  # canceled, deleted, or already taken by another delivery
    job_dir = store.job_dir(job_id)
    out_dir = job_dir / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    for stale in ("error.json", "result.json"):  # of an interrupted attempt; its events stay, numbered on
        (job_dir / stale).unlink(missing_ok=True)
    env = dict(os.environ)
    if settings.get("threads") and "OMP_NUM_THREADS" not in env:
        # Jobs side by side on one host share its cores: threads beyond a job's share only spin (on a
        # busy 2-core machine that made the pruning search several times slower).
        env["OMP_NUM_THREADS"] = str(settings["threads"])
    log = open(job_dir / "worker.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "compressor.service.worker", str(job_dir)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    store.set_pid(job_id, proc.pid)
    follower = Follower(job_dir / "events.jsonl")
    deadline = time.monotonic() + float(settings.get("job_timeout") or 3600.0)
    stop: tuple[str, float] | None = None  # why the job was asked to stop, and when
    written, dirty = 0.0, False
    try:
        while proc.poll() is None:
            dirty = follower.poll() or dirty
            if dirty and time.monotonic() - written >= PROGRESS_EVERY:
                store.set_progress(job_id, follower.stage, follower.progress)
                written, dirty = time.monotonic(), False
            if stop is None:
                job = store.get_job(job_id)
                why = "cancel" if job is None or job.cancel else "timeout" if time.monotonic() > deadline else None
                if why:
                    # Only the job's own process: it turns SIGTERM into the cancel token and stops at the
                    # next check, writing nothing. Its group (data-parallel ranks) is killed once it is gone.
                    _signal(proc, signal.SIGTERM, group=False)
                    stop = (why, time.monotonic())
            elif time.monotonic() - stop[1] > STOP_GRACE:
                _signal(proc, signal.SIGKILL, group=True)
            time.sleep(POLL)
    finally:
        _signal(proc, signal.SIGKILL, group=True)  # whatever the job started and left behind
        log.write(f"[worker] job process ended with code {proc.wait()}\n".encode())
        log.close()
    follower.poll()
    store.set_progress(job_id, follower.stage, follower.progress)
    job = store.get_job(job_id)
    if job is None:
        shutil.rmtree(job_dir, ignore_errors=True)  # deleted while it ran
    elif stop is not None and stop[0] == "timeout":
        shutil.rmtree(out_dir, ignore_errors=True)
        store.finish(job_id, "failed", error=f"the job ran past --job-timeout ({settings.get('job_timeout')} s) "
                                              "and was stopped", hint="raise --job-timeout, or ask for less work")
    elif job.cancel:
        shutil.rmtree(out_dir, ignore_errors=True)
        store.finish(job_id, "canceled")
    elif proc.returncode == 0 and (job_dir / "result.json").exists():
        done = json.loads((job_dir / "result.json").read_text())
        store.finish(job_id, "succeeded", result=done["result"], summary=done["summary"])
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
        err = job_dir / "error.json"
        failure = (json.loads(err.read_text()) if err.exists()
                   else {"error": f"the job's process ended with code {proc.returncode} (see worker.log)"})
        store.finish(job_id, "failed", error=failure["error"], hint=failure.get("hint"))


def start_heartbeat(store: Store, slots: int) -> Callable[[], None]:
    """Keep this worker process's row in the job DB fresh (so /healthz counts it, from any host); returns
    the function that stops the beat and removes the row."""
    worker_id, started, stopped = uuid.uuid4().hex[:16], time.time(), threading.Event()
    host, pid = socket.gethostname(), os.getpid()

    def beat() -> None:
        while True:
            try:
                store.heartbeat(worker_id, host, pid, slots, started)
            except Exception:  # noqa: BLE001 - a locked or briefly missing DB must not end the beat
                pass
            if stopped.wait(HEARTBEAT_S):
                return

    store.heartbeat(worker_id, host, pid, slots, started)
    beating = threading.Thread(target=beat, name="heartbeat", daemon=True)
    beating.start()

    def stop() -> None:
        stopped.set()
        beating.join(timeout=30)  # a beat in flight must not write the row back after it is removed
        store.remove_worker(worker_id)

    return stop


def recover(store: Store, huey: Any, max_attempts: int) -> list[str]:
    """A job left ``running`` whose process is dead is re-queued, or failed once out of attempts.

    The pid is checked on this host: with workers on several hosts, run recovery where the job ran."""
    touched = []
    for job in store.list_jobs(status="running"):
        if _alive(job.pid):
            continue
        shutil.rmtree(store.job_dir(job.id) / "out", ignore_errors=True)
        if job.attempts < max_attempts:
            store.requeue(job.id)
            huey.run_job(job.id)
        else:
            store.finish(job.id, "failed", error=f"interrupted (the worker stopped {job.attempts} times while the job ran)")
        touched.append(job.id)
    return touched


def _main(job_dir: Path) -> int:
    """The job's own process: build the config, run compress, write result.json or error.json."""
    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancel.set())  # first, so a cancel during the imports counts too

    from compressor.config import CompressConfig
    from compressor.errors import Cancelled, CompressorError
    from compressor.pipeline import compress

    from .events import open_sink
    from .models import Summary

    spec = json.loads((job_dir / "job.json").read_text())
    sink, stream = open_sink(job_dir / "events.jsonl")
    try:
        config = CompressConfig(**build_kwargs(spec))
        result = compress(config, progress=sink, cancel=cancel)
    except Cancelled as exc:
        print(f"[job] stopped at the cancel token: {exc.message}", file=sys.stderr, flush=True)
        return CANCELLED_EXIT
    except CompressorError as exc:
        (job_dir / "error.json").write_text(json.dumps({"error": exc.message, "hint": exc.hint}))
        return 2
    except Exception as exc:  # noqa: BLE001 - the job's failure is reported, the worker goes on
        import traceback

        traceback.print_exc()
        (job_dir / "error.json").write_text(json.dumps({"error": f"internal error: {type(exc).__name__}: {exc}"}))
        return 1
    finally:
        stream.close()
    out = Path(result.out_dir)
    report = json.loads((out / "report.json").read_text())
    done = {"summary": dataclasses.asdict(Summary.from_report(report)),
            "result": {"accuracy_original": result.accuracy_original,
                       "accuracy_compressed": result.accuracy_compressed, "onnx_bytes": result.onnx_bytes,
                       "onnx_original_bytes": result.onnx_original_bytes,
                       "flops_ratio": getattr(result.prune, "achieved_ratio", None),
                       "artifacts": sorted(p.name for p in out.iterdir() if p.is_file())}}
    tmp = job_dir / "result.json.part"
    tmp.write_text(json.dumps(done, default=str))
    tmp.replace(job_dir / "result.json")
    return 0


def build_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    kw = dict(spec["options"])
    for key in ("mean", "std"):
        if kw.get(key) is not None:
            kw[key] = tuple(kw[key])
    kw.update(model_path=Path(spec["model_path"]), data_path=Path(spec["data_path"]), out_dir=Path(spec["out_dir"]),
              trust_pickle=False, overwrite=False)
    return kw


if __name__ == "__main__":
    code = _main(Path(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written and closed by now: skip the interpreter's teardown of torch and onnxruntime,
    # which took about 6 s on the busy build machine (a cancel is seen to end that much sooner).
    os._exit(code)

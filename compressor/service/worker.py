"""Running jobs: each in its own subprocess, so a crash, a hang past the timeout or a cancel kills that
process only. ``python -m compressor.service.worker JOB_DIR`` is the subprocess itself."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .store import Store

POLL = 0.2
KILL_GRACE = 3.0


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


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM to the job's process group, SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


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
    (job_dir / "error.json").unlink(missing_ok=True)
    log = open(job_dir / "worker.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "compressor.service.worker", str(job_dir)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    store.set_pid(job_id, proc.pid)
    deadline = time.monotonic() + float(settings.get("job_timeout") or 3600.0)
    try:
        while proc.poll() is None:
            job = store.get_job(job_id)
            if job is None or job.cancel:
                _kill(proc)
                shutil.rmtree(out_dir, ignore_errors=True)
                if job is not None:
                    store.finish(job_id, "canceled")
                return
            if time.monotonic() > deadline:
                _kill(proc)
                shutil.rmtree(out_dir, ignore_errors=True)
                store.finish(job_id, "failed", error=f"the job ran past --job-timeout "
                                                     f"({settings.get('job_timeout')} s) and was stopped")
                return
            time.sleep(POLL)
    finally:
        log.close()
    if store.get_job(job_id) is not None and store.get_job(job_id).cancel:
        shutil.rmtree(out_dir, ignore_errors=True)
        store.finish(job_id, "canceled")
    elif proc.returncode == 0 and (job_dir / "result.json").exists():
        store.finish(job_id, "succeeded", result=json.loads((job_dir / "result.json").read_text()))
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
        err = job_dir / "error.json"
        message = (json.loads(err.read_text())["error"] if err.exists()
                   else f"the job's process ended with code {proc.returncode} (see worker.log)")
        store.finish(job_id, "failed", error=message)


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
    from compressor.config import CompressConfig
    from compressor.errors import CompressorError
    from compressor.pipeline import compress

    from .events import JsonlProgress

    spec = json.loads((job_dir / "job.json").read_text())
    sink = JsonlProgress(job_dir / "events.jsonl")
    try:
        config = CompressConfig(**build_kwargs(spec))
        result = compress(config, progress=sink)
    except CompressorError as exc:
        sink.emit("error", message=exc.message, hint=exc.hint)
        (job_dir / "error.json").write_text(json.dumps({"error": exc.message, "hint": exc.hint}))
        return 2
    except Exception as exc:  # noqa: BLE001 - the job's failure is reported, the worker goes on
        sink.emit("error", message=f"{type(exc).__name__}: {exc}")
        (job_dir / "error.json").write_text(json.dumps({"error": f"internal error: {type(exc).__name__}: {exc}"}))
        return 1
    summary = {"accuracy_original": result.accuracy_original, "accuracy_compressed": result.accuracy_compressed,
               "onnx_bytes": result.onnx_bytes, "onnx_original_bytes": result.onnx_original_bytes,
               "flops_ratio": getattr(result.prune, "flops_ratio", None),
               "artifacts": sorted(p.name for p in Path(result.out_dir).iterdir() if p.is_file())}
    tmp = job_dir / "result.json.part"
    tmp.write_text(json.dumps(summary, default=str))
    tmp.replace(job_dir / "result.json")
    sink.emit("finished")
    sink.close()
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
    sys.exit(_main(Path(sys.argv[1])))

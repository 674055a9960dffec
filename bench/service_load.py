"""Load on the service: N short jobs (epochs 0) from C concurrent clients, with the embedded SQLite queue or
with Redis and separate worker processes. Checks that no job is lost or run twice, and measures
GET /v1/jobs/{id} (p50/p99) while the jobs run: the API must never wait on training.

    nice -n 10 .venv/bin/python bench/service_load.py --backend sqlite --jobs 200 --clients 8 --workers 2
    nice -n 10 .venv/bin/python bench/service_load.py --backend redis --jobs 200 --clients 8 --workers 2

Each job is the whole pipeline (load, trace, prune, fine-tune with 0 epochs, export, validate, report) on a
tiny ResNet-20 (4 classes, 16x16 grey, the tests' size) and 60 images, with 3 timed latency runs: the
smallest honest job. ``sqlite`` runs ``compressor serve --workers W`` (the embedded worker, W job slots);
``redis`` starts ``redis-server`` on a free loopback port, ``serve --workers 0 --broker ...`` and W
``compressor worker`` processes of one slot each. Before the jobs, the clients poll for ``--baseline-s``
a job canceled while queued (so nothing of ours runs): the API's latency on the machine as it is. While the
short jobs run, one more client keeps a training job going (``--training-epochs`` of fine-tuning on the same
data, submitted back to back and canceled when the short jobs are done), so that the GETs are also measured
while a job trains. Writes one JSON object to ``--out`` (and stdout).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"arch": "resnet20", "target_flops": 0.5, "epochs": 0, "latency_runs": 3, "device": "cpu"}
TERMINAL = ("succeeded", "failed", "canceled")
CLI = [sys.executable, "-c", "from compressor.cli.toolbox import main; main()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_inputs(root: Path) -> tuple[Path, Path]:
    """The tests' tiny model and data (tests/_tiny.py), made here so the bench does not import the tests."""
    import torch

    from compressor.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=4, in_channels=1, image_size=16).eval()
    torch.save(model.state_dict(), root / "tiny.pt")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 15)
    images = np.clip(40 + 50 * labels[:, None, None, None] + rng.integers(-20, 21, (60, 1, 16, 16)), 0, 255)
    np.savez(root / "tiny.npz", images=images.astype(np.uint8), labels=labels.astype(np.int64))
    return root / "tiny.pt", root / "tiny.npz"


def start_redis(root: Path) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = _free_port()
    proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(root)], stdout=subprocess.DEVNULL, start_new_session=True)
    import redis

    deadline = time.time() + 30
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def wait_up(url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError("the server did not come up")
        time.sleep(0.2)


def all_jobs(url: str) -> list[dict]:
    """Every job, walking the cursor pages of GET /v1/jobs."""
    jobs, params = [], {"limit": 100}
    with httpx.Client(base_url=url, timeout=60) as c:
        while True:
            r = c.get("/v1/jobs", params=params)
            r.raise_for_status()
            jobs += r.json()
            if "X-Next-Cursor" not in r.headers:
                return jobs
            params["cursor"] = r.headers["X-Next-Cursor"]


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("sqlite", "redis"), default="sqlite")
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="job slots (sqlite) or worker processes (redis)")
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between a client's GETs of its job")
    ap.add_argument("--baseline-s", type=float, default=30.0,
                    help="seconds the clients poll before any job runs: the API's latency on the machine as it is")
    ap.add_argument("--training-epochs", type=int, default=150,
                    help="epochs of the training jobs kept running beside the short ones (0: none)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops what it started
    tmp = Path(tempfile.mkdtemp(prefix="service-load-"))
    data_dir = tmp / "svc"
    model, data = make_inputs(tmp)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    started_at = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    try:
        broker: list[str] = []
        if args.backend == "redis":
            redis_proc, broker_url = start_redis(tmp)
            procs.append(redis_proc)
            broker = ["--broker", broker_url]
        embedded = args.workers if args.backend == "sqlite" else 0
        procs.append(subprocess.Popen(CLI + ["serve", "--port", str(port), "--data-dir", str(data_dir),
                                             "--workers", str(embedded), *broker], start_new_session=True))
        wait_up(url)
        if args.backend == "redis":
            procs += [subprocess.Popen(CLI + ["worker", "--data-dir", str(data_dir), "--workers", "1", *broker],
                                       start_new_session=True) for _ in range(args.workers)]
        deadline = time.time() + 120
        while httpx.get(url + "/healthz", timeout=10).json()["workers_alive"] < (1 if embedded else args.workers):
            if time.time() > deadline:
                raise RuntimeError("the workers did not come up")
            time.sleep(0.5)
        ids = {}
        for path in (model, data):
            with open(path, "rb") as fh:
                ids[path.suffix] = httpx.post(url + "/v1/files", files={"file": (path.name, fh)}, timeout=60).json()["id"]
        counter, lock = itertools.count(), threading.Lock()
        gets: list[tuple[float, float, str]] = []  # (when, ms, status seen)
        baseline: list[float] = []
        if args.baseline_s > 0:
            # A job canceled while queued never runs: polling it measures the API with no job of ours running.
            with httpx.Client(base_url=url, timeout=60) as c:
                idle = c.post("/v1/jobs", json={"model": ids[".pt"], "data": ids[".npz"], "options": OPTIONS}).json()
                c.post(f"/v1/jobs/{idle['id']}/cancel")
            until = time.time() + args.baseline_s

            def idle_client(_: int) -> None:
                with httpx.Client(base_url=url, timeout=60) as c:
                    while time.time() < until:
                        s = time.perf_counter()
                        c.get(f"/v1/jobs/{idle['id']}").raise_for_status()
                        ms = (time.perf_counter() - s) * 1000
                        with lock:
                            baseline.append(ms)
                        time.sleep(args.poll)

            with cf.ThreadPoolExecutor(args.clients) as ex:
                list(ex.map(idle_client, range(args.clients)))
            httpx.delete(f"{url}/v1/jobs/{idle['id']}", timeout=60)
        t0 = time.time()

        def client(_: int) -> list[tuple[str, str]]:
            """Submit jobs one after another (taking numbers from the shared counter), following each to its end."""
            done = []
            with httpx.Client(base_url=url, timeout=60) as c:
                while True:
                    with lock:
                        n = next(counter)
                    if n >= args.jobs:
                        return done
                    r = c.post("/v1/jobs", json={"model": ids[".pt"], "data": ids[".npz"], "options": OPTIONS})
                    r.raise_for_status()
                    job_id = r.json()["id"]
                    while True:
                        s = time.perf_counter()
                        st = c.get(f"/v1/jobs/{job_id}").json()["status"]
                        ms = (time.perf_counter() - s) * 1000
                        with lock:
                            gets.append((time.time(), ms, st))
                        if st in TERMINAL:
                            done.append((job_id, st))
                            break
                        time.sleep(args.poll)

        short_done = threading.Event()
        trained: list[str] = []

        def trainer() -> None:
            """One training job at a time, back to back, until the short jobs are done (then the last is canceled)."""
            with httpx.Client(base_url=url, timeout=60) as c:
                while not short_done.is_set():
                    options = dict(OPTIONS, epochs=args.training_epochs)
                    r = c.post("/v1/jobs", json={"model": ids[".pt"], "data": ids[".npz"], "options": options})
                    r.raise_for_status()
                    trained.append(r.json()["id"])
                    canceled = False
                    while c.get(f"/v1/jobs/{trained[-1]}").json()["status"] not in TERMINAL:
                        if short_done.wait(1.0) and not canceled:
                            canceled = c.post(f"/v1/jobs/{trained[-1]}/cancel").status_code == 200
                        elif canceled:
                            time.sleep(0.5)

        training = threading.Thread(target=trainer) if args.training_epochs > 0 else None
        if training:
            training.start()
        with cf.ThreadPoolExecutor(args.clients) as ex:
            results = [x for part in ex.map(client, range(args.clients)) for x in part]
        wall = time.time() - t0
        short_done.set()
        if training:
            training.join()
        submitted = [job_id for job_id, _ in results]
        listed = all_jobs(url)
        training_jobs = [j for j in listed if j["id"] in set(trained)]
        listed = [j for j in listed if j["id"] not in set(trained)]
        spans = [(j["started"], j["finished"] or time.time()) for j in training_jobs if j["started"]]
        while_training = [ms for when, ms, _ in gets if any(a <= when <= b for a, b in spans)]
        by_id = {j["id"]: j for j in listed}
        runs = {}  # how many times each job's process ran, from the job's own files
        for job_id in submitted:
            log = data_dir / "jobs" / job_id / "worker.log"
            events = (data_dir / "jobs" / job_id / "events.jsonl").read_text().splitlines()
            runs[job_id] = (log.read_text().count("[worker] job process ended"),
                            sum('"stage_started"' in e and '"name": "load"' in e for e in events))
        ran = [j for j in listed if j["started"]]
        first_start = min(j["started"] for j in ran)
        last_end = max(j["finished"] for j in ran)
        while_running = [ms for when, ms, _ in gets if first_start <= when <= last_end]
        seen_running = [ms for _, ms, st in gets if st == "running"]
        job_s = [j["finished"] - j["started"] for j in ran]
        queue_s = [j["started"] - j["created"] for j in ran]
        out = {
            "backend": args.backend, "jobs": args.jobs, "clients": args.clients, "workers": args.workers,
            "options": OPTIONS, "model": "resnet20, 4 classes, 1x16x16 (0.27M params)", "images": 60,
            "succeeded": sum(st == "succeeded" for _, st in results),
            "failed": [(j, by_id.get(j, {}).get("error")) for j, st in results if st != "succeeded"],
            "unique_ids": len(set(submitted)), "listed": len(listed),
            "listed_not_submitted": len(set(by_id) - set(submitted)),
            "lost": len(set(submitted) - set(by_id)),
            "attempts_over_1": sum(j["attempts"] > 1 for j in listed),
            "processes_per_job": sorted({r[0] for r in runs.values()}),
            "load_stages_per_job": sorted({r[1] for r in runs.values()}),
            "wall_s": round(wall, 1), "jobs_per_min": round(args.jobs / wall * 60, 2),
            "job_run_s_p50": percentile(job_s, 50), "job_run_s_max": round(max(job_s), 1),
            "queue_wait_s_p50": percentile(queue_s, 50), "queue_wait_s_max": round(max(queue_s), 1),
            "baseline_gets": len(baseline), "baseline_get_ms_p50": percentile(baseline, 50),
            "baseline_get_ms_p99": percentile(baseline, 99),
            "gets": len(gets), "get_ms_p50": percentile([ms for _, ms, _ in gets], 50),
            "get_ms_p99": percentile([ms for _, ms, _ in gets], 99),
            "get_ms_max": round(max(ms for _, ms, _ in gets), 1),
            "gets_while_jobs_ran": len(while_running), "get_ms_p99_while_jobs_ran": percentile(while_running, 99),
            "training_jobs": len(training_jobs), "training_epochs": args.training_epochs,
            "training_jobs_succeeded": sum(j["status"] == "succeeded" for j in training_jobs),
            "training_jobs_lost": len(set(trained) - {j["id"] for j in training_jobs}),
            "share_of_wall_with_a_job_training": round(sum(b - a for a, b in spans) / wall, 3) if spans else 0.0,
            "gets_while_a_job_trained": len(while_training),
            "get_ms_p50_while_a_job_trained": percentile(while_training, 50),
            "get_ms_p99_while_a_job_trained": percentile(while_training, 99),
            "gets_answering_running": len(seen_running), "get_ms_p50_answering_running": percentile(seen_running, 50),
            "get_ms_p99_answering_running": percentile(seen_running, 99),
            "machine": f"{os.cpu_count()} cores, CPU execution provider, shared with other sessions",
            "load_average_before": [round(x, 1) for x in load_before],
            "load_average_after": [round(x, 1) for x in os.getloadavg()],
            "date": started_at.strftime("%Y-%m-%d %H:%M UTC"),
            "command": (f"nice -n {os.nice(0)} " if os.nice(0) else "") + ".venv/bin/python bench/service_load.py "
                       + " ".join(sys.argv[1:]),
        }
        text = json.dumps(out, indent=1)
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
    finally:
        for p in reversed(procs):  # workers, then the server, then Redis: none loses its broker mid-stop
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(30)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Load on the service: N short jobs (epochs 0) from C concurrent clients; none lost or duplicated;
p50/p99 of GET /v1/jobs/{id} while jobs train.

    .venv/bin/python bench/service_load.py --jobs 200 --clients 8 [--broker redis://127.0.0.1:6379/0 --workers 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
OPTS = {"arch": "resnet20", "target_flops": 0.5, "epochs": 0, "mean": [0.2860], "std": [0.3530],
        "latency_runs": 5, "device": "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1, help="worker processes (one job each at a time)")
    ap.add_argument("--broker", default=None)
    ap.add_argument("--images", type=int, default=300)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server and workers
    tmp = Path(tempfile.mkdtemp(prefix="service-load-"))
    z = np.load(DEMO / "fmnist_sample.npz")
    data = tmp / "small.npz"
    np.savez(data, images=z["images"][:args.images], labels=z["labels"][:args.images])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cli = [sys.executable, "-c", "from compressor.cli.toolbox import main; main()"]
    broker = ["--broker", args.broker] if args.broker else []
    procs = [subprocess.Popen(cli + ["serve", "--port", str(port), "--data-dir", str(tmp / "svc"), "--workers", "0",
                                     *broker], start_new_session=True)]
    while True:
        try:
            httpx.get(url + "/healthz", timeout=2)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    procs += [subprocess.Popen(cli + ["worker", "--data-dir", str(tmp / "svc"), *broker], start_new_session=True)
              for _ in range(args.workers)]
    try:
        with open(DEMO / "resnet20_fmnist.pt", "rb") as fh:
            m = httpx.post(url + "/v1/files", files={"file": ("m.pt", fh)}, timeout=60).json()["id"]
        with open(data, "rb") as fh:
            d = httpx.post(url + "/v1/files", files={"file": ("d.npz", fh)}, timeout=60).json()["id"]
        t0 = time.time()

        def one(_: int) -> tuple[str, str, list[float]]:
            with httpx.Client(base_url=url, timeout=60) as c:
                job = c.post("/v1/jobs", json={"model": m, "data": d, "options": OPTS}).json()
                lat = []
                while True:
                    s = time.perf_counter()
                    st = c.get(f"/v1/jobs/{job['id']}").json()
                    lat.append(time.perf_counter() - s)
                    if st["status"] in ("succeeded", "failed", "canceled"):
                        return job["id"], st["status"], lat
                    time.sleep(0.5)

        with cf.ThreadPoolExecutor(args.clients) as ex:
            res = list(ex.map(one, range(args.jobs)))
        wall = time.time() - t0
        ids = [r[0] for r in res]
        lat = np.array([x for r in res for x in r[2]]) * 1000
        listed = httpx.get(url + "/v1/jobs", timeout=60).json()
        attempts = [j["attempts"] for j in listed]
        out = {"jobs": args.jobs, "clients": args.clients, "workers": args.workers, "broker": args.broker or "sqlite",
               "succeeded": sum(r[1] == "succeeded" for r in res), "unique_ids": len(set(ids)),
               "listed": len(listed), "ran_twice": sum(a > 1 for a in attempts), "wall_s": round(wall, 1),
               "jobs_per_min": round(args.jobs / wall * 60, 2), "get_ms_p50": round(float(np.percentile(lat, 50)), 1),
               "get_ms_p99": round(float(np.percentile(lat, 99)), 1), "gets": int(lat.size)}
        print(json.dumps(out))
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait()


if __name__ == "__main__":
    main()

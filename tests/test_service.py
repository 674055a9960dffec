"""The compression service end to end: uvicorn in a subprocess on a free loopback port, a real worker."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
OPTS = {"arch": "resnet20", "target_flops": 0.5, "epochs": 0, "mean": [0.2860], "std": [0.3530],
        "latency_runs": 5, "device": "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from compressor.cli.toolbox import main; main()", *args],
                            start_new_session=True, **kw)


class Server:
    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = _cli("serve", "--port", str(self.port), "--data-dir", str(data_dir), *extra)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not come up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    z = np.load(DEMO / "fmnist_sample.npz")
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, images=z["images"][:300], labels=z["labels"][:300])
    return path


@pytest.fixture()
def server(tmp_path):
    s = Server(tmp_path / "svc")
    yield s
    s.stop()


def _upload(url: str, path: Path, headers=None, name: str | None = None) -> httpx.Response:
    with open(path, "rb") as fh:
        return httpx.post(url + "/v1/files", files={"file": (name or path.name, fh)}, headers=headers or {}, timeout=60)


def _submit(url: str, model: str, data: str, options=None, headers=None) -> httpx.Response:
    return httpx.post(url + "/v1/jobs", json={"model": model, "data": data, "options": options or OPTS},
                      headers=headers or {}, timeout=30)


def _wait(url: str, job_id: str, until=("succeeded", "failed", "canceled"), timeout=180, headers=None) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers or {}, timeout=10).json()
        if job["status"] in until:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def _files(url: str, data: Path, headers=None) -> tuple[str, str]:
    m = _upload(url, DEMO / "resnet20_fmnist.pt", headers)
    assert m.status_code == 201, m.text
    d = _upload(url, data, headers)
    assert d.status_code == 201, d.text
    return m.json()["id"], d.json()["id"]


def test_demo_job_end_to_end(server, small_data):
    url = server.url
    assert httpx.get(url + "/healthz").json()["ok"] is True
    m, d = _files(url, small_data)
    r = _submit(url, m, d)
    assert r.status_code == 201, r.text
    job = _wait(url, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["accuracy_compressed"] > 0.3
    events = httpx.get(f"{url}/v1/jobs/{job['id']}/events", params={"after": 0}).json()
    kinds = [e["kind"] for e in events]
    assert "stage" in kinds and kinds[-1] == "finished"
    later = httpx.get(f"{url}/v1/jobs/{job['id']}/events", params={"after": events[-3]["n"]}).json()
    assert [e["n"] for e in later] == [e["n"] for e in events[-2:]]
    with httpx.stream("GET", f"{url}/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}) as s:
        text = "".join(s.iter_text())
    assert text.count("data: ") == len(events) + 1 and "event: end" in text
    arts = {a["name"] for a in httpx.get(f"{url}/v1/jobs/{job['id']}/artifacts").json()}
    onnx = next(n for n in arts if n.endswith(".onnx"))
    body = httpx.get(f"{url}/v1/jobs/{job['id']}/artifacts/{onnx}").content
    import onnx as onnx_lib

    onnx_lib.checker.check_model(onnx_lib.load_from_string(body))
    assert httpx.get(f"{url}/v1/jobs/{job['id']}/artifacts/..%2Fjob.json").status_code == 404
    assert httpx.delete(f"{url}/v1/jobs/{job['id']}").status_code == 204
    assert httpx.get(f"{url}/v1/jobs/{job['id']}").status_code == 404


def test_bad_options_are_all_named_and_nothing_queued(server, small_data):
    m, d = _files(server.url, small_data)
    r = _submit(server.url, m, d, {"arch": "nope", "target_flops": 2, "epochs": -1, "bogus": 1, "out_dir": "/"})
    assert r.status_code == 422
    fields = r.json()["fields"]
    assert set(fields) == {"arch", "target_flops", "epochs", "bogus", "out_dir"}
    assert "--target-flops must lie strictly between 0 and 1, got 2" in fields["target_flops"]
    assert httpx.get(server.url + "/v1/jobs").json() == []

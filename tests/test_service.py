"""The compression service end to end: uvicorn in a subprocess on a free loopback port, a real worker."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from _service import DEMO, Server, cli as _cli, free_port as _free_port, make_token as _token, small_demo_data

OPTS = {"arch": "resnet20", "target_flops": 0.5, "epochs": 0, "mean": [0.2860], "std": [0.3530],
        "latency_runs": 5, "device": "cpu"}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return small_demo_data(tmp_path_factory.mktemp("data") / "small.npz")


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


def test_tokens_and_tenant_matrix(tmp_path, small_data):
    data_dir = tmp_path / "svc"
    alice, bob = _token(data_dir, "alice"), _token(data_dir, "bob")
    assert alice != bob and alice not in (data_dir / "service.db").read_bytes().decode("latin-1")
    s = Server(data_dir, "--workers", "0")
    try:
        a, b = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
        assert httpx.get(s.url + "/v1/jobs").status_code == 401
        assert httpx.get(s.url + "/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert _upload(s.url, small_data).status_code == 401
        m, d = _files(s.url, small_data, a)
        job = _submit(s.url, m, d, headers=a).json()
        assert _submit(s.url, m, d, headers=b).status_code == 404  # bob cannot use alice's files
        for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/artifacts"), ("POST", "/cancel"),
                             ("DELETE", "")):
            assert httpx.request(method, f"{s.url}/v1/jobs/{job['id']}{path}", headers=b).status_code == 404
            assert httpx.request(method, f"{s.url}/v1/jobs/{job['id']}{path}").status_code == 401
        assert httpx.get(s.url + "/v1/jobs", headers=b).json() == []
        assert [j["id"] for j in httpx.get(s.url + "/v1/jobs", headers=a).json()] == [job["id"]]
        # a queued job never starts once canceled (no worker runs here, so it is surely still queued)
        r = httpx.post(f"{s.url}/v1/jobs/{job['id']}/cancel", headers=a)
        assert r.json()["status"] == "canceled"
    finally:
        s.stop()
    w = _cli("worker", "--data-dir", str(data_dir))
    try:
        time.sleep(8)
        assert not (data_dir / "jobs" / job["id"] / "events.jsonl").exists()
    finally:
        os.killpg(w.pid, signal.SIGKILL)
        w.wait()


def test_serve_refuses_public_host_without_tokens(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from compressor.cli.toolbox import main; main()", "serve", "--host",
                        "0.0.0.0", "--data-dir", str(tmp_path / "svc")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "refusing to listen on 0.0.0.0 without tokens" in r.stderr


def test_cancel_running_job_kills_it(server, small_data):
    m, d = _files(server.url, small_data)
    job = _submit(server.url, m, d, dict(OPTS, epochs=50)).json()
    _wait(server.url, job["id"], until=("running",), timeout=60)
    time.sleep(2)
    t0 = time.time()
    r = httpx.post(f"{server.url}/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    done = _wait(server.url, job["id"], timeout=15)
    assert done["status"] == "canceled" and time.time() - t0 < 10
    assert not (server.data_dir / "jobs" / job["id"] / "out").exists()
    assert httpx.get(f"{server.url}/v1/jobs/{job['id']}/artifacts").json() == []


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


def test_bad_uploads(tmp_path):
    s = Server(tmp_path / "svc", "--workers", "0", "--max-upload-mb", "1", "--max-unpacked-mb", "64")
    try:
        def up(name: str, body: bytes) -> httpx.Response:
            return httpx.post(s.url + "/v1/files", files={"file": (name, body)}, timeout=60)

        r = up("data.zip", _zip([("../evil.txt", b"x")]))
        assert r.status_code == 422 and "outside the folder" in r.json()["error"]
        r = up("data.zip", _zip([("/etc/evil", b"x")]))
        assert r.status_code == 422
        link = zipfile.ZipInfo("a/link")
        link.external_attr = (0o120777 << 16)
        r = up("data.zip", _zip([(link, b"/etc/passwd")]))
        assert r.status_code == 422 and "link" in r.json()["error"]
        ok = up("data.zip", _zip([("a/x.bin", b"\0" * 2**20)]))  # a 1 MiB zero file deflates to KBs: fine
        assert ok.status_code == 201, ok.text
        bomb = _zip([(f"c/{i}.bin", b"\0" * (600 * 2**20 // 16)) for i in range(16)])  # ~600 MiB unpacked
        assert len(bomb) < 2**20
        r = up("data.zip", bomb)
        assert r.status_code == 422 and "unpacks to more than" in r.json()["error"]

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path}/pwned",))

        import pickle
        r = up("model.pt", pickle.dumps({"w": Evil()}))
        assert r.status_code == 422 and "weights only" in r.json()["error"]
        assert not (tmp_path / "pwned").exists()
        r = up("model.pt", os.urandom(2 * 2**20))
        assert r.status_code == 413 and "larger than the limit" in r.json()["error"]
        r = up("model.exe", b"MZ")
        assert r.status_code == 422 and "cannot take a .exe file" in r.json()["error"]
        assert [f["id"] for f in httpx.get(s.url + "/v1/files").json()] == [ok.json()["id"]]
        assert [p.name for p in (tmp_path / "svc" / "files").iterdir()] == [ok.json()["id"]]
    finally:
        s.stop()


@pytest.mark.slow
def test_worker_killed_mid_job_then_restarted(tmp_path, small_data):
    data_dir = tmp_path / "svc"
    s = Server(data_dir, "--workers", "0")
    w = _cli("worker", "--data-dir", str(data_dir))
    try:
        m, d = _files(s.url, small_data)
        job = _submit(s.url, m, d, dict(OPTS, epochs=2)).json()
        _wait(s.url, job["id"], until=("running",), timeout=60)
        time.sleep(3)
        os.kill(w.pid, signal.SIGKILL)
        w.wait()
        time.sleep(1)
        assert httpx.get(f"{s.url}/v1/jobs/{job['id']}").json()["status"] == "running"  # nobody knows yet
        w = _cli("worker", "--data-dir", str(data_dir))
        done = _wait(s.url, job["id"], timeout=240)
        assert done["status"] == "succeeded" or (done["status"] == "failed" and "interrupted" in done["error"]), done
        assert done["attempts"] == 2
    finally:
        os.killpg(w.pid, signal.SIGKILL)
        w.wait()
        s.stop()


def test_submit_client_downloads_artifacts(server, small_data, tmp_path):
    out = tmp_path / "got"
    r = subprocess.run([sys.executable, "-c", "from compressor.cli.toolbox import main; main()", "submit",
                        str(DEMO / "resnet20_fmnist.pt"), "--data", str(small_data), "--url", server.url,
                        "--out", str(out), "-o", "arch=resnet20", "-o", "target_flops=0.5", "-o", "epochs=0",
                        "-o", "mean=[0.286]", "-o", "std=[0.353]", "-o", "latency_runs=5", "-o", "device=cpu"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert any(p.suffix == ".onnx" for p in out.iterdir()) and (out / "report.json").exists()
    assert not list(out.glob("*.part"))
    bad = subprocess.run([sys.executable, "-c", "from compressor.cli.toolbox import main; main()", "submit",
                          str(DEMO / "resnet20_fmnist.pt"), "--data", str(small_data), "--url", server.url,
                          "-o", "arch=resnet20", "-o", "target_flops=7"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "target_flops: --target-flops must lie strictly between 0 and 1" in bad.stderr


def _redis(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    import shutil

    exe = shutil.which("redis-server")
    assert exe, "redis-server is missing: .ci/run installs it (apt-get install -y redis-server)"
    port = _free_port()
    proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, start_new_session=True)
    import redis

    deadline = time.time() + 20
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc, port
        except redis.ConnectionError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def test_redis_broker_with_separate_worker(tmp_path, small_data):
    rproc, port = _redis(tmp_path)
    broker = f"redis://127.0.0.1:{port}/0"
    data_dir = tmp_path / "shared"
    s = Server(data_dir, "--workers", "0", "--broker", broker)
    w = _cli("worker", "--broker", broker, "--data-dir", str(data_dir))
    try:
        m, d = _files(s.url, small_data)
        job = _submit(s.url, m, d).json()
        done = _wait(s.url, job["id"])
        assert done["status"] == "succeeded", done
        assert not (data_dir / "queue.db").exists()  # the queue lived in Redis, not in SQLite
    finally:
        os.killpg(w.pid, signal.SIGKILL)
        w.wait()
        s.stop()
        rproc.kill()
        rproc.wait()


def test_short_of_space_is_507(tmp_path):
    from fastapi.testclient import TestClient

    from compressor.service.app import ServiceConfig, create_app

    client = TestClient(create_app(ServiceConfig(data_dir=tmp_path / "svc", min_free_bytes=2**62)))
    r = client.post("/v1/files", files={"file": ("m.pt", b"x")})
    assert r.status_code == 507 and "MiB free, below" in r.json()["error"]
    assert list((tmp_path / "svc" / "files").iterdir()) == []


def test_job_past_timeout_is_stopped(tmp_path, small_data):
    s = Server(tmp_path / "svc", "--job-timeout", "4")
    try:
        m, d = _files(s.url, small_data)
        job = _submit(s.url, m, d, dict(OPTS, epochs=50)).json()
        done = _wait(s.url, job["id"], timeout=60)
        assert done["status"] == "failed" and "ran past --job-timeout (4.0 s)" in done["error"], done
        assert not (s.data_dir / "jobs" / job["id"] / "out").exists()
    finally:
        s.stop()

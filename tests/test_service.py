"""The compression service end to end: uvicorn in a subprocess on a free loopback port, a real worker."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
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


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny ResNet-20 (4 classes, 16x16 grey) and 60 images: a job runs in seconds, not minutes."""
    import torch

    from _tiny import make_images, save_npz, tiny_resnet20

    root = tmp_path_factory.mktemp("tiny")
    torch.save(tiny_resnet20().state_dict(), root / "tiny.pt")
    return root / "tiny.pt", save_npz(root / "tiny.npz", *make_images())


TINY_OPTS = {"arch": "resnet20", "target_flops": 0.5, "epochs": 0, "latency_runs": 3, "device": "cpu"}


def _upload_pair(url: str, model: Path, data: Path, headers=None) -> tuple[str, str]:
    ids = []
    for path in (model, data):
        r = _upload(url, path, headers)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids[0], ids[1]


def _wait_for(url: str, job_id: str, ok, timeout: float, headers=None) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers or {}, timeout=10).json()
        if ok(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job}")


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
    summary = job["summary"]  # the headline of report.json
    report = json.loads(httpx.get(f"{url}/v1/jobs/{job['id']}/artifacts/report.json").content)
    assert summary == {"flops_ratio": report["flops"]["achieved_ratio"],
                       "accuracy_original": report["accuracy"]["original"],
                       "accuracy_compressed": report["accuracy"]["compressed"],
                       "speedup_batch1": report["latency_ms"]["batch1"]["speedup"],
                       "speedup_batch64": report["latency_ms"]["batch64"]["speedup"]}
    assert 0.49 <= summary["flops_ratio"] <= 0.5 and summary["speedup_batch64"] > 0
    assert job["stage"] == "validate"
    events = httpx.get(f"{url}/v1/jobs/{job['id']}/events", params={"after": 0}).json()
    _assert_typed_events(events)
    assert [e["name"] for e in events if e["type"] == "stage_started"] == STAGES
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


STAGES = ["load", "trace", "prune", "fine-tune", "export", "validate"]


def _assert_typed_events(events: list[dict]) -> None:
    """Each event is one of the library's typed events in its ``to_dict`` form (what ``--json-events``
    writes), numbered from 1 by the API."""
    import dataclasses

    from compressor import events as ev_mod

    kinds = {c.type: c for c in vars(ev_mod).values()
             if isinstance(c, type) and issubclass(c, ev_mod.Event) and c is not ev_mod.Event}
    assert [e["n"] for e in events] == list(range(1, len(events) + 1))
    for e in events:
        body = {k: v for k, v in e.items() if k != "n"}
        cls = kinds[body["type"]]
        assert set(body) == {"type"} | {f.name for f in dataclasses.fields(cls)}, body
        assert cls(**{k: v for k, v in body.items() if k != "type"}).to_dict() == body


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


def test_cancel_running_job_stops_at_the_token(server, tiny_files):
    """Progress shows while the job trains; a cancel stops it cooperatively within seconds, nothing kept."""
    m, d = _upload_pair(server.url, *tiny_files)
    job = _submit(server.url, m, d, dict(TINY_OPTS, epochs=500)).json()
    running = _wait_for(server.url, job["id"], lambda j: j["stage"] == "fine-tune" and (j["progress"] or {})
                        .get("done", 0) > 0 or j["status"] in ("succeeded", "failed", "canceled"), timeout=120)
    assert running["status"] == "running", running
    progress = running["progress"]
    # with 2 steps an epoch, a poll may land just as an epoch's task finished (done == total, ETA 0)
    assert progress["task"].startswith("fine-tune") and progress["total"] >= progress["done"] > 0, progress
    assert progress["eta_s"] is not None and progress["eta_s"] >= 0
    t0 = time.time()
    r = httpx.post(f"{server.url}/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    done = _wait(server.url, job["id"], timeout=30)
    assert done["status"] == "canceled" and time.time() - t0 < 8, (done, time.time() - t0)
    log = (server.data_dir / "jobs" / job["id"] / "worker.log").read_text()
    # it stopped at the cancel token (exit code 3), not by the SIGKILL fallback (-9)
    assert "stopped at the cancel token" in log and "ended with code 3" in log, log[-2000:]
    assert not (server.data_dir / "jobs" / job["id"] / "out").exists()
    assert not (server.data_dir / "jobs" / job["id"] / "result.json").exists()
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


def _app(data_dir: Path, **kw):
    from fastapi.testclient import TestClient

    from compressor.service.app import ServiceConfig, create_app

    return TestClient(create_app(ServiceConfig(data_dir=data_dir, **kw)))


def _queue_jobs(client, tiny_files, n: int, options=None) -> list[str]:
    ids = []
    for path in tiny_files:
        with open(path, "rb") as fh:
            ids.append(client.post("/v1/files", files={"file": (path.name, fh)}).json()["id"])
    jobs = []
    for _ in range(n):
        r = client.post("/v1/jobs", json={"model": ids[0], "data": ids[1], "options": options or TINY_OPTS})
        assert r.status_code == 201, r.text
        jobs.append(r.json()["id"])
    return jobs


def test_jobs_are_listed_newest_first_in_cursor_pages(tmp_path, tiny_files):
    client = _app(tmp_path / "svc")  # no worker: the jobs stay queued
    ids = _queue_jobs(client, tiny_files, 5)
    seen, url, pages = [], "/v1/jobs?limit=2", 0
    while url:
        r = client.get(url)
        assert r.status_code == 200
        seen += [j["id"] for j in r.json()]
        pages += 1
        link = r.headers.get("link")
        assert (link is None) == ("x-next-cursor" not in r.headers)
        url = link[1:link.index(">")] if link else None
        if pages == 1:
            ids.append(_queue_jobs(client, tiny_files, 1)[0])  # a job added meanwhile shifts no page
    assert pages == 3 and seen == ids[:5][::-1]
    assert [j["id"] for j in client.get("/v1/jobs").json()] == ids[::-1]
    job = client.get(f"/v1/jobs/{ids[0]}").json()
    assert job["stage"] is None and job["progress"] is None and job["summary"] is None
    r = client.get("/v1/jobs", params={"cursor": "not-one"})
    assert r.status_code == 422 and "cursor" in r.json()["fields"]
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_healthz_counts_the_queue_and_the_workers_heartbeats(tmp_path, tiny_files):
    data_dir = tmp_path / "svc"
    client = _app(data_dir)
    health = client.get("/healthz").json()
    assert (health["queue_depth"], health["running"], health["workers_alive"]) == (0, 0, 0)
    ids = _queue_jobs(client, tiny_files, 2)
    assert client.get("/healthz").json()["queue_depth"] == 2
    for job_id in ids:  # canceled while queued: the worker below gets their deliveries and runs nothing
        client.post(f"/v1/jobs/{job_id}/cancel")
    assert client.get("/healthz").json()["queue_depth"] == 0
    w = _cli("worker", "--data-dir", str(data_dir), "--workers", "2")
    try:
        deadline = time.time() + 60
        while (health := client.get("/healthz").json())["workers_alive"] == 0 and time.time() < deadline:
            time.sleep(0.3)
        assert health["workers_alive"] == 1, health
        assert health["workers"][0]["pid"] == w.pid and health["workers"][0]["slots"] == 2
        assert health["workers"][0]["host"] == socket.gethostname()
        os.killpg(w.pid, signal.SIGTERM)  # a clean stop removes its row at once
        w.wait(30)
        assert client.get("/healthz").json()["workers_alive"] == 0
    finally:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGKILL)
            w.wait()
    # a worker killed without a word (or on a host that went away) stops counting after three missed beats
    from compressor.service.store import ALIVE_S, Store

    store = Store(data_dir)
    store.heartbeat("gone", "elsewhere", 1, 1, time.time())
    assert client.get("/healthz").json()["workers_alive"] == 1
    store._exec("UPDATE workers SET seen=? WHERE id='gone'", (time.time() - ALIVE_S - 1,))
    assert client.get("/healthz").json()["workers_alive"] == 0


def test_nproc_per_node_passes_through_and_is_checked(tmp_path, tiny_files):
    from compressor.config import CompressConfig
    from compressor.service.worker import build_kwargs

    data_dir = tmp_path / "svc"
    client = _app(data_dir, max_nproc_per_node=4)
    job_id = _queue_jobs(client, tiny_files, 1, dict(TINY_OPTS, nproc_per_node=2, schedule="gradual"))[0]
    assert client.get(f"/v1/jobs/{job_id}").json()["options"]["nproc_per_node"] == 2
    spec = json.loads((data_dir / "jobs" / job_id / "job.json").read_text())
    assert CompressConfig(**build_kwargs(spec)).nproc_per_node == 2  # what the job's process will run
    files = [f["id"] for f in client.get("/v1/files").json()]

    def bad(**options) -> dict:
        r = client.post("/v1/jobs", json={"model": files[0], "data": files[1], "options": dict(TINY_OPTS, **options)})
        assert r.status_code == 422, r.text
        return r.json()["fields"]

    assert bad(nproc_per_node=0) == {"nproc_per_node": "--nproc-per-node must be at least 1, got 0"}
    assert "more than this service allows (--max-nproc-per-node 4)" in bad(nproc_per_node=5)["nproc_per_node"]
    assert "must be at least --nproc-per-node 2" in bad(nproc_per_node=2, batch_size=1)["options"]
    assert "has the wrong type" in bad(nproc_per_node="two")["nproc_per_node"]
    assert "names a module to import" in bad(criterion="os:system")["criterion"]
    auto = bad(criterion="auto", criterion_options={"candidates": "l2,os:system"})
    assert "name a module to import" in auto["criterion_options"]
    assert [j["id"] for j in client.get("/v1/jobs").json()] == [job_id]  # nothing else was queued


def test_an_upload_is_deleted_once_no_running_job_reads_it(tmp_path, tiny_files):
    data_dir = tmp_path / "svc"
    client = _app(data_dir)  # no worker: the job stays queued
    [job_id] = _queue_jobs(client, tiny_files, 1)
    model_id = client.get(f"/v1/jobs/{job_id}").json()["model"]
    r = client.delete(f"/v1/files/{model_id}")
    assert r.status_code == 409 and job_id in r.json()["error"] and r.json()["hint"]
    assert (data_dir / "files" / model_id).is_dir()
    client.post(f"/v1/jobs/{job_id}/cancel")
    assert client.delete(f"/v1/files/{model_id}").status_code == 204
    assert not (data_dir / "files" / model_id).exists()
    assert model_id not in [f["id"] for f in client.get("/v1/files").json()]
    assert client.delete(f"/v1/files/{model_id}").status_code == 404


def test_retention_deletes_what_ended_long_ago_and_keeps_the_rest(tmp_path, tiny_files):
    from compressor.service.store import Store

    data_dir = tmp_path / "svc"
    client = _app(data_dir)
    old, recent, queued = _queue_jobs(client, tiny_files, 3)
    store = Store(data_dir)
    files = [f["id"] for f in client.get("/v1/files").json()]
    spare = client.post("/v1/files", files={"file": ("spare.npz", tiny_files[1].read_bytes())}).json()["id"]
    for job_id in (old, recent):
        client.post(f"/v1/jobs/{job_id}/cancel")
    day = 86400
    store._exec("UPDATE jobs SET finished=? WHERE id=?", (time.time() - 10 * day, old))
    store._exec("UPDATE files SET created=?", (time.time() - 10 * day,))

    # Through the server, as `serve --retention-days 7` runs it when it starts.
    with _app(data_dir, retention_days=7):
        pass
    left = {j["id"] for j in client.get("/v1/jobs").json()}
    assert left == {recent, queued}
    assert not store.job_dir(old).exists() and store.job_dir(recent).is_dir()
    # the two uploads the remaining jobs read stay; the old one nobody reads goes
    assert {f["id"] for f in client.get("/v1/files").json()} == set(files)
    assert not (data_dir / "files" / spare).exists()


@pytest.mark.parametrize(("args", "threads"), [([], max(1, (os.cpu_count() or 1) // 2)), (["--threads", "3"], 3)])
def test_worker_threads_default_to_the_cores_per_job_slot_and_can_be_set(monkeypatch, tmp_path, args, threads):
    from typer.testing import CliRunner

    import compressor.service.queue as queue
    import compressor.service.worker as worker
    from compressor.cli.toolbox import app

    seen = {}

    class Huey:
        compressor_settings: dict = {}

        def create_consumer(self, **kwargs):
            seen.update(self.compressor_settings, workers=kwargs["workers"])
            return type("Consumer", (), {"run": lambda self: None})()

    monkeypatch.setattr(queue, "make_huey", lambda *a: Huey())
    monkeypatch.setattr(worker, "start_heartbeat", lambda store, slots: (lambda: None))
    result = CliRunner().invoke(app, ["worker", "--data-dir", str(tmp_path), "--workers", "2", *args])
    assert result.exit_code == 0, result.output
    assert seen["threads"] == threads and seen["workers"] == 2
    assert CliRunner().invoke(app, ["worker", "--data-dir", str(tmp_path), "--threads", "0"]).exit_code != 0

"""The web pages' login cookie, CSRF and cross-site checks, and the progress they read, through FastAPI's
TestClient (no server, no browser, no job run)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from compressor.service.app import ServiceConfig, create_app
from compressor.service.auth import COOKIE, csrf_token, create_token
from compressor.service.models import Summary
from compressor.service.views import STAGES, progress_of, table_progress


@pytest.fixture()
def app(tmp_path):
    return create_app(ServiceConfig(data_dir=tmp_path / "svc"))


def _login(app, token: str, base_url: str = "http://testserver") -> TestClient:
    client = TestClient(app, base_url=base_url)
    r = client.post("/ui/login", data={"token": token, "next": "/ui/"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return client


def test_anonymous_mode_needs_no_login(app):
    client = TestClient(app)
    assert client.get("/ui/").status_code == 200
    assert client.get("/ui/submit").status_code == 200
    r = client.get("/ui/login", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    assert '<meta name="csrf-token" content="">' in client.get("/ui/").text  # no session, no token


def test_login_cookie_flags_and_wrong_token(app):
    token = create_token(app.state.store, "alice")
    client = TestClient(app)
    r = client.get("/ui/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
    r = client.post("/ui/login", data={"token": "cmp_wrong"}, follow_redirects=False)
    assert r.status_code == 401 and "the token is unknown or revoked" in r.text and "set-cookie" not in r.headers
    r = client.post("/ui/login", data={"token": token, "next": "//evil.example/x"}, follow_redirects=False)
    assert r.headers["location"] == "/ui/"  # no open redirect
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    https = TestClient(app, base_url="https://testserver")
    r = https.post("/ui/login", data={"token": token}, follow_redirects=False)
    assert "secure" in r.headers["set-cookie"].lower()
    client.cookies.clear()  # the forged cookie alone, not beside the real one the login set
    client.cookies.set(COOKIE, "cmp_forged")
    assert client.get("/ui/", follow_redirects=False).status_code == 303
    assert client.get("/v1/jobs").status_code == 401


def test_cookie_needs_csrf_token_to_change_state(app):
    token = create_token(app.state.store, "alice")
    client = _login(app, token)
    assert client.get("/v1/jobs").json() == []  # reading needs no CSRF token
    page = client.get("/ui/").text
    assert f'<meta name="csrf-token" content="{csrf_token(token)}">' in page
    r = client.post("/v1/files", files={"file": ("m.exe", b"MZ")})
    assert r.status_code == 403 and "CSRF" in r.json()["error"]
    r = client.post("/v1/files", files={"file": ("m.exe", b"MZ")}, headers={"X-CSRF-Token": csrf_token("cmp_other")})
    assert r.status_code == 403
    r = client.post("/v1/files", files={"file": ("m.exe", b"MZ")}, headers={"X-CSRF-Token": csrf_token(token)})
    assert r.status_code == 422 and "cannot take a .exe file" in r.json()["error"]  # past auth, the API's own error
    # logout is a form post with the token in a field
    assert client.post("/ui/logout", data={"csrf": "nope"}).status_code == 403
    r = client.post("/ui/logout", data={"csrf": csrf_token(token)}, follow_redirects=False)
    assert r.status_code == 303 and 'compressor_token=""' in r.headers["set-cookie"]


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                                     {"Origin": "http://evil.example"}, {"Origin": "null"}])
def test_cross_site_browser_requests_change_nothing(app, headers):
    r = TestClient(app).post("/v1/files", files={"file": ("m.exe", b"MZ")}, headers=headers)  # anonymous mode too
    assert r.status_code == 403 and "another site" in r.json()["error"]
    token = create_token(app.state.store, "alice")
    client = _login(app, token)
    r = client.post("/v1/files", files={"file": ("m.exe", b"MZ")}, headers={**headers, "X-CSRF-Token": csrf_token(token)})
    assert r.status_code == 403
    r = TestClient(app).post("/ui/login", data={"token": token}, headers=headers, follow_redirects=False)
    assert r.status_code == 403 and "set-cookie" not in r.headers  # no logging a victim in from elsewhere
    # Same-origin browsers and plain clients (no such headers) are unaffected; so is a bearer token.
    ok = {"Sec-Fetch-Site": "same-origin", "Origin": "http://testserver", "X-CSRF-Token": csrf_token(token)}
    assert client.post("/v1/files", files={"file": ("m.exe", b"MZ")}, headers=ok).status_code == 422
    r = TestClient(app).post("/v1/files", files={"file": ("m.exe", b"MZ")},
                             headers={**headers, "Authorization": f"Bearer {token}"})
    assert r.status_code == 422


def test_job_pages_are_the_owners_only(app):
    store = app.state.store
    alice, bob = create_token(store, "alice"), create_token(store, "bob")
    job = store.add_job("alice", {"arch": "resnet20", "target_flops": 0.5}, "m", "d")
    out = store.job_dir(job.id) / "out"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "channels.png").write_bytes(b"\x89PNG fake")
    (store.job_dir(job.id) / "job.json").write_text("{}")
    store.finish(job.id, "succeeded", result={"accuracy_original": 0.9, "accuracy_compressed": 0.8})
    a, b = _login(app, alice), _login(app, bob)
    page = a.get(f"/ui/jobs/{job.id}")
    assert page.status_code == 200 and "90.00% → 80.00%" in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    r = a.get(f"/ui/jobs/{job.id}/files/plots/channels.png")
    assert r.status_code == 200 and r.headers["content-security-policy"].startswith("sandbox")
    for path in ("files/..%2Fjob.json", "files/plots/../../job.json", "files/.hidden.png", "files/report.json"):
        assert a.get(f"/ui/jobs/{job.id}/{path}").status_code == 404, path
    assert b.get(f"/ui/jobs/{job.id}").status_code == 404
    assert b.get(f"/ui/jobs/{job.id}/files/plots/channels.png").status_code == 404
    assert job.id not in b.get("/ui/").text and job.id in a.get("/ui/").text


def _succeeded(store, owner: str, flops: float, acc: float, speed: float) -> str:
    job = store.add_job(owner, {"arch": "resnet20", "target_flops": flops}, "m", "d")
    out = store.job_dir(job.id) / "out"
    out.mkdir(parents=True)
    report = {"flops": {"achieved_ratio": flops}, "accuracy": {"original_onnx": 0.9, "compressed_onnx": acc},
              "latency_ms": {"batch1": {"speedup": speed}, "batch64": {"speedup": speed / 2}}, "criterion": "l2"}
    (out / "report.json").write_text(json.dumps(report))
    # as the worker does: the job table gets the report's headline figures, which the jobs list shows
    store.finish(job.id, "succeeded", result={"accuracy_original": 0.9, "accuracy_compressed": acc},
                 summary=dataclasses.asdict(Summary.from_report(report)))
    return job.id


def test_compare_page_draws_the_chosen_jobs(app):
    store = app.state.store
    a, b = _succeeded(store, "local", 0.5, 0.85, 1.8), _succeeded(store, "local", 0.3, 0.7, 2.6)
    other = _succeeded(store, "bob", 0.4, 0.8, 2.0)
    client = TestClient(app)
    listing = client.get("/ui/").text
    assert "1.80× / 0.90×" in listing and "90.00% → 70.00%" in listing and other not in listing
    r = client.get("/ui/compare", params=[("job", a), ("job", b), ("job", other)])
    assert r.status_code == 200 and 'src="data:image/png;base64,' in r.text
    rows = re.findall(r"<tr><td><a href=\"/ui/jobs/(\w+)\">", r.text)
    assert rows == [a, b]  # bob's job is not the anonymous owner's to compare
    assert "0.500" in r.text and "2.60x" in r.text and "-20.00" in r.text
    assert client.get("/ui/compare", params={"job": other}).status_code == 404


def test_the_jobs_list_pages_and_reads_only_the_job_table(app, monkeypatch):
    from compressor.service import views, web

    store = app.state.store
    monkeypatch.setattr(web, "JOBS_PER_PAGE", 3)
    ids = [store.add_job("local", {"arch": "resnet20", "target_flops": 0.5}, "m", "d").id for _ in range(5)]
    store.claim(ids[-1])
    store.set_progress(ids[-1], "fine-tune", {"task": "epoch 1", "done": 5, "total": 10, "eta_s": 3.0})
    # no job file is read for the list: its bars come from the job table the worker keeps current
    monkeypatch.setattr(views, "read_events", lambda *a, **k: pytest.fail("the list read a job's events"))
    client = TestClient(app)
    first = client.get("/ui/").text
    shown = re.findall(r'<tr data-job="(\w+)"', first)
    assert shown == ids[::-1][:3]
    assert f'value="{(3 + 0.5) / len(STAGES):.4f}"' in first and "fine-tune" in first
    older = re.search(r'href="(/ui/\?cursor=[^"]+)" id="older"', first).group(1)
    second = client.get(older.replace("&amp;", "&")).text
    assert re.findall(r'<tr data-job="(\w+)"', second) == ids[::-1][3:]
    assert 'id="older"' not in second and 'href="/ui/">newest jobs' in second
    assert client.get("/ui/?cursor=nonsense").status_code == 200  # a bad cursor shows the first page


def test_progress_from_the_job_table():
    from compressor.service.store import Job

    job = Job(id="j", owner="o", status="running", options={}, model_file="m", data_file="d", created=0.0,
              started=1.0, finished=None, error=None, attempts=1, pid=None, cancel=False, result=None,
              stage="prune", progress={"task": "search", "done": 1, "total": 4, "eta_s": 6.0})
    p = table_progress(job)
    assert (p.stage, p.task, p.done, p.total, p.eta_seconds) == ("prune", "search", 1, 4, 6.0)
    assert p.fraction == pytest.approx((2 + 0.25) / len(STAGES))
    assert table_progress(dataclasses.replace(job, status="succeeded")).fraction == 1.0
    assert table_progress(dataclasses.replace(job, status="queued", stage=None, progress=None)).fraction == 0.0


def _events(lines: list[dict]) -> list[dict]:
    return [{"n": i, **e} for i, e in enumerate(lines, 1)]


def test_progress_from_either_event_form():
    older = _events([{"t": 0, "kind": "stage", "name": "load"}, {"t": 1, "kind": "stage", "name": "trace"},
                     {"t": 2, "kind": "note", "message": "pre-flight: ok"}, {"t": 2, "kind": "stage", "name": "prune"},
                     {"t": 10, "kind": "task", "description": "search", "total": 4},
                     {"t": 12, "kind": "advance", "n": 1, "metrics": {}}])  # its own "n" (units) wins, as in read_events
    p = progress_of(older, "running")
    assert p.stage == "prune" and p.task == "search" and (p.done, p.total) == (1, 4)
    assert p.fraction == pytest.approx((2 + 0.25) / len(STAGES)) and p.eta_seconds == pytest.approx(6.0)
    assert [(x.kind, x.message) for x in p.log] == [("note", "pre-flight: ok")] and p.last == 5
    typed = _events([{"type": "stage_started", "time": 0, "name": "load"},
                     {"type": "stage_started", "time": 1, "name": "fine-tune"},
                     {"type": "task_started", "time": 1, "description": "epoch 1", "total": 10},
                     {"type": "task_progress", "time": 2, "description": "epoch 1", "done": 5, "total": 10,
                      "advanced": 1, "metrics": {}, "eta_seconds": 3.5},
                     {"type": "warning", "time": 3, "message": "slow"}])
    p = progress_of(typed, "running")
    assert p.stage == "fine-tune" and p.fraction == pytest.approx((3 + 0.5) / len(STAGES)) and p.eta_seconds == 3.5
    assert [x.kind for x in p.log] == ["warning"]
    assert progress_of(typed, "succeeded").fraction == 1.0
    failed = progress_of(typed + _events([{"kind": "error", "message": "boom"}]), "failed")
    assert failed.fraction < 1 and failed.task is None and failed.log[-1].message == "boom"
    assert progress_of([], "queued").fraction == 0.0


def test_templates_and_scripts_are_package_data():
    """The pages must work from an installed wheel: pyproject ships templates/ and static/."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    from fnmatch import fnmatch

    service = root / "compressor" / "service"
    for f in list((service / "templates").iterdir()) + list((service / "static").iterdir()):
        rel = f.relative_to(service).as_posix()
        assert any(fnmatch(rel, pat) for pat in data["compressor.service"]), rel

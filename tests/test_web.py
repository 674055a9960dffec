"""The service's web pages in a real browser: Playwright driving Debian's headless Chromium against uvicorn in
a subprocess (as tests/test_service.py runs it), with a real worker and the demo model.

Chromium is the system's (`/usr/bin/chromium`, `.ci/run` installs it); without it these tests fail, they do
not skip. `playwright install` (a browser download) is never needed.
"""

from __future__ import annotations

import re
import shutil
import time

import httpx
import numpy as np
import pytest

from _service import DEMO, Server, small_demo_data

TERMINAL = ("succeeded", "failed", "canceled")


@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium")
    assert exe, "chromium is missing: .ci/run installs it (apt-get install -y chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from compressor.service.auth import create_token
    from compressor.service.store import Store

    data_dir = tmp_path_factory.mktemp("web") / "svc"
    store = Store(data_dir)  # tokens straight into the table: `compressor token create` is tested elsewhere
    alice, bob = create_token(store, "alice"), create_token(store, "bob")
    s = Server(data_dir)  # its job runs on one intra-op thread (tests/_service.py says why)
    s.tokens = {"alice": alice, "bob": bob}
    yield s
    s.stop()


def _login(browser, service, token: str):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(service.url + "/ui/")
    assert "/ui/login" in page.url  # nothing without a token
    page.fill("#token", token)
    page.click("button[type=submit]")
    return context, page


def _queued_job(service, owner: str) -> str:
    """A job in the table that no worker will take (it is never put on the queue)."""
    from compressor.service.store import Store

    store = Store(service.data_dir)
    return store.add_job(owner, {"arch": "resnet20", "target_flops": 0.5}, "nofile", "nofile").id


def test_login_submit_watch_download(browser, service, tmp_path):
    data = small_demo_data(tmp_path / "small.npz")
    context, page = _login(browser, service, service.tokens["alice"])
    page.wait_for_url(re.compile(r"/ui/$"))
    cookie = next(c for c in context.cookies() if c["name"] == "compressor_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]  # plain http here

    page.goto(service.url + "/ui/submit")
    assert "oneshot" in page.inner_text("#schedule") and "l2" in page.inner_text("#criterion")
    page.set_input_files("#model", str(DEMO / "resnet20_fmnist.pt"))
    page.set_input_files("#data", str(data))
    page.select_option("#arch", "resnet20")
    page.fill("#target_flops", "7")  # a bad option first: the API's one line, on the page
    page.fill("#epochs", "0")
    page.fill("#mean", "0.2860")
    page.fill("#std", "0.3530")
    page.fill("#extra", '{"latency_runs": 5, "device": "cpu"}')
    page.click("#start")
    page.wait_for_selector("#submit-error:not([hidden])")
    assert page.inner_text("#submit-error") == "target_flops: --target-flops must lie strictly between 0 and 1, got 7"
    page.fill("#target_flops", "0.5")
    page.click("#start")
    page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]

    # Live progress: the page follows the event stream (it reloads only at the end).
    seen: list[tuple[float, str]] = []
    deadline = time.time() + 200
    while time.time() < deadline:
        try:
            state = page.evaluate("() => [document.getElementById('bar').value, "
                                  "document.getElementById('stage').textContent, "
                                  "document.getElementById('status').textContent]")
        except Exception:  # noqa: BLE001 - the page reloading at the end
            time.sleep(0.3)
            continue
        seen.append((state[0], state[1]))
        if state[2] in TERMINAL:
            break
        time.sleep(0.5)
    assert page.inner_text("#status") == "succeeded", page.inner_text("main")
    assert page.evaluate("document.getElementById('bar').value") == 1
    live = sorted({v for v, _ in seen if 0 < v < 1})
    assert len(live) >= 2, seen  # the bar moved while the job ran
    assert "prune" in {s for _, s in seen}
    assert "pre-flight" in page.inner_text("#log")

    # The result: plots drawn from the job's artifacts, and every artifact to download.
    sizes = page.eval_on_selector_all("#plots img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(sizes) >= 3 and all(w > 100 for w in sizes), sizes
    links = page.eval_on_selector_all("#artifacts a", "as => as.map(a => a.textContent)")
    api = {a["name"] for a in httpx.get(f"{service.url}/v1/jobs/{job_id}/artifacts",
                                        headers={"Authorization": f"Bearer {service.tokens['alice']}"}).json()}
    assert api <= set(links) and {"model.onnx", "report.html", "plots/accuracy.png"} <= set(links)
    page.screenshot(path=str(tmp_path / "job_page.png"), full_page=True)
    with page.expect_download() as download:
        page.click("#artifacts a:text-is('model.onnx')")
    onnx_path = tmp_path / "model.onnx"
    download.value.save_as(onnx_path)
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (1, 10)

    # The list: status, model, target, progress, accuracy before/after, speed-up.
    page.goto(service.url + "/ui/")
    row = page.locator(f"tr[data-job='{job_id}']")
    assert row.get_attribute("data-status") == "succeeded"
    text = row.inner_text()
    assert "resnet20_fmnist.pt" in text and "FLOPs × 0.5" in text and "→" in text and "×" in text, text
    assert row.locator("progress").get_attribute("value") == "1.0000"
    assert row.locator("input[type=checkbox]").count() == 1  # a succeeded job can be compared (test_web_auth.py)
    page.screenshot(path=str(tmp_path / "jobs_list.png"), full_page=True)
    context.close()
    print(f"screenshots: {tmp_path / 'jobs_list.png'}, {tmp_path / 'job_page.png'}")


def test_wrong_token_sees_neither_list_nor_job(browser, service):
    job_id = _queued_job(service, "alice")
    context, page = _login(browser, service, "cmp_not_a_token")
    assert page.inner_text("#error") == "the token is unknown or revoked"
    assert not [c for c in context.cookies() if c["name"] == "compressor_token"]
    # A forged cookie fares no better than the form.
    context.add_cookies([{"name": "compressor_token", "value": "cmp_forged", "url": service.url}])
    for path in ("/ui/", f"/ui/jobs/{job_id}", f"/ui/jobs/{job_id}/files/report.html"):
        response = page.goto(service.url + path)
        assert "/ui/login" in page.url or response.status == 404, path
        assert page.locator("#jobs, #job, #status").count() == 0, path
    context.close()
    # Another owner's token: an empty list, and a 404 for alice's job.
    context, page = _login(browser, service, service.tokens["bob"])
    page.wait_for_url(re.compile(r"/ui/$"))
    assert job_id not in page.content()
    assert page.goto(f"{service.url}/ui/jobs/{job_id}").status == 404
    context.close()


def test_cross_site_post_is_refused(browser, service):
    job_id = _queued_job(service, "alice")
    context, page = _login(browser, service, service.tokens["alice"])
    page.wait_for_url(re.compile(r"/ui/$"))
    # A form on another site posting to the API: the cookie is not even sent (SameSite), and no CSRF token.
    evil = ("<form id=f method=post action='{url}/v1/jobs/{job}/cancel'></form>"
            "<script>document.getElementById('f').submit()</script>").format(url=service.url, job=job_id)
    page.route("http://evil.test/", lambda route: route.fulfill(status=200, content_type="text/html", body=evil))
    with page.expect_navigation(url=re.compile(re.escape(service.url))) as nav:
        page.goto("http://evil.test/")
    assert nav.value.status in (401, 403)
    # The same request with the login cookie but without the page's CSRF token (as a script elsewhere would
    # send it): refused. With the token the pages render, it goes through.
    r = context.request.post(f"{service.url}/v1/jobs/{job_id}/cancel")
    assert r.status == 403 and "CSRF" in r.json()["error"]
    page.goto(f"{service.url}/ui/jobs/{job_id}")
    assert page.inner_text("#status") == "queued"
    csrf = page.get_attribute("meta[name=csrf-token]", "content")
    r = context.request.post(f"{service.url}/v1/jobs/{job_id}/cancel", headers={"X-CSRF-Token": csrf})
    assert r.status == 200 and r.json()["status"] == "canceled"
    # The page's own cancel button sends it: a second queued job canceled from the page.
    other = _queued_job(service, "alice")
    page.goto(f"{service.url}/ui/jobs/{other}")
    page.click("#cancel")
    page.wait_for_selector("#status:text-is('canceled')")
    context.close()


@pytest.mark.parametrize("form", ["typed", "older"])
def test_job_page_follows_the_stream_in_either_event_form(browser, service, form):
    """The page's script reads new events as views.py does: written by hand here, so the figures are known."""
    import json

    from compressor.service.store import Store

    store = Store(service.data_dir)
    job = store.add_job("alice", {"arch": "resnet20", "target_flops": 0.5}, "nofile", "nofile")
    assert store.claim(job.id)  # running (and never queued), so the page follows its stream
    now = time.time()
    if form == "typed":
        first = [{"type": "stage_started", "time": now, "name": "load"},
                 {"type": "stage_started", "time": now, "name": "fine-tune"},
                 {"type": "task_started", "time": now, "description": "epoch 1", "total": 10}]
        then = [{"type": "task_progress", "time": now + 2, "description": "epoch 1", "done": 5, "total": 10,
                 "advanced": 1, "metrics": {}, "eta_seconds": 3.5},
                {"type": "warning", "time": now + 2, "message": "slow going"}]
        stage, fraction, task, eta = "fine-tune", (3 + 0.5) / 6, "epoch 1 5/10", "ETA 4 s"
    else:
        first = [{"t": now, "kind": "stage", "name": "prune"},
                 {"t": now, "kind": "task", "description": "search", "total": 4}]
        then = [{"t": now + 2, "kind": "advance", "n": 1, "metrics": {}},
                {"t": now + 2, "kind": "note", "message": "slow going"}]
        stage, fraction, task, eta = "prune", (2 + 0.25) / 6, "search 1/4", "ETA 6 s"
    events = store.job_dir(job.id) / "events.jsonl"
    events.parent.mkdir(parents=True)
    events.write_text("".join(json.dumps(e) + "\n" for e in first))
    context, page = _login(browser, service, service.tokens["alice"])
    page.wait_for_url(re.compile(r"/ui/$"))
    page.goto(f"{service.url}/ui/jobs/{job.id}")
    assert page.inner_text("#stage") == stage and page.inner_text("#status") == "running"
    with events.open("a") as fh:  # new events, after the page was drawn: only the script can show them
        fh.write("".join(json.dumps(e) + "\n" for e in then))
    try:
        deadline = time.time() + 20  # (the pages' CSP forbids wait_for_function's eval; evaluate is not eval)
        while abs(page.evaluate("document.getElementById('bar').value") - fraction) > 1e-6 and time.time() < deadline:
            time.sleep(0.2)
        assert page.evaluate("document.getElementById('bar').value") == pytest.approx(fraction)
        assert page.inner_text("#task") == task and page.inner_text("#eta") == eta
        assert page.inner_text("#log").count("slow going") == 1
    finally:
        store.finish(job.id, "canceled")  # the stream ends; the page reloads to the job's end
    page.wait_for_selector("#status:text-is('canceled')")
    context.close()

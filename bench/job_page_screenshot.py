"""The README's picture of the service's job page: a demo job submitted from the web form in headless Chromium
(Debian's `chromium`, driven by Playwright), photographed once it succeeded.

    .venv/bin/python bench/job_page_screenshot.py --images 2000 --epochs 3 --out docs/job_page.png
"""

from __future__ import annotations

import argparse
import os
import shutil
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000, help="the first N images of the demo sample")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "job_page.png")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from compressor.service.auth import create_token
    from compressor.service.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="job-page-"))
    z = np.load(DEMO / "fmnist_sample.npz")
    data = tmp / "fmnist.npz"
    np.savez(data, images=z["images"][:args.images], labels=z["labels"][:args.images])
    token = create_token(Store(tmp / "svc"), "demo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-c", "from compressor.cli.toolbox import main; main()", "serve",
                               "--port", str(port), "--data-dir", str(tmp / "svc")], start_new_session=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/ui/login")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.goto(url + "/ui/submit")
            page.set_input_files("#model", str(DEMO / "resnet20_fmnist.pt"))
            page.set_input_files("#data", str(data))
            page.select_option("#arch", "resnet20")
            page.fill("#target_flops", "0.5")
            page.fill("#epochs", str(args.epochs))
            page.fill("#mean", "0.2860")
            page.fill("#std", "0.3530")
            page.fill("#extra", '{"device": "cpu"}')
            page.click("#start")
            page.wait_for_url("**/ui/jobs/*")
            page.wait_for_selector("#status:text-matches('succeeded|failed|canceled')", timeout=3_600_000)
            page.wait_for_load_state("networkidle")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            print(f"{page.inner_text('#status')}: {args.out}")
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

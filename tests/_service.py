"""Helpers of the service's tests: the server (uvicorn in a subprocess on a free loopback port), the CLI in a
subprocess, tokens, and the demo job's small data."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """``compressor ARGS`` in its own session. Its jobs use one intra-op thread unless ``OMP_NUM_THREADS`` is set:
    on a busy 2-core machine torch's default threads made the demo job about 3x slower (44 s against 125 s,
    measured interleaved; the reason for torch.set_num_threads(1) in conftest too)."""
    env = {"OMP_NUM_THREADS": "1", **os.environ, **(env or {})}
    return subprocess.Popen([sys.executable, "-c", "from compressor.cli.toolbox import main; main()", *args],
                            start_new_session=True, env=env, **kw)


class Server:
    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        """``env``: variables set for the server and its workers, over this process's environment."""
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = cli("serve", "--port", str(self.port), "--data-dir", str(data_dir), *extra, env=env)
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


def make_token(data_dir: Path, owner: str) -> str:
    out = subprocess.run([sys.executable, "-c", "from compressor.cli.toolbox import main; main()", "token", "create",
                          owner, "--data-dir", str(data_dir)], capture_output=True, text=True, check=True).stdout
    return out.split()[-1]


def small_demo_data(path: Path, n: int = 300) -> Path:
    """The first ``n`` images of the demo's Fashion-MNIST sample, as an .npz at ``path``."""
    z = np.load(DEMO / "fmnist_sample.npz")
    np.savez(path, images=z["images"][:n], labels=z["labels"][:n])
    return path

"""The httpx client behind ``compressor submit``, ``jobs``, ``job`` and ``cancel``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import httpx

from compressor.errors import CompressorError


class ServiceCallError(CompressorError):
    pass


class Client:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServiceCallError(f"cannot reach the service at {self.http.base_url}: {exc}") from None
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                raise ServiceCallError(f"the service answered {r.status_code}: {r.text[:200]}") from None
            raise ServiceCallError(body.get("error", r.text), hint=body.get("hint"))
        return r

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = self._request(method, path, **kw)
        return r.json() if r.content and r.headers.get("content-type", "").startswith("application/json") else None

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as fh:
            return self._call("POST", "/v1/files", files={"file": (path.name, fh)})

    def submit(self, model: str, data: str, options: dict) -> dict:
        return self._call("POST", "/v1/jobs", json={"model": model, "data": data, "options": options})

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def jobs(self, limit: int = 50) -> list[dict]:
        """The newest ``limit`` jobs, following the pages' cursors."""
        got: list[dict] = []
        params: dict[str, Any] = {"limit": min(limit, 500)}
        while len(got) < limit:
            r = self._request("GET", "/v1/jobs", params=params)
            got += r.json()
            if "X-Next-Cursor" not in r.headers:
                break
            params["cursor"] = r.headers["X-Next-Cursor"]
        return got[:limit]

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, after: int) -> list[dict]:
        return self._call("GET", f"/v1/jobs/{job_id}/events", params={"after": after})

    def wait(self, job_id: str, on_event: Callable[[dict], None] = lambda e: None, poll: float = 0.5) -> dict:
        after = 0
        while True:
            for ev in self.events(job_id, after):
                after = ev["n"]
                on_event(ev)
            job = self.job(job_id)
            if job["status"] in ("succeeded", "failed", "canceled"):
                for ev in self.events(job_id, after):
                    on_event(ev)
                return job
            time.sleep(poll)

    def download(self, job_id: str, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        got = []
        for art in self._call("GET", f"/v1/jobs/{job_id}/artifacts"):
            dest = out / Path(art["name"]).name
            tmp = dest.with_name(dest.name + ".part")
            with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{art['name']}") as r, open(tmp, "wb") as fh:
                for chunk in r.iter_bytes():
                    fh.write(chunk)
            tmp.replace(dest)
            got.append(dest)
        return got

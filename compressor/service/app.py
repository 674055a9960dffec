"""The HTTP API (FastAPI). Every CompressorError becomes one JSON error with the CLI's one-line text."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import Body, Depends, FastAPI, File, Header, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from compressor.errors import CompressorError

from . import uploads, web
from .auth import request_owner
from .errors import BadOptions, Conflict, NotFound
from .events import read_events
from .models import Health, JobView
from .store import TERMINAL, Store, page_cursor, page_key

# Options a job may not set: the service owns paths and never unpickles.
_PAIRS = {"mean": ("std",), "std": ("mean",), "schedule_options": ("schedule",), "criterion_options": ("criterion",)}
_MAPPINGS = {"schedule_options", "criterion_options"}
"""Fields that take a JSON object: a plug-in's options, which the plug-in validates."""
_RESERVED = {"model_path", "data_path", "val_data", "out_dir", "overwrite", "trust_pickle"}


@dataclass(frozen=True)
class ServiceConfig:
    data_dir: Path
    broker: str | None = None
    max_upload_bytes: int = 4 * 2**30
    max_zip_files: int = 100_000
    max_zip_bytes: int = 2 * 2**30
    min_free_bytes: int = 256 * 2**20
    allow_arch: tuple[str, ...] = ()
    max_nproc_per_node: int = 8
    """Most ``nproc_per_node`` a job may ask for (each is a process, and on CUDA a GPU, of the worker's host)."""
    retention_days: float | None = None
    """Finished jobs (with their artifacts) and the uploads no remaining job reads are deleted this many days
    after they ended or were made; None keeps everything until it is deleted through the API."""


def check_options(options: Any, allow_arch: tuple[str, ...], *, max_nproc: int = 8) -> dict[str, Any]:
    """Validate a job's options by building CompressConfig, one field at a time so that every bad one is named."""
    from compressor.config import CompressConfig

    if not isinstance(options, dict):
        raise BadOptions({"options": "must be a JSON object of CompressConfig fields"})
    fields = {f.name for f in dataclasses.fields(CompressConfig)}
    errors: dict[str, str] = {}
    base = {"model_path": Path("m.pt"), "data_path": Path("d.npz"), "target_flops": 0.5}
    for key, value in options.items():
        if key in _RESERVED:
            errors[key] = "is set by the service"
        elif key not in fields:
            errors[key] = "is not an option of compress"
        elif isinstance(value, dict) != (key in _MAPPINGS):
            errors[key] = ("must be a JSON object of the plug-in's options" if key in _MAPPINGS
                           else "must be a number, string, boolean, list or null")
        elif key in ("criterion", "schedule") and isinstance(value, str) and ":" in value:
            # package.module:Class would make the worker import a module the request names
            what = "criteria" if key == "criterion" else "schedules"
            errors[key] = f"{value!r} names a module to import; the service runs registered {what} only"
        elif key == "criterion_options" and ":" in str(value.get("candidates", "")):
            # --criterion auto's candidates are criteria too: the same rule
            errors[key] = (f"candidates {value['candidates']!r} name a module to import; the service runs "
                           "registered criteria only")
        else:
            try:
                kw = dict(base, **{key: tuple(value) if isinstance(value, list) else value})
                for partner in _PAIRS.get(key, ()):  # checked together: alone each one is an error
                    if isinstance(options.get(partner), list):
                        kw[partner] = tuple(options[partner])
                    elif key in _MAPPINGS and isinstance(options.get(partner), str):
                        kw[partner] = options[partner]
                if key == "target_latency":
                    kw.pop("target_flops")
                CompressConfig(**kw)
            except CompressorError as exc:
                errors[key] = exc.message
            except (TypeError, ValueError) as exc:
                errors[key] = f"has the wrong type ({exc})"
    arch = options.get("arch")
    if arch is None and "arch" not in errors:
        errors["arch"] = "is required (the service loads state dicts only)"
    elif isinstance(arch, str):
        from compressor.architectures import available_models

        if arch not in available_models() and arch not in allow_arch:
            errors["arch"] = f"{arch!r} is neither a registered model nor on the server's --allow-arch"
    elif "arch" not in errors:
        errors["arch"] = "must be a string"
    if not errors:
        try:
            config = CompressConfig(**dict({"model_path": Path("m.pt"), "data_path": Path("d.npz")},
                                           **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}))
        except CompressorError as exc:
            errors["options"] = exc.message
        except (TypeError, ValueError) as exc:
            errors["options"] = str(exc)
        else:
            _check_parallel(config, max_nproc, errors)
    if errors:
        raise BadOptions(errors)
    return options


def _check_parallel(config: Any, max_nproc: int, errors: dict[str, str]) -> None:
    """``nproc_per_node``: within the operator's limit (the GPU count is the worker host's, checked there)."""
    n = config.nproc_per_node
    if n > max_nproc:
        errors["nproc_per_node"] = f"--nproc-per-node {n} is more than this service allows (--max-nproc-per-node {max_nproc})"


def _uncursor(cursor: str) -> tuple[float, str]:
    key = page_key(cursor)
    if key is None:
        raise BadOptions({"cursor": "is not a cursor this service gave (take it from the Link header)"})
    return key


RETENTION_EVERY_S = 3600.0
"""How often the server applies ``--retention-days`` (and once when it starts)."""


@contextlib.contextmanager
def _retention(store: Store, days: float | None) -> Iterator[None]:
    """While the server runs, delete what is older than ``days`` at start and every RETENTION_EVERY_S."""
    if not days:
        yield
        return
    stop = threading.Event()

    def sweep() -> None:
        while True:
            try:
                store.sweep(time.time() - days * 86400)
            except sqlite3.Error:  # a locked DB: the next round tries again
                pass
            if stop.wait(RETENTION_EVERY_S):
                return

    thread = threading.Thread(target=sweep, name="retention", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def create_app(config: ServiceConfig) -> FastAPI:
    from .queue import make_huey

    store = Store(config.data_dir)
    huey = make_huey(config.data_dir, config.broker)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        with _retention(store, config.retention_days):
            yield

    app = FastAPI(title="compressor", version="1", lifespan=lifespan)

    @app.exception_handler(CompressorError)
    async def _compressor_error(request: Request, exc: CompressorError) -> JSONResponse:
        body: dict[str, Any] = {"error": exc.message}
        if exc.hint:
            body["hint"] = exc.hint
        if isinstance(exc, BadOptions):
            body["fields"] = exc.errors
        return JSONResponse(body, status_code=getattr(exc, "status", 422))

    def owner(request: Request, authorization: Optional[str] = Header(None)) -> str:  # the header: for the schema
        return request_owner(store, method=request.method, headers=request.headers, cookies=request.cookies)

    def job_of(job_id: str, who: str):
        job = store.get_job(job_id, who)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    @app.get("/healthz", response_model=Health)
    def healthz() -> dict:
        counts, now = store.count_jobs(), time.time()
        workers = [{"host": w["host"], "pid": w["pid"], "slots": w["slots"], "started": w["started"],
                    "seen_s": round(now - w["seen"], 1)} for w in store.alive_workers()]
        return {"ok": True, "free_bytes": shutil.disk_usage(config.data_dir).free,
                "queue_depth": counts.get("queued", 0), "running": counts.get("running", 0),
                "workers_alive": len(workers), "workers": workers}

    @app.post("/v1/files", status_code=201)
    def upload(file: UploadFile = File(...), who: str = Depends(owner)) -> dict:
        name = Path(file.filename or "upload").name
        kind = uploads.kind_of(name)
        uploads.check_space(config.data_dir, file.size or 0, config.min_free_bytes)
        file_id = uuid.uuid4().hex[:16]
        fdir = config.data_dir / "files" / file_id
        fdir.mkdir(parents=True)
        try:
            dest = fdir / name
            size, sha = uploads.save_stream(file.file, dest, config.max_upload_bytes)
            if kind == "model":
                uploads.check_model(dest)
                path = dest
            elif dest.suffix.lower() == ".npz":
                uploads.check_npz(dest)
                path = dest
            else:
                path = fdir / "data"
                uploads.safe_extract(dest, path, max_files=config.max_zip_files, max_bytes=config.max_zip_bytes)
                dest.unlink()
        except BaseException:
            shutil.rmtree(fdir, ignore_errors=True)
            raise
        row = store.add_file(who, name, kind, size, sha, path, file_id)
        return {k: row[k] for k in ("id", "name", "kind", "size", "sha256", "created")}

    @app.get("/v1/files")
    def files(who: str = Depends(owner)) -> list[dict]:
        return [{k: r[k] for k in ("id", "name", "kind", "size", "sha256", "created")} for r in store.list_files(who)]

    @app.delete("/v1/files/{file_id}", status_code=204)
    def delete_file(file_id: str, who: str = Depends(owner)) -> None:
        if store.get_file(who, file_id) is None:
            raise NotFound(f"no file {file_id}")
        active = store.jobs_using(file_id, active_only=True)
        if active:
            raise Conflict(f"file {file_id} is read by job {active[0]}, which has not ended",
                           hint="cancel or wait for that job first")
        store.delete_file(file_id)

    @app.post("/v1/jobs", status_code=201, response_model=JobView)
    def submit(body: dict = Body(...), who: str = Depends(owner)) -> dict:
        model, data = body.get("model"), body.get("data")
        options = check_options(body.get("options", {}), config.allow_arch, max_nproc=config.max_nproc_per_node)
        mrow = store.get_file(who, model) if isinstance(model, str) else None
        drow = store.get_file(who, data) if isinstance(data, str) else None
        if mrow is None or mrow["kind"] != "model":
            raise NotFound(f"no model file {model}")
        if drow is None or drow["kind"] != "data":
            raise NotFound(f"no data file {data}")
        uploads.check_space(config.data_dir, 0, config.min_free_bytes)
        job = store.add_job(who, options, model, data)
        jdir = store.job_dir(job.id)
        jdir.mkdir(parents=True)
        (jdir / "job.json").write_text(json.dumps({"options": options, "model_path": mrow["path"],
                                                   "data_path": drow["path"], "out_dir": str(jdir / "out")}))
        huey.run_job(job.id)
        return job.public()

    @app.get("/v1/jobs", response_model=list[JobView])
    def jobs(request: Request, response: Response, status: Optional[str] = None,
             limit: int = Query(50, ge=1, le=500), cursor: Optional[str] = None,
             who: str = Depends(owner)) -> list[dict]:
        """Newest first, ``limit`` a page; the next page's URL is in the ``Link`` header (``rel="next"``),
        its cursor also in ``X-Next-Cursor``; the last page has neither."""
        page, after = store.page_jobs(who, status=status, limit=limit, after=_uncursor(cursor) if cursor else None)
        if after is not None:
            nxt = request.url.include_query_params(cursor=page_cursor(after), limit=limit)
            response.headers["Link"] = f'<{nxt.path}?{nxt.query}>; rel="next"'
            response.headers["X-Next-Cursor"] = page_cursor(after)
        return [j.public() for j in page]

    @app.get("/v1/jobs/{job_id}", response_model=JobView)
    def job(job_id: str, who: str = Depends(owner)) -> dict:
        return job_of(job_id, who).public()

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobView)
    def cancel(job_id: str, who: str = Depends(owner)) -> dict:
        j = job_of(job_id, who)
        if j.status in TERMINAL:
            raise Conflict(f"job {job_id} has already {j.status}")
        store.request_cancel(job_id)
        return store.get_job(job_id).public()

    @app.delete("/v1/jobs/{job_id}", status_code=204)
    def delete(job_id: str, who: str = Depends(owner)) -> None:
        j = job_of(job_id, who)
        if j.status not in TERMINAL:
            store.request_cancel(job_id)
        store.delete_job(job_id)
        shutil.rmtree(store.job_dir(job_id), ignore_errors=True)

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, request: Request, after: int = 0, who: str = Depends(owner)):
        job_of(job_id, who)
        path = store.job_dir(job_id) / "events.jsonl"
        if "text/event-stream" not in request.headers.get("accept", ""):
            return read_events(path, max(after, 0))

        async def stream():
            n = max(after, 0)
            while True:
                for ev in read_events(path, n):
                    n = ev["n"]
                    yield f"id: {n}\ndata: {json.dumps(ev)}\n\n"
                j = store.get_job(job_id)
                if j is None or j.status in TERMINAL:
                    yield f"event: end\ndata: {json.dumps({'status': j.status if j else 'deleted'})}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/v1/jobs/{job_id}/artifacts")
    def artifacts(job_id: str, who: str = Depends(owner)) -> list[dict]:
        j = job_of(job_id, who)
        out = store.job_dir(job_id) / "out"
        if j.status != "succeeded" or not out.is_dir():
            return []
        return [{"name": p.name, "size": p.stat().st_size} for p in sorted(out.iterdir()) if p.is_file()]

    @app.get("/v1/jobs/{job_id}/artifacts/{name}")
    def artifact(job_id: str, name: str, who: str = Depends(owner)) -> FileResponse:
        j = job_of(job_id, who)
        out = store.job_dir(job_id) / "out"
        path = out / name
        if j.status != "succeeded" or "/" in name or name.startswith(".") or not path.is_file():
            raise NotFound(f"no artifact {name} in job {job_id}")
        return FileResponse(path, filename=name)

    app.include_router(web.router(store, config))  # the pages, over the same store and API
    app.state.store = store
    app.state.huey = huey
    return app

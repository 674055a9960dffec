"""The service's web pages: server-rendered (Jinja2) over the same store as the API, with a little script.

The pages read the store; everything that changes state (upload, submit, cancel, delete) is the page's
script calling the JSON API itself, with the login cookie and the page's CSRF token, so a form's errors
are the API's one-line errors. The pages are not in the OpenAPI schema.
"""

from __future__ import annotations

import base64
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from compressor.errors import CompressorError

from . import views
from .auth import COOKIE, CSRF_HEADER, check_csrf, check_same_origin, csrf_token, owner_of, request_owner
from .errors import NotFound, Unauthorized
from .store import TERMINAL, Store, page_cursor, page_key

HERE = Path(__file__).resolve().parent
STATIC = {"style.css": "text/css", "job.js": "text/javascript", "submit.js": "text/javascript",
          "list.js": "text/javascript"}
JOBS_PER_PAGE = 50
"""Jobs on one page of the jobs list (newest first; a link leads to older ones)."""
PLOT_ORDER = ("channels", "shares", "accuracy", "latency", "latency_search", "stability")
# The pages run only their own script and styles; a job's report (its own page) runs nothing at all.
PAGE_CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; frame-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
FILE_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'"


def _local(path: str) -> str:
    """Where to go after login: a path of this site only (no open redirect)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/ui/"


def router(store: Store, config: Any) -> APIRouter:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["duration"] = views.duration
    r = APIRouter(include_in_schema=False)

    def viewer(request: Request) -> str | None:
        """The owner of a page request, None where it must log in first."""
        try:
            return request_owner(store, method=request.method, headers=request.headers, cookies=request.cookies)
        except Unauthorized:
            return None

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        token = request.cookies.get(COOKIE) if store.any_tokens() else None
        context.update(anonymous=not store.any_tokens(), csrf=csrf_token(token), csrf_header=CSRF_HEADER)
        response = templates.TemplateResponse(request, name, context, status_code=status)
        response.headers["Content-Security-Policy"] = PAGE_CSP
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    def to_login(request: Request) -> RedirectResponse:
        return RedirectResponse(f"/ui/login?next={quote(request.url.path)}", status_code=303)

    def failed(request: Request, exc: CompressorError) -> HTMLResponse:
        return render(request, "error.html", getattr(exc, "status", 400), error=exc.message, hint=exc.hint)

    @r.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=303)

    @r.get("/ui/login")
    def login_page(request: Request, next: str = "/ui/") -> Response:
        if not store.any_tokens():
            return RedirectResponse(_local(next), status_code=303)
        return render(request, "login.html", next=_local(next), error=None)

    @r.post("/ui/login")
    def login(request: Request, token: str = Form(""), next: str = Form("/ui/")) -> Response:
        try:
            check_same_origin(request.method, request.headers)  # no logging in a victim from another site
            owner_of(store, f"Bearer {token.strip()}")
        except CompressorError as exc:
            return render(request, "login.html", getattr(exc, "status", 400), next=_local(next), error=exc.message)
        response = RedirectResponse(_local(next), status_code=303)
        if store.any_tokens():
            response.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict", path="/",
                                secure=request.url.scheme == "https")
        return response

    @r.post("/ui/logout")
    def logout(request: Request, csrf: str = Form("")) -> Response:
        try:
            check_same_origin(request.method, request.headers)
            check_csrf(request.cookies.get(COOKIE), csrf)
        except CompressorError as exc:
            return failed(request, exc)
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response

    @r.get("/ui/")
    def jobs_page(request: Request, cursor: Optional[str] = None) -> Response:
        who = viewer(request)
        if who is None:
            return to_login(request)
        key = page_key(cursor) if cursor else None
        page, after = store.page_jobs(who, limit=JOBS_PER_PAGE, after=key)
        rows = [views.row(store, j) for j in page]
        return render(request, "jobs.html", who=who, rows=rows, active=any(x.job.status not in TERMINAL for x in rows),
                      older=page_cursor(after) if after else None, newest=cursor is not None)

    @r.get("/ui/jobs/{job_id}")
    def job_page(request: Request, job_id: str) -> Response:
        who = viewer(request)
        if who is None:
            return to_login(request)
        job = store.get_job(job_id, who)
        if job is None:
            return failed(request, NotFound(f"no job {job_id}"))
        row = views.row(store, job, detail=True)
        out = views.out_dir(store, job)
        artifacts = sorted(p.name for p in out.iterdir() if p.is_file()) if out else []
        plots = []
        if out and (out / "plots").is_dir():
            pngs = sorted((out / "plots").glob("*.png"),
                          key=lambda p: (PLOT_ORDER.index(p.stem) if p.stem in PLOT_ORDER else 99, p.stem))
            plots = [(p.stem, p.name, p.with_suffix(".svg").name if p.with_suffix(".svg").exists() else None)
                     for p in pngs]
        return render(request, "job.html", who=who, row=row, job=job, artifacts=artifacts, plots=plots,
                      report="report.html" in artifacts, terminal=job.status in TERMINAL)

    @r.get("/ui/jobs/{job_id}/files/{path:path}")
    def job_file(request: Request, job_id: str, path: str) -> Response:
        """The run's report and plots, shown inline (the API's artifact route sends top-level files as
        downloads); sandboxed, so nothing in them runs."""
        who = viewer(request)
        job = store.get_job(job_id, who) if who is not None else None
        out = views.out_dir(store, job) if job is not None else None
        target = (out / path).resolve() if out is not None else None
        if (target is None or out.resolve() not in target.parents or target.suffix not in (".png", ".svg", ".html")
                or any(part.startswith(".") for part in Path(path).parts) or not target.is_file()):
            return Response("not found", status_code=404, media_type="text/plain")
        response = FileResponse(target)
        response.headers["Content-Security-Policy"] = FILE_CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @r.get("/ui/submit")
    def submit_page(request: Request) -> Response:
        who = viewer(request)
        if who is None:
            return to_login(request)
        from compressor.config import CompressConfig
        from compressor.criteria import available_criteria
        from compressor.models import list_models
        from compressor.schedules import available_schedules

        defaults = {f.name: f.default for f in dataclasses.fields(CompressConfig)}
        return render(request, "submit.html", who=who, archs=list(list_models()) + list(config.allow_arch),
                      criteria=[c.name for c in available_criteria()],
                      schedules=[s.name for s in available_schedules()], defaults=defaults)

    @r.get("/ui/compare")
    def compare_page(request: Request, job: Optional[list[str]] = Query(None)) -> Response:
        who = viewer(request)
        if who is None:
            return to_login(request)
        from compressor.compare import TABLE_HEADER, compare, table_rows

        chosen = [store.get_job(j, who) for j in dict.fromkeys(job or [])]
        runs = [(j, views.out_dir(store, j)) for j in chosen if j is not None]
        runs = [(j, out) for j, out in runs if out is not None and (out / "report.json").is_file()]
        if not runs:
            return failed(request, NotFound("choose one or more succeeded jobs to compare"))
        with tempfile.TemporaryDirectory(prefix="compressor-compare-") as tmp:
            dirs = []
            for j, out in runs:  # compare() names each run after its folder: here, the job id
                d = Path(tmp) / j.id
                d.mkdir()
                shutil.copy(out / "report.json", d / "report.json")
                dirs.append(d)
            try:
                result = compare(dirs, out=Path(tmp) / "compare")
            except CompressorError as exc:
                return failed(request, exc)
            png = base64.b64encode(result.files[0].read_bytes()).decode("ascii")
        return render(request, "compare.html", who=who, png=png, header=TABLE_HEADER,
                      rows=list(zip([j for j, _ in runs], table_rows(result.runs))))

    @r.get("/ui/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            return Response("not found", status_code=404, media_type="text/plain")
        return FileResponse(HERE / "static" / name, media_type=STATIC[name])

    return r

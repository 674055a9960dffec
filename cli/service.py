"""Thin commands of the service: serve, worker, submit, jobs, job, cancel, token."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._render import err, out, run_guarded

DATA_DIR = Path(os.environ.get("COMPRESSOR_DATA_DIR", "service-data"))
URL = os.environ.get("COMPRESSOR_URL", "http://127.0.0.1:8000")

token_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                        no_args_is_help=True, help="API tokens (only their sha256 is kept).")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(host: Annotated[str, typer.Option(help="Address to listen on (non-loopback needs tokens).")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port.")] = 8000,
          data_dir: Annotated[Path, typer.Option(help="Where files, jobs and the queue live.")] = DATA_DIR,
          broker: Annotated[Optional[str], typer.Option(help="redis://... queue (default: SQLite under --data-dir).")] = None,
          workers: Annotated[int, typer.Option(help="Embedded worker threads started with the API (0: none; run "
                                               "`compressor worker` apart).")] = 1,
          job_timeout: Annotated[float, typer.Option(help="Seconds a job may run before it is stopped.")] = 3600.0,
          max_attempts: Annotated[int, typer.Option(help="Times a job interrupted by a dead worker is tried.")] = 2,
          threads: Annotated[Optional[int], typer.Option(min=1, help="Threads each job's process uses (OMP_NUM_THREADS) "
                                                         "[default: the host's cores / --workers].")] = None,
          max_upload_mb: Annotated[int, typer.Option(help="Largest upload, MiB.")] = 4096,
          max_unpacked_mb: Annotated[int, typer.Option(help="Most bytes a data .zip may unpack to, MiB.")] = 2048,
          allow_arch: Annotated[Optional[list[str]], typer.Option(help="package.module:factory archs jobs may use.")] = None,
          max_nproc_per_node: Annotated[int, typer.Option(help="Most nproc_per_node a job may ask for (data-parallel "
                                                          "fine-tuning processes on the worker's host).")] = 8,
          retention_days: Annotated[Optional[float], typer.Option(min=0.001, help="Delete finished jobs (and uploads no "
                                                                  "remaining job reads) this many days after they "
                                                                  "ended or were made (default: keep).")] = None,
          ) -> None:
    """Run the HTTP API (and, by default, one embedded worker)."""
    def go() -> None:
        import uvicorn

        from compressor.errors import ConfigError
        from compressor.service.app import ServiceConfig, create_app
        from compressor.service.store import Store

        if not _loopback(host) and not Store(data_dir).any_tokens():
            raise ConfigError(f"refusing to listen on {host} without tokens",
                              hint="create one with `compressor token create OWNER` first, or use 127.0.0.1")
        child = None
        if workers > 0:
            cmd = [sys.executable, "-c", "from compressor.cli.toolbox import main; main()", "worker", "--data-dir", str(data_dir),
                   "--workers", str(workers), "--job-timeout", str(job_timeout), "--max-attempts", str(max_attempts)]
            if broker:
                cmd += ["--broker", broker]
            if threads:
                cmd += ["--threads", str(threads)]
            child = subprocess.Popen(cmd)
        try:
            app = create_app(ServiceConfig(data_dir=data_dir, broker=broker, max_upload_bytes=max_upload_mb * 2**20,
                                           max_zip_bytes=max_unpacked_mb * 2**20,
                                           allow_arch=tuple(allow_arch or ()), max_nproc_per_node=max_nproc_per_node,
                                           retention_days=retention_days))
            uvicorn.run(app, host=host, port=port, log_level="warning")
        finally:
            if child is not None:
                child.terminate()
                try:
                    child.wait(15)
                except subprocess.TimeoutExpired:
                    child.kill()
    run_guarded(go)


def worker(data_dir: Annotated[Path, typer.Option(help="The service's data dir (shared with the API).")] = DATA_DIR,
           broker: Annotated[Optional[str], typer.Option(help="redis://... queue (default: SQLite under --data-dir).")] = None,
           workers: Annotated[int, typer.Option(help="Jobs run at once (each in its own subprocess).")] = 1,
           job_timeout: Annotated[float, typer.Option(help="Seconds a job may run before it is stopped.")] = 3600.0,
           max_attempts: Annotated[int, typer.Option(help="Times a job interrupted by a dead worker is tried.")] = 2,
           threads: Annotated[Optional[int], typer.Option(min=1, help="Threads each job's process uses (OMP_NUM_THREADS) "
                                                          "[default: the host's cores / --workers].")] = None,
           ) -> None:
    """Take jobs from the queue and run each in its own subprocess."""
    def go() -> None:
        from compressor.service.queue import make_huey
        from compressor.service.store import Store
        from compressor.service.worker import recover, start_heartbeat

        huey = make_huey(data_dir, broker)
        huey.compressor_settings.update(job_timeout=job_timeout, max_attempts=max_attempts,
                                        threads=threads or max(1, (os.cpu_count() or 1) // max(1, workers)))
        store = Store(data_dir)
        for job_id in recover(store, huey, max_attempts):
            err.print(f"recovered interrupted job {job_id}")
        stop_heartbeat = start_heartbeat(store, workers)
        try:
            huey.create_consumer(workers=workers, worker_type="thread", periodic=False, check_worker_health=True).run()
        finally:
            stop_heartbeat()
    run_guarded(go)


def submit(model: Annotated[Path, typer.Argument(help="State dict to compress.")],
           data: Annotated[Path, typer.Option(help=".npz or .zip image folder.")],
           option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="KEY=VALUE (JSON value) of "
                                                               "CompressConfig, e.g. -o target_flops=0.5.")] = None,
           out_dir: Annotated[Optional[Path], typer.Option("--out", help="Download the artifacts here.")] = None,
           url: Annotated[str, typer.Option(help="The service.", envvar="COMPRESSOR_URL")] = URL,
           token: Annotated[Optional[str], typer.Option(help="API token.", envvar="COMPRESSOR_TOKEN")] = None,
           wait: Annotated[bool, typer.Option(help="Follow the job to its end.")] = True,
           ) -> None:
    """Upload a model and data, submit a job, follow its progress, download its artifacts."""
    def go() -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from compressor.errors import ConfigError
        from compressor.service.client import Client

        options = {}
        for item in option or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--option takes KEY=VALUE, got {item}")
            try:
                options[key] = json.loads(value)
            except ValueError:
                options[key] = value
        client = Client(url, token)
        m, d = client.upload(model), client.upload(data)
        job = client.submit(m["id"], d["id"], options)
        err.print(f"job {job['id']} queued")
        if not wait:
            out.print(job["id"])
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err, transient=True) as bar:
            current = bar.add_task("queued", total=None)

            def on_event(ev: dict) -> None:  # the library's typed events (compressor.events), as JSON
                kind = ev.get("type")
                if kind == "stage_started":
                    bar.update(current, description=ev["name"], total=None, completed=0)
                elif kind == "task_started":
                    bar.update(current, description=ev["description"], total=ev["total"], completed=0)
                elif kind == "task_progress":
                    bar.update(current, completed=ev["done"])
                elif kind in ("note", "warning"):
                    err.print(("warning: " if kind == "warning" else "") + ev["message"], highlight=False, markup=False)
            job = client.wait(job["id"], on_event)
        if job["status"] != "succeeded":
            from compressor.errors import CompressorError

            raise CompressorError(f"job {job['id']} {job['status']}: {job.get('error') or ''}".rstrip(": "))
        if out_dir is not None:
            for p in client.download(job["id"], out_dir):
                err.print(f"wrote {p}")
        out.print(json.dumps(job["summary"]), highlight=False, markup=False, soft_wrap=True)
    run_guarded(go)


def jobs(url: Annotated[str, typer.Option(envvar="COMPRESSOR_URL")] = URL,
         token: Annotated[Optional[str], typer.Option(envvar="COMPRESSOR_TOKEN")] = None,
         limit: Annotated[int, typer.Option(help="Newest jobs to list.")] = 50) -> None:
    """List your jobs, newest first."""
    def go() -> None:
        from compressor.service.client import Client

        for j in Client(url, token).jobs(limit=limit):
            out.print(f"{j['id']}  {j['status']:<9}  {j.get('stage') or '':<9}  {j.get('error') or ''}".rstrip(),
                      highlight=False, markup=False)
    run_guarded(go)


def job(job_id: str, url: Annotated[str, typer.Option(envvar="COMPRESSOR_URL")] = URL,
        token: Annotated[Optional[str], typer.Option(envvar="COMPRESSOR_TOKEN")] = None) -> None:
    """One job as JSON."""
    run_guarded(lambda: out.print(json.dumps(__import__("compressor.service.client", fromlist=["Client"])
                                             .Client(url, token).job(job_id), indent=1), markup=False, highlight=False))


def cancel(job_id: str, url: Annotated[str, typer.Option(envvar="COMPRESSOR_URL")] = URL,
           token: Annotated[Optional[str], typer.Option(envvar="COMPRESSOR_TOKEN")] = None) -> None:
    """Cancel a queued or running job."""
    def go() -> None:
        from compressor.service.client import Client

        out.print(Client(url, token).cancel(job_id)["status"], markup=False)
    run_guarded(go)


@token_app.command("create")
def token_create(owner: str, name: Annotated[str, typer.Option()] = "",
                 data_dir: Annotated[Path, typer.Option()] = DATA_DIR) -> None:
    """Create a token for OWNER; it is printed once, as the last word."""
    from compressor.service.auth import create_token
    from compressor.service.store import Store

    out.print(f"token for {owner} (shown once): {create_token(Store(data_dir), owner, name)}",
              markup=False, highlight=False, soft_wrap=True)


@token_app.command("list")
def token_list(data_dir: Annotated[Path, typer.Option()] = DATA_DIR) -> None:
    """Tokens by owner and the first characters of their hash."""
    from compressor.service.store import Store

    for t in Store(data_dir).list_tokens():
        out.print(f"{t['hash'][:12]}  {t['owner']}  {t['name']}  {'revoked' if t['revoked'] else 'active'}",
                  markup=False, highlight=False)


@token_app.command("revoke")
def token_revoke(hash_prefix: str, data_dir: Annotated[Path, typer.Option()] = DATA_DIR) -> None:
    """Revoke tokens by hash prefix (from `token list`) or name."""
    from compressor.service.store import Store

    out.print(f"revoked {Store(data_dir).revoke_token(hash_prefix)}", markup=False)


def register(app: typer.Typer) -> None:
    for fn, name in ((serve, "serve"), (worker, "worker"), (submit, "submit"), (jobs, "jobs"), (job, "job"),
                     (cancel, "cancel")):
        app.command(name)(fn)
    app.add_typer(token_app, name="token")

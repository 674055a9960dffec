"""The job, file and token tables (SQLite). The job table is the source of truth for status."""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "canceled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, owner TEXT, name TEXT, kind TEXT, size INTEGER,
    sha256 TEXT, path TEXT, created REAL);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, owner TEXT, status TEXT, options TEXT, model_file TEXT,
    data_file TEXT, created REAL, started REAL, finished REAL, error TEXT, attempts INTEGER DEFAULT 0,
    pid INTEGER, cancel INTEGER DEFAULT 0, result TEXT);
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, owner TEXT, name TEXT, created REAL, revoked INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, host TEXT, pid INTEGER, slots INTEGER, started REAL, seen REAL);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created, id);
"""
# Columns added after the first release: a data dir made by it gains them on open.
_ADDED = {"stage": "TEXT", "progress": "TEXT", "summary": "TEXT", "hint": "TEXT"}

def page_cursor(key: tuple[float, str]) -> str:
    """The opaque cursor of a page key (:meth:`Store.page_jobs`), for a URL."""
    return base64.urlsafe_b64encode(f"{key[0]!r}/{key[1]}".encode()).decode().rstrip("=")


def page_key(cursor: str) -> tuple[float, str] | None:
    """The page key of a cursor :func:`page_cursor` made; None for anything else."""
    try:
        created, job_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("/", 1)
        return float(created), job_id
    except (ValueError, UnicodeDecodeError):
        return None


HEARTBEAT_S = 5.0
"""How often a worker process writes its row in ``workers``."""
ALIVE_S = 3 * HEARTBEAT_S
"""A worker whose row is older than this counts as dead (missed three heartbeats)."""


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    status: str
    options: dict[str, Any]
    model_file: str
    data_file: str
    created: float
    started: float | None
    finished: float | None
    error: str | None
    attempts: int
    pid: int | None
    cancel: bool
    result: dict[str, Any] | None
    stage: str | None = None
    """The stage the run is in (or ended in), from its latest ``stage_started`` event."""
    progress: dict[str, Any] | None = None
    """The current task's ``{task, done, total, eta_s}`` from its latest events; None between tasks."""
    summary: dict[str, Any] | None = None
    """On success, the headline figures of report.json (:class:`compressor.service.models.Summary`)."""
    hint: str | None = None
    """What to do about ``error``."""

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "stage": self.stage, "progress": self.progress,
                "options": self.options, "model": self.model_file, "data": self.data_file, "created": self.created,
                "started": self.started, "finished": self.finished, "error": self.error, "hint": self.hint,
                "attempts": self.attempts, "summary": self.summary, "result": self.result}


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "files").mkdir(exist_ok=True)
        (self.data_dir / "jobs").mkdir(exist_ok=True)
        self.path = self.data_dir / "service.db"
        self._local = threading.local()
        with self._db() as db:
            db.executescript(_SCHEMA)
            have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in _ADDED.items():
                if column not in have:
                    try:
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
                    except sqlite3.OperationalError as exc:  # another process added it first
                        if "duplicate column" not in str(exc):
                            raise

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (autocommit, WAL), opened on its first use and kept: the API's request
        threads and the workers' threads each reuse theirs instead of opening one per statement."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        return self._db().execute(sql, args)

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    # files
    def add_file(self, owner: str, name: str, kind: str, size: int, sha256: str, path: Path, file_id: str) -> dict:
        self._exec("INSERT INTO files VALUES (?,?,?,?,?,?,?,?)",
                   (file_id, owner, name, kind, size, sha256, str(path), time.time()))
        return self.get_file(owner, file_id)

    def get_file(self, owner: str, file_id: str) -> dict | None:
        row = self._exec("SELECT * FROM files WHERE id=? AND owner=?", (file_id, owner)).fetchone()
        return dict(row) if row else None

    def list_files(self, owner: str) -> list[dict]:
        return [dict(r) for r in self._exec("SELECT * FROM files WHERE owner=? ORDER BY created", (owner,))]

    def jobs_using(self, file_id: str, *, active_only: bool = False) -> list[str]:
        """The ids of the jobs that read ``file_id`` (only those queued or running with ``active_only``)."""
        sql = "SELECT id FROM jobs WHERE (model_file=? OR data_file=?)"
        if active_only:
            sql += " AND status NOT IN ('succeeded','failed','canceled')"
        return [r["id"] for r in self._exec(sql, (file_id, file_id))]

    def delete_file(self, file_id: str) -> None:
        """The file's row and its folder under ``files/``."""
        self._exec("DELETE FROM files WHERE id=?", (file_id,))
        shutil.rmtree(self.data_dir / "files" / file_id, ignore_errors=True)

    def sweep(self, older_than: float) -> tuple[list[str], list[str]]:
        """Retention: delete the jobs that ended before ``older_than`` (a time.time() value), with their
        folders, then the uploads made before it that no remaining job reads. Returns (jobs, files) deleted."""
        jobs = [r["id"] for r in self._exec("SELECT id FROM jobs WHERE status IN ('succeeded','failed','canceled') "
                                            "AND finished < ?", (older_than,))]
        for job_id in jobs:
            self.delete_job(job_id)
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        files = [r["id"] for r in self._exec("SELECT id FROM files WHERE created < ?", (older_than,))
                 if not self.jobs_using(r["id"])]
        for file_id in files:
            self.delete_file(file_id)
        return jobs, files

    # jobs
    def add_job(self, owner: str, options: dict, model_file: str, data_file: str) -> Job:
        job_id = uuid.uuid4().hex[:16]
        self._exec("INSERT INTO jobs (id, owner, status, options, model_file, data_file, created) "
                   "VALUES (?,?,?,?,?,?,?)", (job_id, owner, "queued", json.dumps(options), model_file, data_file,
                                              time.time()))
        return self.get_job(job_id)

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        d = dict(row)
        return Job(id=d["id"], owner=d["owner"], status=d["status"], options=json.loads(d["options"]),
                   model_file=d["model_file"], data_file=d["data_file"], created=d["created"],
                   started=d["started"], finished=d["finished"], error=d["error"], attempts=d["attempts"] or 0,
                   pid=d["pid"], cancel=bool(d["cancel"]), result=json.loads(d["result"]) if d["result"] else None,
                   stage=d["stage"], progress=json.loads(d["progress"]) if d["progress"] else None,
                   summary=json.loads(d["summary"]) if d["summary"] else None, hint=d["hint"])

    def get_job(self, job_id: str, owner: str | None = None) -> Job | None:
        if owner is None:
            row = self._exec("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        else:
            row = self._exec("SELECT * FROM jobs WHERE id=? AND owner=?", (job_id, owner)).fetchone()
        return self._job(row) if row else None

    def list_jobs(self, owner: str | None = None, status: str | None = None) -> list[Job]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if owner is not None:
            sql += " AND owner=?"
            args.append(owner)
        if status is not None:
            sql += " AND status=?"
            args.append(status)
        return [self._job(r) for r in self._exec(sql + " ORDER BY created", tuple(args))]

    def page_jobs(self, owner: str, *, status: str | None = None, limit: int = 50,
                  after: tuple[float, str] | None = None) -> tuple[list[Job], tuple[float, str] | None]:
        """Newest first, ``limit`` at most, those older than ``after`` (the ``(created, id)`` of the previous
        page's last job: keyset paging, so jobs added meanwhile shift nothing). Returns the page and the key
        of the next one (None on the last page)."""
        sql, args = "SELECT * FROM jobs WHERE owner=?", [owner]
        if status is not None:
            sql += " AND status=?"
            args.append(status)
        if after is not None:
            sql += " AND (created < ? OR (created = ? AND id < ?))"
            args += [after[0], after[0], after[1]]
        rows = self._exec(sql + " ORDER BY created DESC, id DESC LIMIT ?", (*args, limit + 1)).fetchall()
        page = [self._job(r) for r in rows[:limit]]
        return page, ((page[-1].created, page[-1].id) if len(rows) > limit else None)

    def count_jobs(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._exec("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}

    def claim(self, job_id: str) -> bool:
        """queued -> running, once: a duplicate delivery of the same job finds it claimed."""
        cur = self._exec("UPDATE jobs SET status='running', started=?, attempts=attempts+1, error=NULL, hint=NULL, "
                         "stage=NULL, progress=NULL "
                         "WHERE id=? AND status='queued' AND cancel=0", (time.time(), job_id))
        return cur.rowcount == 1

    def set_pid(self, job_id: str, pid: int | None) -> None:
        self._exec("UPDATE jobs SET pid=? WHERE id=?", (pid, job_id))

    def set_progress(self, job_id: str, stage: str | None, progress: dict | None) -> None:
        self._exec("UPDATE jobs SET stage=?, progress=? WHERE id=?",
                   (stage, json.dumps(progress) if progress is not None else None, job_id))

    def finish(self, job_id: str, status: str, *, error: str | None = None, hint: str | None = None,
               result: dict | None = None, summary: dict | None = None) -> None:
        self._exec("UPDATE jobs SET status=?, finished=?, error=?, hint=?, result=?, summary=?, pid=NULL WHERE id=? "
                   "AND status NOT IN ('succeeded','failed','canceled')",
                   (status, time.time(), error, hint, json.dumps(result) if result is not None else None,
                    json.dumps(summary) if summary is not None else None, job_id))

    def requeue(self, job_id: str) -> None:
        self._exec("UPDATE jobs SET status='queued', pid=NULL WHERE id=?", (job_id,))

    def request_cancel(self, job_id: str) -> str:
        """Mark a job for cancel; a queued one is canceled at once. Returns its status after."""
        self._exec("UPDATE jobs SET cancel=1 WHERE id=?", (job_id,))
        self._exec("UPDATE jobs SET status='canceled', finished=? WHERE id=? AND status='queued'",
                   (time.time(), job_id))
        return self.get_job(job_id).status

    def delete_job(self, job_id: str) -> None:
        self._exec("DELETE FROM jobs WHERE id=?", (job_id,))

    # workers
    def heartbeat(self, worker_id: str, host: str, pid: int, slots: int, started: float) -> None:
        now = time.time()
        self._exec("INSERT INTO workers VALUES (?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET seen=excluded.seen",
                   (worker_id, host, pid, slots, started, now))
        self._exec("DELETE FROM workers WHERE seen < ?", (now - 24 * 3600,))  # long dead: forget

    def remove_worker(self, worker_id: str) -> None:
        self._exec("DELETE FROM workers WHERE id=?", (worker_id,))

    def alive_workers(self) -> list[dict]:
        rows = self._exec("SELECT * FROM workers WHERE seen >= ? ORDER BY started", (time.time() - ALIVE_S,))
        return [dict(r) for r in rows]

    # tokens
    def add_token(self, hash_: str, owner: str, name: str) -> None:
        self._exec("INSERT INTO tokens VALUES (?,?,?,?,0)", (hash_, owner, name, time.time()))

    def token_owner(self, hash_: str) -> str | None:
        row = self._exec("SELECT owner FROM tokens WHERE hash=? AND revoked=0", (hash_,)).fetchone()
        return row["owner"] if row else None

    def list_tokens(self) -> list[dict]:
        return [dict(r) for r in self._exec("SELECT hash, owner, name, created, revoked FROM tokens ORDER BY created")]

    def revoke_token(self, prefix: str) -> int:
        return self._exec("UPDATE tokens SET revoked=1 WHERE hash LIKE ? OR name=?", (prefix + "%", prefix)).rowcount

    def any_tokens(self) -> bool:
        return self._exec("SELECT 1 FROM tokens WHERE revoked=0 LIMIT 1").fetchone() is not None

"""The job, file and token tables (SQLite). The job table is the source of truth for status."""

from __future__ import annotations

import json
import sqlite3
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
"""


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

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "options": self.options, "model": self.model_file,
                "data": self.data_file, "created": self.created, "started": self.started,
                "finished": self.finished, "error": self.error, "attempts": self.attempts, "result": self.result}


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "files").mkdir(exist_ok=True)
        (self.data_dir / "jobs").mkdir(exist_ok=True)
        self.path = self.data_dir / "service.db"
        with self._db() as db:
            db.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        db.row_factory = sqlite3.Row
        return db

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        db = self._db()
        try:
            return db.execute(sql, args)
        finally:
            pass

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
                   pid=d["pid"], cancel=bool(d["cancel"]), result=json.loads(d["result"]) if d["result"] else None)

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

    def claim(self, job_id: str) -> bool:
        """queued -> running, once: a duplicate delivery of the same job finds it claimed."""
        cur = self._exec("UPDATE jobs SET status='running', started=?, attempts=attempts+1, error=NULL "
                         "WHERE id=? AND status='queued' AND cancel=0", (time.time(), job_id))
        return cur.rowcount == 1

    def set_pid(self, job_id: str, pid: int | None) -> None:
        self._exec("UPDATE jobs SET pid=? WHERE id=?", (pid, job_id))

    def finish(self, job_id: str, status: str, *, error: str | None = None, result: dict | None = None) -> None:
        self._exec("UPDATE jobs SET status=?, finished=?, error=?, result=?, pid=NULL WHERE id=? AND status NOT IN "
                   "('succeeded','failed','canceled')",
                   (status, time.time(), error, json.dumps(result) if result is not None else None, job_id))

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

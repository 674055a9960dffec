"""Huey setup: SqliteHuey under the data dir by default, RedisHuey for ``--broker redis://...``.

The queue only delivers job ids; the job table says what each job is and where it stands.
"""

from __future__ import annotations

from pathlib import Path

from huey import RedisHuey, SqliteHuey
from huey.api import Huey


def make_huey(data_dir: Path, broker: str | None = None) -> Huey:
    if broker:
        if not broker.startswith(("redis://", "rediss://", "unix://")):
            from .errors import ServiceError

            raise ServiceError(f"--broker takes a redis:// URL, got {broker}")
        huey = RedisHuey("compressor", url=broker, results=False)
    else:
        huey = SqliteHuey("compressor", filename=str(Path(data_dir) / "queue.db"), results=False)
    settings = {"data_dir": str(data_dir)}

    @huey.task(name="run_job")
    def run_job(job_id: str) -> None:
        from .worker import run_job as run

        run(Path(settings["data_dir"]), job_id, huey.compressor_settings)

    huey.compressor_settings = {"job_timeout": 3600.0, "max_attempts": 2}
    huey.run_job = run_job
    return huey

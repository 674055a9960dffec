"""The compression service: an HTTP API (FastAPI) over a job table (SQLite) and a task queue (Huey).

``app`` routes, ``auth`` tokens, ``store`` the job/file/token tables, ``uploads`` streamed uploads and
safe zip extraction, ``queue`` Huey's setup, ``worker`` one job per subprocess, ``events`` the progress
sink, ``client`` the httpx client behind ``compressor submit``, ``web`` the pages for people (templates/,
static/) and ``views`` what they show of a job.
"""

"""The compression service: an HTTP API (FastAPI) over a job table (SQLite) and a task queue (Huey).

``app`` routes, ``models`` the JSON bodies, ``auth`` tokens, ``store`` the job/file/token/worker tables,
``uploads`` streamed uploads and safe zip extraction, ``queue`` Huey's setup, ``worker`` one job per
subprocess (cancel through the library's token) and the workers' heartbeat, ``events`` a job's typed
events read back and folded into its stage and progress, ``client`` the httpx client behind
``compressor submit``, ``web`` the pages for people (templates/, static/) and ``views`` what they show of a job.
"""

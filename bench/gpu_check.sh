#!/usr/bin/env bash
# The GPU path measured (see bench/gpu_check.py): under 8 minutes on one H200; on a machine without a
# usable GPU it checks the install and says plainly that it skipped the GPU parts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
exec timeout 480 "$PY" bench/gpu_check.py "${1:-runs/gpu_check}"

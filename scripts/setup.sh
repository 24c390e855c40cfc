#!/usr/bin/env bash
# Set up everything the project needs in ./.venv (idempotent). Torch is pinned to the CPU build
# that pip finds locally on these machines; a bare `torch` requirement would pull CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,eval]"

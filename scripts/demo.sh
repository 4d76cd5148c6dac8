#!/usr/bin/env bash
# Set up, then boot a guest configured entirely over QMP (see qmpvm/tools/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/qmpvm demo "$@"

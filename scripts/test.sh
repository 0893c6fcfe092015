#!/usr/bin/env bash
# Set up everything (apt and pip) and run the whole test suite: ruff, mypy, pytest. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check gateway ebpf hypervisor bench tests
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
# pytest exits 5 when it collected nothing: that is a failure here, and set -e keeps it one.
.venv/bin/python -m pytest "$@"

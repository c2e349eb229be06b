#!/usr/bin/env bash
# The test command: set up, start local services if needed, then lint, type-check, check the import
# contracts and run the test suite against the real PostgreSQL, Redis and Mosquitto.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
bash scripts/services.sh

echo "== ruff";          .venv/bin/ruff check .
echo "== ruff format";   .venv/bin/ruff format --check .
echo "== mypy";          .venv/bin/mypy
echo "== import-linter"; .venv/bin/lint-imports
echo "== pytest";        .venv/bin/pytest -q "$@"

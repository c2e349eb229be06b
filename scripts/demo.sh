#!/usr/bin/env bash
# The demo: set up, then run services, simulators and the server for examples/plant.yaml.
# Uses the local PostgreSQL/Redis/Mosquitto when they run, embedded ones otherwise. Ctrl-C stops all.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/scada demo "$@"

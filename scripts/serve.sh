#!/usr/bin/env bash
# Runs the daemon with working defaults (extra arguments go to `vncgate serve`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
exec cargo run --release -- serve "$@"

#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh --test

cargo fmt --all -- --check
cargo clippy --all-targets -q -- -D warnings

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test -q 2>&1 | tee "$log"
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "all test binaries: %d passed, %d failed\n", p, f }' "$log"

# The Debian package as an operator gets it: built, installed, run with its own config, removed.
bash scripts/package.sh --check

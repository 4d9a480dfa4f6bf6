#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh --test

cargo fmt --all -- --check
cargo clippy --all-targets -q -- -D warnings
cargo clippy --all-targets -q --features libvirt -- -D warnings

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# One test build, with the libvirt feature so its tests (tests/libvirt.rs) run too.
cargo test -q --features libvirt 2>&1 | tee "$log"
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "all test binaries: %d passed, %d failed\n", p, f }' "$log"

# The Python client, installed as platform code installs it, against the daemon just built;
# its code must parse as Python 3.9 (the oldest it supports; the tests run on this machine's).
python3 -c 'import ast, sys; [ast.parse(open(f).read(), f, feature_version=(3, 9)) for f in sys.argv[1:]]' \
  clients/python/vncgate_client/*.py
.venv/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps ./clients/python
(cd clients/python && ../../.venv/bin/pytest -q -p no:cacheprovider tests)

# The Debian package as an operator gets it: built, installed, run with its own config, removed.
bash scripts/package.sh --check

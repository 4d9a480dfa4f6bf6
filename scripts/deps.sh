#!/usr/bin/env bash
# Installs what building and testing vncgate needs beyond Rust: the console page's npm packages
# (always) and, with --test, the Debian packages and the browser driver the tests use.
# Idempotent: installs only what is missing or out of date.
set -euo pipefail
cd "$(dirname "$0")/.."

npm_ci() { # DIR: npm ci when node_modules is missing or older than the lock file
  if [ ! -f "$1/node_modules/.package-lock.json" ] || [ "$1/package-lock.json" -nt "$1/node_modules/.package-lock.json" ]; then
    npm ci --prefix "$1" --no-audit --no-fund
  fi
}

npm_ci static

if [ "${1:-}" = "--test" ]; then
  # Real VNC servers (Xvnc, QEMU with SeaBIOS), X clients, the browser, Debian's noVNC app,
  # Prometheus (and promtool) for the metrics test.
  packages=(tigervnc-standalone-server tigervnc-tools xterm x11-xserver-utils xclip
            qemu-system-x86 chromium novnc prometheus)
  missing=()
  for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
  fi
  npm_ci tests/e2e
  # PyPI tools of the OpenAPI test (schemathesis, openapi-spec-validator), pinned, in a
  # virtualenv of the project's own (.venv, not committed).
  if [ ! -x .venv/bin/st ] || [ ! -x .venv/bin/openapi-spec-validator ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check schemathesis==4.32.5 openapi-spec-validator==0.9.0
  fi
fi

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
  # Prometheus (and promtool) for the metrics test, nginx for the reverse-proxy test.
  packages=(tigervnc-standalone-server tigervnc-tools xterm x11-xserver-utils xclip
            qemu-system-x86 chromium novnc prometheus nginx
            libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config tini)
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
  # libvirtd in a container (tests/libvirt.rs starts its own on a private socket): QEMU runs as
  # libvirt-qemu, logs to /var/log/libvirt, and gets no cgroups, security driver or virtlogd.
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  getent group libvirt-qemu >/dev/null || $sudo groupadd --system libvirt-qemu
  getent passwd libvirt-qemu >/dev/null ||
    $sudo useradd --system -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
  $sudo install -d /var/log/libvirt/qemu
  if ! grep -q '^# vncgate tests' /etc/libvirt/qemu.conf 2>/dev/null; then
    printf '%s\n' '# vncgate tests (containers): no virtlogd, no security driver, no cgroups' \
      'stdio_handler = "file"' 'security_driver = "none"' 'cgroup_controllers = [ ]' |
      $sudo tee -a /etc/libvirt/qemu.conf >/dev/null
  fi
  # PyPI tools of the OpenAPI test (schemathesis, openapi-spec-validator) and of the Python
  # client's tests (pytest), pinned, in a virtualenv of the project's own (.venv, not committed).
  if [ ! -x .venv/bin/st ] || [ ! -x .venv/bin/openapi-spec-validator ] || [ ! -x .venv/bin/pytest ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check \
      schemathesis==4.32.5 openapi-spec-validator==0.9.0 pytest==9.2.0
  fi
fi

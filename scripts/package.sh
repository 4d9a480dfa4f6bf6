#!/usr/bin/env bash
# Builds the Debian package (target/debian/vncgate_*.deb) with `cargo deb`, and with --check
# installs it on this machine and tries it as an operator would: `vncgate --version`, the man
# pages and completions, `systemd-analyze verify` of the unit, `vncgate serve --config
# /etc/vncgate/vncgate.toml` answering with the packaged API token, then `dpkg -r`.
# Needs root for --check (dpkg). cargo-deb is installed once into ~/.cargo/bin.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked

cargo build --release --locked
out=target/packaging
mkdir -p "$out"
bin=target/release/vncgate
"$bin" man | gzip -9n > "$out/vncgate.1.gz"
"$bin" man serve | gzip -9n > "$out/vncgate-serve.1.gz"
"$bin" completions bash > "$out/vncgate.bash"
"$bin" completions zsh > "$out/_vncgate"
"$bin" completions fish > "$out/vncgate.fish"
deb=$(cargo deb --no-build --no-strip --locked | tail -n 1)
echo "built $deb"

[ "${1:-}" = "--check" ] || exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
if dpkg -s vncgate >/dev/null 2>&1; then
  echo "vncgate is installed on this machine: --check would replace and then remove it." >&2
  echo "Run the check on a build machine or in a container." >&2
  exit 1
fi
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  $sudo dpkg -r vncgate >/dev/null 2>&1 || true
}
trap cleanup EXIT

$sudo dpkg -i "$deb"
/usr/bin/vncgate --version
unit=$(dpkg -L vncgate | grep '/systemd/system/vncgate.service$')
test -s /usr/share/man/man1/vncgate-serve.1.gz
test -s /usr/share/bash-completion/completions/vncgate
test "$(stat -c %a /etc/vncgate/api-token)" = 600
if command -v systemd-analyze >/dev/null; then
  systemd-analyze verify "$unit"
  echo "systemd-analyze verify: ok"
fi

# Where systemd runs, postinst leaves the state directory to StateDirectory=; this check runs
# the binary by hand, so make it.
$sudo install -d -m 0750 /var/lib/vncgate
# The packaged config as installed; only the addresses move to free loopback ports (env beats
# the file) so a daemon already on 6080 is not disturbed.
api_port=$((20000 + RANDOM % 5000))
log=$(mktemp)
(cd /var/lib/vncgate &&
  exec $sudo env VNCGATE_API_LISTEN="127.0.0.1:$api_port" \
    VNCGATE_PORT_RANGE="$((api_port + 1))-$((api_port + 20))" VNCGATE_LISTEN_HOST=127.0.0.1 \
    VNCGATE_API_TOKEN_FILE=/etc/vncgate/api-token \
    /usr/bin/vncgate serve --config /etc/vncgate/vncgate.toml) 2>"$log" &
pid=$!
token=$($sudo head -n 1 /etc/vncgate/api-token)
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$api_port/healthz" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "vncgate serve exited" >&2; exit 1; }
  sleep 0.1
done
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$api_port/v1/status")
[ "$code" = 401 ] || { echo "status without the token: $code, want 401" >&2; exit 1; }
curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$api_port/v1/status" >/dev/null
$sudo env VNCGATE_API="http://127.0.0.1:$api_port" \
  /usr/bin/vncgate --api-token-file /etc/vncgate/api-token open vm-pkg 127.0.0.1:5999
$sudo test -s /var/lib/vncgate/vncgate-state.json
kill "$pid"
wait "$pid" || true
pid=""
echo "vncgate serve --config /etc/vncgate/vncgate.toml: ok"

$sudo dpkg -r vncgate
test ! -e /usr/bin/vncgate
test -e /etc/vncgate/api-token # conffiles and the token stay until --purge
$sudo dpkg --purge vncgate
test ! -e /etc/vncgate/api-token
echo "package check: ok"

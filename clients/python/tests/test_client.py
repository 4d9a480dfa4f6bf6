"""vncgate_client against a real vncgate daemon: every call, every error class from the API
code the daemon really answers, API auth, and TLS with a private CA."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from vncgate_client import (
    AccessRefusedError,
    AuthenticationError,
    DaemonUnreachableError,
    InvalidRequestError,
    Session,
    SessionNotFoundError,
    VncGate,
    VncGateError,
    VncPortAllocationError,
    VncPortPoolExhaustedException,
    VncSessionCoordinationError,
    WebsockifyProcessError,
    error_for,
)

TARGET = "127.0.0.1:5999"  # loopback; nothing is dialled without a viewer


def test_open_get_list_rotate_close(daemon_factory):
    d = daemon_factory()
    gate = VncGate(d.api)
    s = gate.open_session("vm-1", TARGET, idle_timeout="15m", max_lifetime=3600)
    assert isinstance(s, Session)
    assert isinstance(s.ws_port, int) and s.ws_port == d.block.first
    assert s.url.endswith(f"#token={s.token}") and s.ws_url.endswith(f"token={s.token}")
    assert (s.idle_timeout, s.max_lifetime) == ("15m", "1h")
    assert s.closes_at is not None and s.viewers == []
    assert gate.open_session("vm-1", TARGET).token == s.token, "an open of an open VM returns it"
    moved = gate.open_session("vm-1", "[::1]:5999")
    assert (moved.target, moved.ws_port, moved.token) == ("[::1]:5999", s.ws_port, s.token)
    assert gate.get_session("vm-1").target == "[::1]:5999"
    gate.open_session("vm-0", "unix:/tmp/vm-0.sock")
    assert [x.vm_id for x in gate.list_sessions()] == ["vm-0", "vm-1"]
    rotated = gate.rotate_token("vm-1", disconnect=True)
    assert rotated.token != s.token and rotated.ws_port == s.ws_port
    status = gate.status()
    assert status["active_sessions"] == 2 and status["system_health"] == "healthy"
    report = gate.cleanup()
    assert report["checked"] == 2 and report["closed"] == []
    with pytest.raises(SessionNotFoundError):
        gate.kick_viewer("vm-1", 99)
    assert gate.close_session("vm-1") is True
    # Already gone (cleanup, a max_lifetime or libvirt may close sessions too): done.
    assert gate.close_session("vm-1") is False
    with pytest.raises(SessionNotFoundError) as err:
        gate.close_session("vm-1", missing_ok=False)
    assert err.value.code == "not_found" and err.value.status == 404
    with pytest.raises(SessionNotFoundError):
        gate.get_session("vm-1")


def test_bad_input_is_invalid_request_naming_the_cause(daemon_factory):
    gate = VncGate(daemon_factory().api)
    for call in (
        lambda: gate.open_session("bad id", TARGET),
        lambda: gate.open_session("vm-1", "no-port"),
        lambda: gate.open_session("vm-1", TARGET, idle_timeout="soon"),
    ):
        with pytest.raises(InvalidRequestError) as err:
            call()
        assert err.value.status == 400 and err.value.code == "invalid_request"
    assert "idle_timeout" in err.value.message


def test_pool_exhausted(daemon_factory):
    gate = VncGate(daemon_factory(ports=1).api)
    gate.open_session("vm-a", TARGET)
    with pytest.raises(VncPortPoolExhaustedException) as err:
        gate.open_session("vm-b", TARGET)
    assert err.value.status == 503 and isinstance(err.value, VncGateError)


def _as_nobody() -> None:
    os.setgid(65534)
    os.setuid(65534)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the daemon as nobody")
def test_a_port_that_cannot_be_bound_is_an_allocation_error(daemon_factory):
    # An unprivileged daemon asked for a pool below 1024: bind fails with EACCES, not
    # EADDRINUSE, which the API reports as allocation_failed.
    unprivileged = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if unprivileged <= 1000:
        pytest.skip("this machine lets anyone bind low ports (ip_unprivileged_port_start)")
    d = daemon_factory(ports=2, first_port=1000, preexec=_as_nobody)
    with pytest.raises(VncPortAllocationError) as err:
        VncGate(d.api).open_session("vm-1", TARGET)
    assert err.value.status == 500 and "1000" in err.value.message


def test_a_state_write_that_fails_is_a_coordination_error(daemon_factory):
    d = daemon_factory()
    gate = VncGate(d.api)
    gate.open_session("vm-kept", TARGET)
    shutil.rmtree(d.state_file.parent)  # every write now fails
    with pytest.raises(VncSessionCoordinationError) as err:
        gate.open_session("vm-new", TARGET)
    assert err.value.status == 500
    with pytest.raises(VncSessionCoordinationError):
        gate.close_session("vm-kept")
    assert [s.vm_id for s in gate.list_sessions()] == ["vm-kept"], "rolled back"


def test_proxy_failed_maps_to_websockify_process_error():
    # The daemon answers proxy_failed when a port it bound cannot be served (its listener
    # cannot be registered with the runtime), which no test can provoke from outside; the
    # mapping itself:
    err = error_for(500, b'{"error": {"code": "proxy_failed", "message": "cannot serve"}}')
    assert isinstance(err, WebsockifyProcessError) and err.message == "cannot serve"
    odd = error_for(502, b"<html>bad gateway</html>")
    assert type(odd) is VncGateError and odd.status == 502


def _loopback_name() -> str:
    """A host name of this machine that resolves to loopback but is not ``localhost``."""
    for name in ("localhost.localdomain", socket.gethostname(), "ip6-localhost"):
        try:
            if socket.gethostbyname(name).startswith("127."):
                return name
        except OSError:
            continue
    pytest.fail("no host name of this machine resolves to 127.0.0.0/8 besides localhost")


def test_a_host_name_the_daemon_does_not_answer_to(daemon_factory):
    # DNS rebinding guard: a Host that is no IP, localhost, --public-host or --api-hosts.
    d = daemon_factory()
    with pytest.raises(AccessRefusedError) as err:
        VncGate(f"http://{_loopback_name()}:{d.api_port}").list_sessions()
    assert err.value.status == 403 and err.value.code == "host_refused"


def test_api_token(daemon_factory, tmp_path, monkeypatch):
    token_file = tmp_path / "api-token"
    token_file.write_text("py-client-token-0123456789abcdef\n")
    d = daemon_factory(extra=["--api-token-file", str(token_file)])
    with pytest.raises(AuthenticationError) as err:
        VncGate(d.api).list_sessions()
    assert err.value.status == 401
    with pytest.raises(AuthenticationError):
        VncGate(d.api, token="wrong").list_sessions()
    gate = VncGate(d.api, token="py-client-token-0123456789abcdef")
    assert gate.open_session("vm-1", TARGET).vm_id == "vm-1"
    monkeypatch.setenv("VNCGATE_API", d.api)
    monkeypatch.setenv("VNCGATE_API_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("VNCGATE_API_TOKEN", "ignored: the file comes first, as for the CLI")
    assert [s.vm_id for s in VncGate.from_env().list_sessions()] == ["vm-1"]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def test_tls_api_with_a_private_ca(daemon_factory, tmp_path):
    ca_key, ca, key, csr, cert = (tmp_path / n for n in ("ca.key", "ca.pem", "key.pem", "req.csr", "cert.pem"))
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=vncgate test CA")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext = tmp_path / "ext.cnf"
    ext.write_text("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    d = daemon_factory(extra=["--api-cert", str(cert), "--api-key", str(key)])
    api = f"https://127.0.0.1:{d.api_port}"
    gate = VncGate(api, ca_file=str(ca))
    assert gate.open_session("vm-tls", TARGET).vm_id == "vm-tls"
    with pytest.raises(DaemonUnreachableError) as err:
        VncGate(api).list_sessions()  # the private CA is not in the system's store
    assert "CERTIFICATE_VERIFY_FAILED" in err.value.message or "certificate" in err.value.message


def test_a_daemon_that_is_not_there(daemon_factory):
    d = daemon_factory()
    d.stop()
    with pytest.raises(DaemonUnreachableError):
        VncGate(d.api, timeout=2).status()

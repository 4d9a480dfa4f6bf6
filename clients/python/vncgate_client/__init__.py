"""Client of the vncgate control API for platform code (DESIGN.md "Platform integration").

Standard library only. The exception names are those of the console manager vncgate replaces,
so ``except VncPortPoolExhaustedException:`` clauses keep working::

    from vncgate_client import VncGate, VncPortPoolExhaustedException

    gate = VncGate("http://127.0.0.1:6080", token=open("/etc/vncgate/api-token").read().strip())
    session = gate.open_session("vm-42", "unix:/var/lib/libvirt/qemu/vm-42.vnc")
    print(session.url)
    gate.close_session("vm-42")
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type, Union

__all__ = [
    "VncGate",
    "Session",
    "Viewer",
    "VncGateError",
    "InvalidRequestError",
    "AuthenticationError",
    "AccessRefusedError",
    "SessionNotFoundError",
    "VncPortPoolExhaustedException",
    "VncPortAllocationError",
    "WebsockifyProcessError",
    "VncSessionCoordinationError",
    "DaemonUnreachableError",
]

__version__ = "0.1.0"

Duration = Union[str, int, float]


class VncGateError(Exception):
    """Any failure of a call. ``code`` is the API's error code (``pool_exhausted``, ...),
    ``status`` the HTTP status (0 when the daemon was not reached), ``message`` its sentence."""

    def __init__(self, message: str, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class InvalidRequestError(VncGateError):
    """400 ``invalid_request``: a bad vm_id, target, limit or body; the message names it."""


class AuthenticationError(VncGateError):
    """401 ``unauthorized``: no token, or not the daemon's ``--api-token-file`` token."""


class AccessRefusedError(VncGateError):
    """403 ``origin_refused``/``host_refused``: the request's Origin or Host is not allowed."""


class SessionNotFoundError(VncGateError):
    """404 ``not_found``: no session for that vm_id (or no such viewer)."""


class VncPortPoolExhaustedException(VncGateError):
    """503 ``pool_exhausted``: ``--max-sessions`` reached, or no port of the range is free."""


class VncPortAllocationError(VncGateError):
    """500 ``allocation_failed``: binding a port failed for another reason (EACCES, EMFILE)."""


class WebsockifyProcessError(VncGateError):
    """500 ``proxy_failed``: the session's server could not be started; the open was undone."""


class VncSessionCoordinationError(VncGateError):
    """500 ``coordination_failed``: the daemon could not write its state file; the change was
    rolled back."""


class DaemonUnreachableError(VncGateError):
    """The daemon did not answer: not running, wrong ``api`` address, or a TLS failure."""


_BY_CODE: Dict[str, Type[VncGateError]] = {
    "invalid_request": InvalidRequestError,
    "unauthorized": AuthenticationError,
    "origin_refused": AccessRefusedError,
    "host_refused": AccessRefusedError,
    "forbidden": AccessRefusedError,
    "not_found": SessionNotFoundError,
    "pool_exhausted": VncPortPoolExhaustedException,
    "allocation_failed": VncPortAllocationError,
    "proxy_failed": WebsockifyProcessError,
    "coordination_failed": VncSessionCoordinationError,
}


def error_for(status: int, body: bytes) -> VncGateError:
    """The exception for an error answer ``{"error": {"code", "message"}}``; an unknown code
    (or a body that is not that) is a plain :class:`VncGateError`."""
    try:
        detail = json.loads(body.decode("utf-8"))["error"]
        code, message = str(detail["code"]), str(detail["message"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        code, message = "", body.decode("utf-8", "replace")[:500] or f"HTTP {status}"
    return _BY_CODE.get(code, VncGateError)(message, code=code, status=status)


@dataclass(frozen=True)
class Viewer:
    """One live viewer of a session."""

    id: int
    peer: str
    started_at: str
    bytes_to_client: int = 0
    bytes_to_server: int = 0

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "Viewer":
        return cls(
            id=int(doc["id"]),
            peer=str(doc["peer"]),
            started_at=str(doc["started_at"]),
            bytes_to_client=int(doc.get("bytes_to_client", 0)),
            bytes_to_server=int(doc.get("bytes_to_server", 0)),
        )


@dataclass(frozen=True)
class Session:
    """A console session (the API's Session object). ``url`` is the console page with the
    token; ``ws_port`` is None when the daemon serves sessions on its public port only."""

    vm_id: str
    target: str
    ws_port: Optional[int]
    url: str
    ws_url: str
    token: str
    created_at: str
    token_expires_at: Optional[str] = None
    idle_timeout: Optional[str] = None
    max_lifetime: Optional[str] = None
    closes_at: Optional[str] = None
    connections: int = 0
    bytes_to_client: int = 0
    bytes_to_server: int = 0
    viewers: List[Viewer] = field(default_factory=list)
    public_url: Optional[str] = None
    public_ws_url: Optional[str] = None

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "Session":
        """Reads a Session; fields a newer daemon adds are ignored."""
        port = doc.get("ws_port")
        return cls(
            vm_id=str(doc["vm_id"]),
            target=str(doc["target"]),
            ws_port=None if port is None else int(port),
            url=str(doc["url"]),
            ws_url=str(doc["ws_url"]),
            token=str(doc["token"]),
            created_at=str(doc["created_at"]),
            token_expires_at=doc.get("token_expires_at"),
            idle_timeout=doc.get("idle_timeout"),
            max_lifetime=doc.get("max_lifetime"),
            closes_at=doc.get("closes_at"),
            connections=int(doc.get("connections", 0)),
            bytes_to_client=int(doc.get("bytes_to_client", 0)),
            bytes_to_server=int(doc.get("bytes_to_server", 0)),
            viewers=[Viewer.from_json(v) for v in doc.get("viewers", [])],
            public_url=doc.get("public_url"),
            public_ws_url=doc.get("public_ws_url"),
        )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The API never redirects: a 3xx is answered as an error, not followed."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


def _segment(text: str) -> str:
    return urllib.parse.quote(text, safe="")


class VncGate:
    """The control API of one vncgate daemon.

    :param api: the API's base URL, ``http://127.0.0.1:6080`` by default (``https://`` when the
        daemon has ``--api-cert``).
    :param token: the bearer token (the first line of the daemon's ``--api-token-file``).
    :param ca_file: a PEM file of the CA that signed the API's certificate (a private CA);
        the system's trust store otherwise.
    :param timeout: seconds to wait for each answer.
    """

    def __init__(
        self,
        api: str = "http://127.0.0.1:6080",
        token: Optional[str] = None,
        *,
        ca_file: Optional[str] = None,
        timeout: float = 30.0,
    ) -> None:
        self.api = api.rstrip("/")
        self.token = token
        self.timeout = timeout
        handlers: List[urllib.request.BaseHandler] = [
            # The API is reached directly: an http_proxy of the environment must not see the
            # bearer token, and a redirect must not carry it elsewhere.
            urllib.request.ProxyHandler({}),
            _NoRedirect(),
        ]
        if self.api.startswith("https://"):
            handlers.append(
                urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_file))
            )
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def from_env(cls) -> "VncGate":
        """A client configured as the ``vncgate`` CLI is: ``VNCGATE_API``,
        ``VNCGATE_API_TOKEN`` or ``VNCGATE_API_TOKEN_FILE``, ``VNCGATE_API_CA``."""
        token = None
        token_file = os.environ.get("VNCGATE_API_TOKEN_FILE")
        if token_file:  # the file first, as the CLI reads them
            with open(token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        else:
            token = os.environ.get("VNCGATE_API_TOKEN")
        return cls(
            os.environ.get("VNCGATE_API", "http://127.0.0.1:6080"),
            token,
            ca_file=os.environ.get("VNCGATE_API_CA"),
        )

    def _call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.api + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            raise error_for(err.code, err.read()) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            raise DaemonUnreachableError(
                f"vncgate at {self.api} did not answer: {reason}"
            ) from None
        if not raw:
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:
            raise VncGateError(f"vncgate answered {method} {path} with something not JSON") from None

    def open_session(
        self,
        vm_id: str,
        target: str,
        *,
        idle_timeout: Optional[Duration] = None,
        max_lifetime: Optional[Duration] = None,
    ) -> Session:
        """Opens the console session of ``vm_id`` relaying to ``target`` (``host:port``,
        ``[v6]:port`` or ``unix:/path``), or returns the one it has (retargeted, port and token
        kept, if ``target`` differs). ``idle_timeout``/``max_lifetime`` (``"15m"`` or seconds)
        apply to a session this call creates.

        :raises InvalidRequestError: a bad vm_id, target or limit.
        :raises VncPortPoolExhaustedException: no port left (cap or range).
        :raises VncPortAllocationError: a port could not be bound for another reason.
        :raises WebsockifyProcessError: the session's server could not be started.
        :raises VncSessionCoordinationError: the state file could not be written.
        :raises AuthenticationError, DaemonUnreachableError:
        """
        body: Dict[str, Any] = {"vm_id": vm_id, "target": target}
        if idle_timeout is not None:
            body["idle_timeout"] = idle_timeout
        if max_lifetime is not None:
            body["max_lifetime"] = max_lifetime
        return Session.from_json(self._call("POST", "/v1/sessions", body))

    def get_session(self, vm_id: str) -> Session:
        """The session of ``vm_id``.

        :raises SessionNotFoundError: it has none.
        """
        return Session.from_json(self._call("GET", f"/v1/sessions/{_segment(vm_id)}"))

    def list_sessions(self) -> List[Session]:
        """Every session, ordered by vm_id."""
        doc = self._call("GET", "/v1/sessions")
        return [Session.from_json(s) for s in doc["sessions"]]

    def close_session(self, vm_id: str, *, missing_ok: bool = True) -> bool:
        """Closes the session of ``vm_id`` (its viewers get 1001 ``session closed``; its port is
        free when this returns). Returns True if this call closed it, False if it was already
        gone: the cleanup pass, a ``max_lifetime`` or libvirt may have closed it first.

        :raises SessionNotFoundError: it was already gone and ``missing_ok`` is False.
        :raises VncSessionCoordinationError: the state file could not be written; it stays open.
        """
        try:
            self._call("DELETE", f"/v1/sessions/{_segment(vm_id)}")
        except SessionNotFoundError:
            if missing_ok:
                return False
            raise
        return True

    def rotate_token(self, vm_id: str, *, disconnect: bool = False) -> Session:
        """Issues ``vm_id``'s session a new token; the old link stops working at once. With
        ``disconnect``, live viewers are closed with 1008 ``token revoked``.

        :raises SessionNotFoundError: no session for ``vm_id``.
        :raises VncSessionCoordinationError: the new token could not be written; the old stays.
        """
        path = f"/v1/sessions/{_segment(vm_id)}/token"
        return Session.from_json(self._call("POST", path, {"disconnect": disconnect}))

    def kick_viewer(self, vm_id: str, viewer_id: int) -> None:
        """Disconnects one viewer (1008 ``disconnected by operator``).

        :raises SessionNotFoundError: no such session or viewer.
        """
        self._call("DELETE", f"/v1/sessions/{_segment(vm_id)}/viewers/{int(viewer_id)}")

    def status(self) -> Dict[str, Any]:
        """The daemon's status: ``port_pool``, ``max_sessions``, ``active_sessions``,
        ``system_health`` and its ``warnings``, ``last_cleanup``, ..."""
        result: Dict[str, Any] = self._call("GET", "/v1/status")
        return result

    def cleanup(self) -> Dict[str, Any]:
        """Runs a cleanup pass now (or waits for the running one): ``{"checked": n, "closed":
        [{"vm_id", "target", "reason", "failing_since"}], "duration_ms", "finished_at"}``."""
        result: Dict[str, Any] = self._call("POST", "/v1/cleanup")
        return result

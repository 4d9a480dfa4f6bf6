"""A real vncgate daemon per test, on loopback ports of a block no other test holds (the same
lock files as the Rust tests: /tmp/vncgate-test-ports/block-N.lock), stopped by PID."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[3]
BINARY = Path(os.environ.get("VNCGATE_BIN", ROOT / "target" / "debug" / "vncgate"))


class PortBlock:
    """1000 ports below the ephemeral range, held through a lock file."""

    def __init__(self) -> None:
        lock_dir = Path(tempfile.gettempdir()) / "vncgate-test-ports"
        lock_dir.mkdir(exist_ok=True)
        for i in range(22):
            first = 10_000 + i * 1000
            f = open(lock_dir / f"block-{first}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            self.first, self._lock = first, f
            return
        raise RuntimeError("no free test port block (22 in use)")

    @property
    def spare(self) -> int:
        return self.first + 999

    def release(self) -> None:
        self._lock.close()


class Daemon:
    """``vncgate serve`` on 127.0.0.1: API on the block's last port, pool from its first."""

    def __init__(
        self,
        ports: int = 8,
        extra: Optional[List[str]] = None,
        preexec: Optional[Callable[[], None]] = None,
        first_port: Optional[int] = None,
    ) -> None:
        if not BINARY.exists():
            raise RuntimeError(f"{BINARY} is missing: run `cargo build` first (scripts/test.sh does)")
        self.block = PortBlock()
        self.dir = Path(tempfile.mkdtemp(prefix="vncgate-py-"))
        os.chmod(self.dir, 0o777)
        self.state_file = self.dir / "state" / "vncgate-state.json"
        self.state_file.parent.mkdir()
        os.chmod(self.state_file.parent, 0o777)
        first = self.block.first if first_port is None else first_port
        self.api_port = self.block.spare
        self.api = f"http://127.0.0.1:{self.api_port}"
        args = [
            str(BINARY), "serve",
            "--api-listen", f"127.0.0.1:{self.api_port}",
            "--listen-host", "127.0.0.1",
            "--port-range", f"{first}-{first + ports - 1}",
            "--state-file", str(self.state_file),
            "--cleanup-interval", "off",
        ] + (extra or [])
        self.log = open(self.dir / "daemon.log", "wb")
        env = dict(os.environ, RUST_LOG="warn")
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            env=env, preexec_fn=preexec, cwd=self.dir,
        )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()  # no daemon or port block left behind by a failed start
            raise

    def _wait_healthy(self) -> None:
        # The daemon binds its API last, after every session: a connect means it is ready.
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vncgate exited: {(self.dir / 'daemon.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.api_port), timeout=1).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vncgate did not listen on its API port within 15 s")
            time.sleep(0.02)  # polling the API port until the daemon is up

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if not self.log.closed:
            self.log.close()
        self.block.release()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    started: List[Daemon] = []

    def start(**kwargs) -> Daemon:
        d = Daemon(**kwargs)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()

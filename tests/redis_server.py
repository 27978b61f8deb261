"""A throwaway ``redis-server`` on a free loopback port, which tests may stop and restart."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """Runs ``redis-server`` from PATH; ``stop()``/``start()`` keep the same port."""

    def __init__(self, *, appendonly: bool = False, extra: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server not found on PATH and REDIS_URL is not set: the test suite "
                "needs a real Redis (install the 'redis-server' package or set REDIS_URL)"
            )
        self.binary = binary
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="capproxy-redis-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._appendonly = appendonly
        self._extra = extra

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self._proc is not None:
            return
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self._appendonly else "no",
                "--appendfsync",
                "always",
                # Fault tests stall the server with DEBUG SLEEP (it listens on loopback only).
                "--enable-debug-command",
                "yes",
                "--dir",
                self._dir.name,
                "--logfile",
                str(Path(self._dir.name) / "redis.log"),
                *self._extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

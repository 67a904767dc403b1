"""A private redis-server for tests that stop and restart Redis (never the shared one)."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range (32768 and up by default).

    Asking the kernel for port 0 returns an ephemeral port, which an outgoing
    connection (the gateway's own to Redis, say) can take before the server
    that was meant to get it binds: seen as "address already in use" at the
    gateway's HTTP bind. Ports 10000-19999 are never handed out that way.
    (RTP ranges in the tests start at 20000.)
    """
    while True:
        port = random.randrange(10_000, 20_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (run deploy/setup.sh)")
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

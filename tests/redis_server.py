"""A private redis-server for tests that stop and restart Redis (never the shared one)."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import threading
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


_MEDIA_BLOCKS = range(30_000, 32_768 - 4, 4)
_media_next = random.randrange(len(_MEDIA_BLOCKS))
_media_lock = threading.Lock()


def free_media_ports() -> int:
    """The first of four consecutive free UDP ports, for a SIP peer's own media.

    sipp's ``-mp P`` binds P and P+1 for audio and P+2 and P+3 for video: a
    single free port from the kernel leaves the other three to chance (seen as
    "Unable to bind video RTP socket ... Address already in use" with several
    sipps at once). Blocks come in turn from 30000-32767, above the tests' RTP
    ranges and below the ephemeral range, so two peers of one process never
    get the same block.
    """
    global _media_next
    for _ in range(len(_MEDIA_BLOCKS)):
        with _media_lock:
            base = _MEDIA_BLOCKS[_media_next % len(_MEDIA_BLOCKS)]
            _media_next += 1
        sockets = []
        try:
            for port in range(base, base + 4):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise RuntimeError("no four consecutive free UDP ports in 30000-32767")


class RedisServer:
    def __init__(self, port: int | None = None, *, data_dir: str | None = None) -> None:
        """``data_dir``: keep the data there (AOF, fsync always), so a stop and start keeps it."""
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (run deploy/setup.sh)")
        self.port = port or free_port()
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        persist = (["--appendonly", "yes", "--appendfsync", "always", "--dir", self.data_dir]
                   if self.data_dir else ["--appendonly", "no"])
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persist],
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

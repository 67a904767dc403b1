"""Runs `earshot run` as a real process and places calls at it with real SIP clients."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from gateway.events import parse_fields
from tests.fixtures_data import read_pcm16
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("EARSHOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_udp_tcp_port() -> int:
    import socket

    while True:
        port = free_port()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[str]
    sip_port: int
    http_port: int
    prefix: str
    output: list[str] = field(default_factory=list)

    @property
    def events_stream(self) -> str:
        return f"{self.prefix}:events"

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return "".join(self.output[-200:])


def start_gateway(extra_env: dict[str, str] | None = None, ready_timeout: float = 120) -> GatewayProcess:
    sip_port = free_udp_tcp_port()
    http_port = free_port()
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    rtp_min = 20000 + (os.getpid() % 200) * 100
    env = dict(os.environ)
    env.update({
        "EARSHOT_SIP_HOST": "127.0.0.1",
        "EARSHOT_SIP_PORT": str(sip_port),
        "EARSHOT_HTTP_PORT": str(http_port),
        "EARSHOT_RTP_HOST": "127.0.0.1",
        "EARSHOT_RTP_PORT_MIN": str(rtp_min),
        "EARSHOT_RTP_PORT_MAX": str(rtp_min + 98),
        "EARSHOT_REDIS_URL": REDIS_URL,
        "EARSHOT_STREAM_PREFIX": prefix,
        # its own spool (written only while Redis is unreachable): never one another gateway replays
        "EARSHOT_PUBLISH_SPOOL_FILE": os.path.join(tempfile.gettempdir(), f"earshot-{prefix}.spool"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra_env or {})
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    gw = GatewayProcess(proc, sip_port, http_port, prefix)
    _wait_until_ready(proc, gw.output, "earshot: ready", ready_timeout, gw.stop, "gateway")
    return gw


@contextlib.contextmanager
def running_gateway(extra_env: dict[str, str] | None = None, *, check_exit: bool = True) -> Iterator[GatewayProcess]:
    """A gateway for the block; afterwards stopped (exit status 0 unless ``check_exit`` is off)
    and its Redis keys deleted."""
    gw = start_gateway(extra_env)
    try:
        yield gw
    finally:
        rc = gw.stop()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{gw.prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    if check_exit:
        assert rc == 0, gw.log()


def earshot_cli(*args: str, database_url: str, stdin: str = "") -> str:
    """Run an ``earshot`` command against ``database_url``; its stdout (it must succeed)."""
    command = ["earshot"] if shutil.which("earshot") else [sys.executable, "-m", "gateway"]
    done = subprocess.run([*command, *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "EARSHOT_DATABASE_URL": database_url})
    assert done.returncode == 0, done.stderr
    return done.stdout


def add_user(database_url: str, username: str, password: str, role: str = "admin") -> None:
    """A dashboard user (the first `users add` also creates a fresh store's schema)."""
    earshot_cli("users", "add", username, "--role", role, "--password-stdin", database_url=database_url,
                stdin=password + "\n")


def new_token(database_url: str, username: str, name: str) -> str:
    """An API token of ``username``, as `earshot users token` prints it (last line)."""
    return earshot_cli("users", "token", username, "--name", name, database_url=database_url).strip().splitlines()[-1]


def _wait_until_ready(proc: subprocess.Popen[str], output: list[str], ready_line: str, timeout: float,
                      stop: Callable[[float], int], what: str) -> None:
    """Collect the process's output in a thread; return once it prints ``ready_line``."""
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if ready_line in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(5)
            raise RuntimeError(f"{what} did not start:\n{''.join(output[-200:])}")


def pcm_wav(name: str, directory: Path) -> Path:
    """A 16-bit PCM copy of a G.711 fixture (what PJSIP's WAV player reads)."""
    pcm, rate = read_pcm16(name)
    out = directory / (Path(name).stem + ".pcm16.wav")
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out


CALLS_PER_PROCESS = 4  # the pjsua2 wheel's compile-time call limit


def place_calls(target: str, wavs: list[Path], calls: int, *, hold: float = 2.0, dtmf: str = "",
                transport: str = "udp", timeout: float = 180, delayed_offer: bool = False,
                hold_at: float = 0.0, caller_args: tuple[str, ...] = ()) -> list[dict]:
    """Call i plays wavs[i % len(wavs)]; calls are spread over PJSIP processes of 4 calls.
    ``caller_args``: more pjsua_caller.py options (e.g. --tls-ca, --srtp)."""
    procs = []
    for first in range(0, calls, CALLS_PER_PROCESS):
        count = min(CALLS_PER_PROCESS, calls - first)
        cmd = [sys.executable, str(ROOT / "tests/e2e/pjsua_caller.py"), "--target", target, "--calls", str(count),
               "--hold", str(hold), "--transport", transport, "--timeout", str(timeout)]
        for i in range(first, first + count):
            cmd += ["--wav", str(wavs[i % len(wavs)])]
        if dtmf:
            cmd += ["--dtmf", dtmf]
        if delayed_offer:
            cmd.append("--delayed-offer")
        if hold_at:
            cmd += ["--hold-at", str(hold_at)]
        cmd += caller_args
        procs.append((first, count, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                     text=True)))
    results: list[dict] = []
    for first, count, proc in procs:
        out, err = proc.communicate(timeout=timeout + 30)
        mine = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if len(mine) != count:
            raise RuntimeError(f"pjsua caller failed (rc={proc.returncode}):\n{out}\n{err[-3000:]}")
        for result in mine:
            result["index"] += first
        results += mine
    return sorted(results, key=lambda r: r["index"])


def read_events(stream: str) -> list[dict]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return [parse_fields(fields) for _id, fields in client.xrange(stream)]
    finally:
        client.close()


def wait_for_calls_ended(stream: str, sip_call_ids: set[str], timeout: float) -> list[dict]:
    """All events of the stream once every given call has published call.ended."""
    deadline = time.monotonic() + timeout
    while True:
        events = read_events(stream)
        ended = {e["sip_call_id"] for e in events if e["type"] == "call.ended"}
        if sip_call_ids <= ended or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def by_call(events: list[dict]) -> dict[str, list[dict]]:
    calls: dict[str, list[dict]] = {}
    for event in events:
        calls.setdefault(event["sip_call_id"], []).append(event)
    return calls


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[str]
    worker_id: str
    http_port: int
    output: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the worker dies holding whatever jobs it has."""
        self.proc.kill()
        self.proc.wait()

    def metrics(self) -> dict[str, float]:
        """The worker's /metrics as {name{labels}: value}."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return parse_metrics(text)

    def log(self) -> str:
        return "".join(self.output[-200:])


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def start_worker(prefix: str, extra_env: dict[str, str] | None = None, ready_timeout: float = 120) -> WorkerProcess:
    """`earshot worker` on the gateway's stream prefix, with its own id and HTTP port."""
    http_port = free_port()
    worker_id = f"w-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    env.update({
        "EARSHOT_REDIS_URL": REDIS_URL,
        "EARSHOT_STREAM_PREFIX": prefix,
        "EARSHOT_WORKER_ID": worker_id,
        "EARSHOT_WORKER_HTTP_PORT": str(http_port),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra_env or {})
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "worker"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    worker = WorkerProcess(proc, worker_id, http_port)
    _wait_until_ready(proc, worker.output, "earshot worker: ready", ready_timeout, worker.stop, "worker")
    return worker

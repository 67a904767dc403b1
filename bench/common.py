"""Shared pieces of the benchmarks: the machine, the gateway process, callers, RESULTS.md.

The benchmarks drive the real gateway (``python -m gateway run``) over loopback.
SIP signalling comes from sipp (an independent implementation); the media of the
accuracy and latency benchmarks comes from :class:`RtpSender`, a small paced RTP
sender in this process, because only a sender we own can say *when* each 20 ms
frame left the caller (sipp's ``rtp_stream`` logs nothing per packet).
"""

from __future__ import annotations

import datetime as _dt
import heapq
import os
import platform
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from gateway.events import parse_fields  # noqa: E402
from tests.e2e.harness import REDIS_URL, GatewayProcess, start_gateway  # noqa: E402
from tests.redis_server import free_media_ports  # noqa: E402
from tests.fixtures_data import FixtureEntry, read_g711  # noqa: E402

BENCH = ROOT / "bench"
RESULTS = BENCH / "RESULTS.md"
SIGNALLING_SCENARIO = BENCH / "uac_signalling.xml"
PACKET_MS = 20
PACKET_BYTES = 160  # 20 ms of 8 kHz G.711
PAYLOAD_TYPES = {"PCMU": 0, "PCMA": 8}
SILENCE_BYTE = {"PCMU": 0xFF, "PCMA": 0xD5}  # G.711 code of a zero sample
CLK_TCK = os.sysconf("SC_CLK_TCK")

__all__ = [
    "Caller", "CallPlan", "EventWatcher", "code_version", "GatewayProcess", "RtpSender", "SentStream", "free_udp_port",
    "load_snapshot", "machine_busy_seconds", "machine_description", "metrics", "now_utc", "percentile", "process_cpu_seconds",
    "sipp_signalling", "start_gateway", "udp_counters", "write_section",
]


# -- the machine --------------------------------------------------------------------------

def machine_description() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores (nproc), {model}, {mem_kb / 1024 / 1024:.1f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def code_version() -> str:
    """The gateway code measured: HEAD and any uncommitted changes under gateway/
    (other engineers commit to the same tree while benchmarks run)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "gateway"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git failed)"
    changed = [line[3:] for line in status if line.strip()]
    return f"git {head}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def load_snapshot() -> str:
    """Load average and the busiest processes right now (the machine is shared)."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    try:
        top = subprocess.run(["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()[1:5]
    except (OSError, subprocess.SubprocessError):
        top = []
    busiest = "; ".join(f"{line.split(None, 2)[0]}% {line.split(None, 2)[2][:70]}" for line in top
                        if len(line.split(None, 2)) == 3)
    return f"load average {' '.join(load)}; busiest processes: {busiest}"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle (user, nice, system, irq, softirq, steal) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def udp_counters() -> dict[str, int]:
    """The kernel's Udp counters from /proc/net/snmp (InErrors, RcvbufErrors, ...)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
    names, values = lines[0][1:], lines[1][1:]
    return {n: int(v) for n, v in zip(names, values)}


def metrics(http_port: int) -> dict[str, float]:
    """Prometheus text from the gateway's /metrics as {"name{labels}": value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- RESULTS.md ---------------------------------------------------------------------------

_HEADER = """# Earshot benchmark results

Each section is written by the script named in it (it replaces only its own
section). Numbers are from real runs on the machine described in the section;
the machine is shared with other work, so each section notes the load at the
time. Ratios are always measured side by side in one run.
"""


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of bench/RESULTS.md."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else _HEADER
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text, encoding="utf-8")


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# -- events -------------------------------------------------------------------------------

@dataclass
class Arrival:
    entry_id: str
    id_ms: int  # Redis entry id time: when Redis appended it (server clock = this machine's)
    seen: float  # time.time() when a blocking XREAD here returned it
    event: dict


class EventWatcher:
    """Blocking XREAD on the gateway's events stream in a thread; every entry is
    timestamped on arrival, and ``on_started`` is called for each call.started."""

    def __init__(self, stream: str, on_started: Callable[[dict], None] | None = None) -> None:
        self.stream = stream
        self.on_started = on_started
        self.arrivals: list[Arrival] = []
        self._cond = threading.Condition()
        self._stop = False
        self._client = redis.Redis.from_url(REDIS_URL)
        self._thread = threading.Thread(target=self._run, name="event-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = "0-0"
        while not self._stop:
            reply = self._client.xread({self.stream: last}, block=500, count=500)
            seen = time.time()
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    last = eid
                    event = parse_fields(fields)
                    arrival = Arrival(eid, int(eid.split("-")[0]), seen, event)
                    if event["type"] == "call.started" and self.on_started is not None:
                        self.on_started(event)
                    with self._cond:
                        self.arrivals.append(arrival)
                        self._cond.notify_all()

    def wait_ended(self, sip_call_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if any(a.event["type"] == "call.ended" and a.event["sip_call_id"] == sip_call_id
                       for a in self.arrivals):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))

    def of_call(self, sip_call_id: str) -> list[Arrival]:
        with self._cond:
            return [a for a in self.arrivals if a.event["sip_call_id"] == sip_call_id]

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self._client.close()


# -- the RTP sender -----------------------------------------------------------------------

@dataclass(eq=False)
class SentStream:
    """One call's media: the fixture's G.711 bytes as 20 ms packets, then silence
    packets until stopped (a real phone keeps sending while the line is quiet)."""

    key: str
    dest: tuple[str, int]
    payload: bytes
    codec: str
    max_tail_s: float = 30.0
    ssrc: int = field(default_factory=lambda: random.getrandbits(32))
    seq0: int = field(default_factory=lambda: random.getrandbits(16))
    ts0: int = field(default_factory=lambda: random.getrandbits(32))
    sent_wall: list[float] = field(default_factory=list)  # time.time() after each payload packet
    packets_sent: int = 0
    stopped: bool = False
    _t0: float = 0.0

    @property
    def payload_packets(self) -> int:
        return -(-len(self.payload) // PACKET_BYTES)

    def packet(self, index: int) -> bytes:
        pt = PAYLOAD_TYPES[self.codec]
        chunk = self.payload[index * PACKET_BYTES:(index + 1) * PACKET_BYTES]
        if len(chunk) < PACKET_BYTES:
            chunk = chunk + bytes([SILENCE_BYTE[self.codec]]) * (PACKET_BYTES - len(chunk))
        header = struct.pack("!BBHII", 0x80, pt | (0x80 if index == 0 else 0), (self.seq0 + index) & 0xFFFF,
                             (self.ts0 + index * PACKET_BYTES) & 0xFFFFFFFF, self.ssrc)
        return header + chunk

    def sent_at_ms(self, audio_ms: float) -> float:
        """Wall time at which the packet holding the audio at ``audio_ms`` was sent."""
        index = min(max(int(audio_ms // PACKET_MS), 0), len(self.sent_wall) - 1)
        return self.sent_wall[index]


class RtpSender:
    """Paced RTP from one UDP socket for any number of calls, in one thread.

    Each packet is due at ``start + n * 20 ms`` (monotonic clock); when the
    thread falls behind it sends the late packets at once, as a phone's clock
    would, and records the real send time of every packet.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._heap: list[tuple[float, int, SentStream, int]] = []
        self._cond = threading.Condition()
        self._counter = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="rtp-sender", daemon=True)
        self._thread.start()

    def start(self, stream: SentStream) -> None:
        with self._cond:
            stream._t0 = time.monotonic()
            self._counter += 1
            heapq.heappush(self._heap, (stream._t0, self._counter, stream, 0))
            self._cond.notify()

    def stop(self, stream: SentStream) -> None:
        stream.stopped = True

    def _run(self) -> None:
        sock = self.sock
        while True:
            with self._cond:
                while not self._closed:
                    if self._heap:
                        wait = self._heap[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(min(wait, 0.05))
                    else:
                        self._cond.wait(0.2)
                if self._closed:
                    return
                due, _, stream, index = heapq.heappop(self._heap)
            if stream.stopped:
                continue
            if index >= stream.payload_packets + stream.max_tail_s * 1000 / PACKET_MS:
                stream.stopped = True
                continue
            try:
                sock.sendto(stream.packet(index), stream.dest)
            except OSError:
                pass  # a full loopback queue is the gateway's loss to count, not ours
            stream.packets_sent += 1
            if index < stream.payload_packets:
                stream.sent_wall.append(time.time())
            with self._cond:
                self._counter += 1
                heapq.heappush(self._heap, (stream._t0 + (index + 1) * PACKET_MS / 1000, self._counter,
                                            stream, index + 1))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(5)
        self.sock.close()


# -- sipp signalling ----------------------------------------------------------------------

def sipp_signalling(*, sip_port: int, call_id: str, media_port: int, codec: str, pause_ms: int,
                    log_dir: Path) -> subprocess.Popen[bytes]:
    """One sipp process placing one call whose SDP names ``media_port`` (the RtpSender).

    ``call_id`` may contain sipp's ``%u`` (call number); the caller must be able to
    predict the final Call-ID, so pass it fully formed.
    """
    timeout_s = pause_ms // 1000 + 60
    args = [
        "sipp", f"127.0.0.1:{sip_port}", "-sf", str(SIGNALLING_SCENARIO), "-s", "1000",
        "-i", "127.0.0.1", "-p", str(free_udp_port()), "-bind_local", "-mp", str(free_media_ports()),
        "-t", "u1", "-m", "1", "-l", "1", "-d", str(pause_ms),
        "-key", "media_host", "127.0.0.1", "-key", "media_port", str(media_port),
        "-key", "codec_pt", str(PAYLOAD_TYPES[codec]), "-key", "codec_name", codec,
        "-cid_str", call_id, "-max_retrans", "3", "-recv_timeout", "20000",
        "-timeout", f"{timeout_s}s", "-timeout_error", "-nostdin",
        "-trace_err", "-error_file", str(log_dir / f"{_safe(call_id)}.errors.log"),
    ]
    return subprocess.Popen(["timeout", "-k", "5", str(timeout_s + 10), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(log_dir / f"{_safe(call_id)}.stderr", "wb"))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


@dataclass
class CallPlan:
    entry: FixtureEntry
    sip_call_id: str
    stream: SentStream | None = None
    sipp_rc: int | None = None
    events: list[Arrival] = field(default_factory=list)
    ended: bool = False


class Caller:
    """Places calls at one gateway: sipp for SIP, the shared RtpSender for media,
    started the moment the gateway's call.started reaches Redis."""

    def __init__(self, gw: GatewayProcess, sender: RtpSender, log_dir: Path | None = None) -> None:
        self.gw = gw
        self.sender = sender
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="earshot-bench-"))
        self._pending: dict[str, CallPlan] = {}
        self._lock = threading.Lock()
        self.watcher = EventWatcher(gw.events_stream, on_started=self._on_started)

    def _on_started(self, event: dict) -> None:
        with self._lock:
            plan = self._pending.pop(event["sip_call_id"], None)
        if plan is None:
            return
        payload, codec = read_g711(plan.entry.file)
        stream = SentStream(plan.sip_call_id, ("127.0.0.1", int(event["local_media_port"])), payload, codec)
        plan.stream = stream
        self.sender.start(stream)

    def run_call(self, plan: CallPlan, *, hold_ms: int = 1500, end_timeout: float = 120.0) -> CallPlan:
        """Place one call, stream its fixture, hang up ``hold_ms`` after the audio, and
        wait for its call.ended."""
        _payload, codec = read_g711(plan.entry.file)
        with self._lock:
            self._pending[plan.sip_call_id] = plan
        # the call stays up for the audio + hold, plus a little for media to start after the ACK
        pause_ms = plan.entry.duration_ms + hold_ms + 300
        proc = sipp_signalling(sip_port=self.gw.sip_port, call_id=plan.sip_call_id, media_port=self.sender.port,
                               codec=codec, pause_ms=pause_ms, log_dir=self.log_dir)
        plan.sipp_rc = proc.wait()
        if plan.stream is not None:
            self.sender.stop(plan.stream)
        with self._lock:
            self._pending.pop(plan.sip_call_id, None)
        plan.ended = self.watcher.wait_ended(plan.sip_call_id, end_timeout)
        plan.events = self.watcher.of_call(plan.sip_call_id)
        return plan

    def close(self) -> None:
        self.watcher.close()


"""Many cores for one gateway: does moving per-packet RTP work off the event-loop thread pay?

Usage:
    .venv/bin/python bench/media_cores.py [--calls 200] [--seconds 10] [--rounds 2] [--no-write]

Why: one ``earshot run`` does all per-packet work (UDP receive, RTP parse, jitter
buffer, G.711 decode) on its event-loop thread, and that thread is what limits a
gateway (bench/RESULTS.md, media plane). Two ways to use a second core inside one
gateway are measured here against the code as it is, on the same offered load:

* ``loop``: as today: the asyncio loop owns the calls' UDP sockets and runs
  :class:`gateway.rtp.receiver.RtpReceiver` on every datagram;
* ``thread``: a media thread with its own asyncio loop owns the sockets and the
  receivers, and hands the decoded chunks of every 20 ms to the main loop in one
  ``call_soon_threadsafe`` (what a media thread in the gateway would do);
* ``process``: a media process does the same and sends the chunks of every 20 ms
  to the main process in one pickled message over a pipe, which the main loop
  reads with ``add_reader``.

A sender process (not measured) sends one 20 ms PCMU packet per call every 20 ms
to ``--calls`` UDP ports. For each mode, over ``--seconds``: packets and chunks
received, CPU seconds of the main thread (what the gateway's loop would have left
for VAD, turns, ASR requests and events), of the media thread or process, and of
the whole receiving side, each per 1000 packets. The modes alternate ``--rounds``
times, so each ratio is of runs side by side.

Writes bench/results/media_cores.json and the "media_cores" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import pickle
import resource
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BENCH, code_version, load_snapshot, machine_description, now_utc, write_section  # noqa: E402
from gateway.rtp.receiver import AudioChunk, RtpReceiver  # noqa: E402

PACKET_S = 0.02
PAYLOAD = bytes(range(160))  # 20 ms of PCMU (any bytes decode)
MODES = ("loop", "thread", "process")


# -- the offered load ---------------------------------------------------------------------

def sender(ports: list[int], seconds: float, ready: "mp.synchronize.Event", go: "mp.synchronize.Event") -> None:
    """One packet per port every 20 ms for ``seconds`` (paced on the monotonic clock)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    header = struct.Struct("!BBHII")
    ready.set()
    go.wait()
    start = time.monotonic()
    tick = 0
    while True:
        due = start + tick * PACKET_S
        now = time.monotonic()
        if due - start >= seconds:
            break
        if due > now:
            time.sleep(due - now)
        for i, port in enumerate(ports):
            packet = header.pack(0x80, 0, tick & 0xFFFF, (tick * 160) & 0xFFFFFFFF, 1000 + i) + PAYLOAD
            try:
                sock.sendto(packet, ("127.0.0.1", port))
            except BlockingIOError:
                pass
        tick += 1
    sock.close()


# -- the receiving side -------------------------------------------------------------------

class _Endpoint(asyncio.DatagramProtocol):
    """One call's RTP socket: every datagram through the call's RtpReceiver (the gateway's path)."""

    def __init__(self, call: int, out: list[tuple[int, int, bytes]], counts: list[int]) -> None:
        self.call = call
        self.out = out
        self.counts = counts
        self.receiver = RtpReceiver(expected_host="127.0.0.1", expected_port=None, codecs={0: "PCMU"},
                                    dtmf_payload_type=None)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.counts[0] += 1
        for item in self.receiver.receive(data, addr, time.monotonic()):
            if isinstance(item, AudioChunk):
                self.out.append((self.call, item.start_sample, item.pcm))


async def _open(socks: list[socket.socket], out: list[tuple[int, int, bytes]], counts: list[int]) -> list[_Endpoint]:
    loop = asyncio.get_running_loop()
    endpoints = []
    for i, sock in enumerate(socks):
        _, protocol = await loop.create_datagram_endpoint(lambda i=i: _Endpoint(i, out, counts), sock=sock)
        endpoints.append(protocol)
    return endpoints


def _poll(endpoints: list[_Endpoint], out: list[tuple[int, int, bytes]]) -> None:
    now = time.monotonic()
    for ep in endpoints:
        for item in ep.receiver.poll(now):
            if isinstance(item, AudioChunk):
                out.append((ep.call, item.start_sample, item.pcm))


def _work_unit() -> int:
    """About a tenth of a millisecond of pure-Python work: the stand-in for the rest of the
    gateway's loop (VAD orchestration, turn detection, ASR requests, events)."""
    total = 0
    for i in range(400):
        total += i * i
    return total


async def spin(seconds: float) -> int:
    """Work units the main loop completes in ``seconds`` while it also serves its other callbacks."""
    end = time.monotonic() + seconds
    units = 0
    while time.monotonic() < end:
        for _ in range(10):
            _work_unit()
        units += 10
        await asyncio.sleep(0)
    return units


class Consumer:
    """The main loop's side: takes the chunks (the gateway would feed them to the leg pipelines)."""

    def __init__(self) -> None:
        self.chunks = 0
        self.samples = 0

    def take(self, batch: list[tuple[int, int, bytes]]) -> None:
        self.chunks += len(batch)
        for _call, _start, pcm in batch:
            self.samples += len(pcm) // 2


def _bind(calls: int) -> list[socket.socket]:
    socks = []
    for _ in range(calls):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
    return socks


async def _media_loop(socks: list[socket.socket], hand_off, stop: threading.Event | None, seconds: float) -> int:
    """The media side's loop: receive, and every 20 ms hand the decoded chunks off in one go."""
    out: list[tuple[int, int, bytes]] = []
    counts = [0]
    endpoints = await _open(socks, out, counts)
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (stop is not None and stop.is_set()):
        await asyncio.sleep(PACKET_S)
        _poll(endpoints, out)
        if out:
            batch, out[:] = list(out), []
            hand_off(batch)
    return counts[0]


def run_loop(socks: list[socket.socket], seconds: float, with_spin: bool) -> dict:
    async def main() -> dict:
        consumer = Consumer()
        out: list[tuple[int, int, bytes]] = []
        counts = [0]
        endpoints = await _open(socks, out, counts)
        t_cpu = time.thread_time()
        spinner = asyncio.ensure_future(spin(seconds)) if with_spin else None
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(PACKET_S)
            _poll(endpoints, out)
            if out:
                batch, out[:] = list(out), []
                consumer.take(batch)
        units = await spinner if spinner is not None else 0
        main_cpu = time.thread_time() - t_cpu
        return {"packets": counts[0], "chunks": consumer.chunks, "main_cpu_s": main_cpu, "media_cpu_s": 0.0,
                "spare_units": units}

    return asyncio.run(main())


def run_thread(socks: list[socket.socket], seconds: float, with_spin: bool) -> dict:
    async def main() -> dict:
        loop = asyncio.get_running_loop()
        consumer = Consumer()
        result: dict = {}

        def media() -> None:
            t = time.thread_time()
            result["packets"] = asyncio.run(_media_loop(socks, lambda b: loop.call_soon_threadsafe(consumer.take, b),
                                                        None, seconds))
            result["media_cpu_s"] = time.thread_time() - t

        t_cpu = time.thread_time()
        thread = threading.Thread(target=media, name="media")
        thread.start()
        units = await spin(seconds) if with_spin else 0
        while thread.is_alive():
            await asyncio.sleep(PACKET_S)
        await asyncio.sleep(0.05)  # the last hand-off
        main_cpu = time.thread_time() - t_cpu
        return {"packets": result["packets"], "chunks": consumer.chunks, "main_cpu_s": main_cpu,
                "media_cpu_s": result["media_cpu_s"], "spare_units": units}

    return asyncio.run(main())


def _media_process(fds: list[int], conn, seconds: float) -> None:
    socks = [socket.socket(fileno=fd) for fd in fds]
    for s in socks:
        s.setblocking(False)

    def hand_off(batch: list[tuple[int, int, bytes]]) -> None:
        conn.send_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))

    t = time.process_time()
    packets = asyncio.run(_media_loop(socks, hand_off, None, seconds))
    conn.send_bytes(pickle.dumps(("done", packets, time.process_time() - t)))
    conn.close()


def run_process(socks: list[socket.socket], seconds: float, with_spin: bool) -> dict:
    parent, child = mp.Pipe(duplex=False)
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_media_process, args=([s.fileno() for s in socks], child, seconds))

    async def main() -> dict:
        loop = asyncio.get_running_loop()
        consumer = Consumer()
        done: asyncio.Future = loop.create_future()

        def readable() -> None:
            while parent.poll():
                message = pickle.loads(parent.recv_bytes())
                if isinstance(message, tuple) and message and message[0] == "done":
                    loop.remove_reader(parent.fileno())
                    done.set_result(message)
                    return
                consumer.take(message)

        t_cpu = time.thread_time()
        proc.start()
        child.close()
        loop.add_reader(parent.fileno(), readable)
        units = await spin(seconds) if with_spin else 0
        _, packets, media_cpu = await asyncio.wait_for(done, seconds + 30)
        main_cpu = time.thread_time() - t_cpu
        return {"packets": packets, "chunks": consumer.chunks, "main_cpu_s": main_cpu, "media_cpu_s": media_cpu,
                "spare_units": units}

    try:
        return asyncio.run(main())
    finally:
        proc.join(10)
        parent.close()


RUNNERS = {"loop": run_loop, "thread": run_thread, "process": run_process}


def run_idle(seconds: float, with_spin: bool) -> dict:
    """No packets: the main loop's whole capacity for the stand-in work (the 100 % of spare_units)."""
    t_cpu = time.thread_time()
    units = asyncio.run(spin(seconds)) if with_spin else 0
    return {"packets": 0, "chunks": 0, "main_cpu_s": time.thread_time() - t_cpu, "media_cpu_s": 0.0,
            "spare_units": units}


def one_run(mode: str, calls: int, seconds: float, with_spin: bool) -> dict:
    if mode == "idle":
        return {"mode": mode, "calls": 0, "seconds": seconds, "wall_s": seconds, **run_idle(seconds, with_spin),
                "receiving_cpu_s": 0.0, "main_ms_per_1k": float("nan"), "media_ms_per_1k": float("nan"),
                "total_ms_per_1k": float("nan"), "offered": 0}
    socks = _bind(calls)
    ports = [s.getsockname()[1] for s in socks]
    ctx = mp.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    send = ctx.Process(target=sender, args=(ports, seconds + 0.5, ready, go))
    send.start()
    ready.wait(10)
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic()
    go.set()
    try:
        result = RUNNERS[mode](socks, seconds, with_spin)
    finally:
        send.join(seconds + 10)
        for s in socks:
            s.close()
    wall = time.monotonic() - wall
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    process_cpu = (self_after.ru_utime - self_before.ru_utime) + (self_after.ru_stime - self_before.ru_stime)
    if mode == "process":
        process_cpu += result["media_cpu_s"]  # the media child's CPU, measured in the child
    k = max(result["packets"], 1) / 1000.0
    return {"mode": mode, "calls": calls, "seconds": seconds, "wall_s": round(wall, 2), **result,
            "receiving_cpu_s": process_cpu,
            "main_ms_per_1k": result["main_cpu_s"] * 1000 / k, "media_ms_per_1k": result["media_cpu_s"] * 1000 / k,
            "total_ms_per_1k": process_cpu * 1000 / k,
            "offered": int(calls * seconds / PACKET_S)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render", type=Path, help="only write the report again from this media_cores.json")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text(encoding="utf-8"))
        command, load, date, code, runs = saved["command"], saved["load"], saved["date"], saved["code"], saved["runs"]
        for key, value in saved["args"].items():
            setattr(args, key, value)
    else:
        command = " ".join([".venv/bin/python bench/media_cores.py", *sys.argv[1:]])
        load, date, code = load_snapshot(), now_utc(), code_version()
        runs = []
        for r in range(args.rounds):
            for with_spin in (False, True):
                for mode in (("idle",) if with_spin else ()) + MODES:
                    result = one_run(mode, args.calls, args.seconds, with_spin)
                    result.update({"round": r + 1, "spin": with_spin})
                    print(json.dumps(result), flush=True)
                    runs.append(result)

    def med(mode: str, key: str, spin_: bool) -> float:
        return statistics.median(x[key] for x in runs if x["mode"] == mode and x["spin"] is spin_)

    cost_rows = "\n".join(
        f"| {x['round']} | {x['mode']} | {x['offered']} | {x['packets']} | {x['chunks']} | {x['main_ms_per_1k']:.1f} "
        f"| {x['media_ms_per_1k']:.1f} | {x['total_ms_per_1k']:.1f} |" for x in runs if not x["spin"])
    idle = med("idle", "spare_units", True)
    spare_rows = "\n".join(
        f"| {x['round']} | {x['mode']} | {x['packets']} | {x['spare_units']} | {100 * x['spare_units'] / idle:.0f} % "
        f"| {x['wall_s'] - x['seconds'] - 0.5:.1f} |"
        for x in runs if x["spin"])
    late = max((x["wall_s"] - x["seconds"] - 0.5 for x in runs if x["spin"] and x["mode"] == "thread"), default=0.0)
    base_main, base_total = med("loop", "main_ms_per_1k", False), med("loop", "total_ms_per_1k", False)
    ratios = "; ".join(
        f"{mode}: main thread {med(mode, 'main_ms_per_1k', False) / base_main:.2f}x, receiving side in all "
        f"{med(mode, 'total_ms_per_1k', False) / base_total:.2f}x" for mode in MODES if mode != "loop")
    spare = "; ".join(f"{mode} {100 * med(mode, 'spare_units', True) / idle:.0f} %" for mode in MODES)
    body = f"""## Many cores for one gateway: per-packet work off the loop thread (bench/media_cores.py)

Command: `{command}`
Date: {date}.
Machine: {machine_description()}.
Code: {code}.
Load before the run: {load}.

One sender process (not measured) sends one 20 ms PCMU packet per call every 20 ms to {args.calls} UDP ports for
{args.seconds:g} s. The receiving side runs the gateway's own `RtpReceiver` (parse, latch, jitter buffer, G.711
decode) on every datagram, in one of three arrangements: `loop` (as today: the asyncio loop owns the sockets),
`thread` (a media thread with its own loop owns them and hands each 20 ms of chunks to the main loop with one
`call_soon_threadsafe`), `process` (a media process owns them and sends each 20 ms of chunks, pickled, over a
pipe that the main loop reads with `add_reader`).

Cost: CPU per 1000 packets of the main thread (`time.thread_time()`), of the media thread or process
(`process_time()` in the child), and of the receiving side in all (getrusage of this process plus the media
process), the main loop doing nothing else:

| round | mode | packets offered | received | chunks to the main loop | main thread CPU ms per 1k packets | media thread/process ms per 1k | receiving side in all ms per 1k |
|---:|---|---:|---:|---:|---:|---:|---:|
{cost_rows}

Capacity left: the main loop also runs pure-Python work units (a stand-in for the rest of the gateway's loop:
VAD orchestration, turns, ASR requests, events) as fast as it can, yielding every ten; spare = units done,
as a share of `idle` (the same loop with no packets at all):

| round | mode | packets received | work units | spare (of idle) | media side still working after the sender stopped, s |
|---:|---|---:|---:|---:|---:|
{spare_rows}

Medians, modes alternating, {args.rounds} rounds: cost as ratios to `loop`: {ratios}. Capacity left on the main
loop: {spare}. The last column is what makes the `thread` figure hollow: with the main loop busy, the media
thread got the GIL so rarely that its packets waited in the kernel's socket buffers and were handled only after
the main loop's work stopped (up to {late:.1f} s late): a media thread would hold up audio by seconds exactly
when the gateway is loaded. The `process` figure is real: the media process kept up on the other core.

Raw numbers: bench/results/media_cores.json.
"""
    out_dir = Path(tempfile.mkdtemp(prefix="earshot-bench-")) if args.no_write else BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    if not args.render:
        raw = {"date": date, "command": command, "load": load, "code": code, "machine": machine_description(),
               "args": {k: v for k, v in vars(args).items() if k not in ("render", "no_write")}, "runs": runs}
        (out_dir / "media_cores.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    print(body)
    if not args.no_write:
        write_section("media_cores", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

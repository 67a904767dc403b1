"""The ``earshot`` command line: run, worker, status, tail, config, db, persist, users."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import Callable

from . import __version__
from .config import ConfigError, Settings, describe, load_settings
from .dialplan import DialplanError
from .store import commands as store_commands


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    try:
        return load_settings(args.config, **overrides)
    except ConfigError as exc:
        print(f"earshot: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


async def _run(settings: Settings) -> int:
    from .app import Gateway  # heavy imports only for `run`

    try:
        gateway = Gateway(settings)
    except DialplanError as exc:
        print(f"earshot: dialplan error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # e.g. an unreadable TLS certificate (gateway/tlsconfig.py)
        print(f"earshot: configuration error: {exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        # the first SIGTERM/SIGINT drains; a second one ends the drain at once
        nonlocal signals
        signals += 1
        if signals == 1:
            stop.set()
        elif signals == 2:
            print("earshot: second signal, ending active calls now", flush=True)
            asyncio.ensure_future(gateway.drain(0))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    # SIGHUP: load the dialplan file again; active calls keep their routes, a bad file is refused
    gateway.reload_on_sighup()
    try:
        await gateway.start()
    except OSError as exc:
        print(f"earshot: cannot start: {exc}", file=sys.stderr)
        await gateway.close()
        return 1
    print(f"earshot: ready (SIP port {gateway.sip_port}, HTTP http://{settings.http_host}:"
          f"{gateway.http.port if gateway.http else settings.http_port})", flush=True)
    await stop.wait()
    print("earshot: draining (new calls get 503)", flush=True)
    await gateway.drain()
    await gateway.close()
    print("earshot: stopped", flush=True)
    return 0


def _dialplan_check(args: argparse.Namespace) -> int:
    """``earshot dialplan check FILE``: what a reload would say of the file, before it is deployed."""
    from .dialplan import load_dialplan

    try:
        plan = load_dialplan(args.file)
        from .app import validate_dialplan  # the gateway's own checks: turn settings, and models with a config

        validate_dialplan(_settings(args), plan, models=bool(args.config or os.environ.get("EARSHOT_CONFIG")))
    except DialplanError as exc:
        print(exc.located, file=sys.stderr)
        return 1
    print(f"OK {args.file}: {plan.summary()}")
    return 0


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where available ("auto"): its datagram path costs a fraction of asyncio's
    per packet, which is what bounds calls per core (bench/RESULTS.md)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            print("earshot: event_loop is 'uvloop' but uvloop is not installed", file=sys.stderr)
            raise SystemExit(2) from None
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="earshot", description="Real-time speech transcription gateway")
    parser.add_argument("--version", action="version", version=f"earshot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway (SIP, RTP, VAD, ASR, Redis publisher, HTTP)")
    run.add_argument("-c", "--config", help="YAML configuration file (also EARSHOT_CONFIG)")
    run.add_argument("--sip-port", type=int, help="SIP port for UDP and TCP (default 5060)")
    run.add_argument("--http-port", type=int, help="HTTP port for /healthz and /metrics (default 8080)")
    run.add_argument("--asr", choices=("embedded", "pool", "openai"),
                     help="where turns are transcribed (asr_backend; default embedded)")

    worker = sub.add_parser("worker", help="serve the ASR pool: transcription jobs from Redis Streams")
    worker.add_argument("-c", "--config", help="YAML configuration file (also EARSHOT_CONFIG)")
    worker.add_argument("--http-port", type=int, help="port for /healthz and /metrics (default 8090)")
    worker.add_argument("--model", help="ASR model (asr_model: tiny.en, a CTranslate2 directory, large-v3-turbo...)")
    worker.add_argument("--device", help="auto (CUDA where present), cpu, cuda, cuda:N (asr_device)")
    worker.add_argument("--compute-type", help="default (float16 on GPU, int8 on CPU), int8, float16... "
                        "(asr_compute_type)")
    worker.add_argument("--batch", type=int, help="jobs decoded in one model call (asr_max_batch)")
    worker.add_argument("--batch-wait-ms", type=float, help="wait up to this long for a batch to fill "
                        "(asr_batch_wait_ms)")
    worker.add_argument("--threads", type=int, help="decoding threads sharing the model (asr_workers)")
    worker.add_argument("--id", help="worker id (worker_id; default <host>-<pid>-<random>)")

    status = sub.add_parser("status", help="ASR workers, job queues and gateway instances, as Redis sees them")
    status.add_argument("-c", "--config", help="YAML configuration file (also EARSHOT_CONFIG)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")

    tail = sub.add_parser("tail", help="follow the event stream and print transcripts")
    tail.add_argument("-c", "--config", help="YAML configuration file (also EARSHOT_CONFIG)")
    tail.add_argument("--call", help="follow one call's stream (call id)")
    tail.add_argument("--from-start", action="store_true", help="print the stream from its beginning")
    tail.add_argument("--partials", action="store_true", help="also print interim partial transcripts")
    tail.add_argument("--json", action="store_true", help="print each event as JSON")
    tail.add_argument("-n", "--count", type=int, help="exit after printing this many events")

    cfg = sub.add_parser("config", help="validate the configuration and print the effective settings")
    cfg.add_argument("-c", "--config", help="YAML configuration file (also EARSHOT_CONFIG)")

    dialplan = sub.add_parser("dialplan", help="dialplan tools (docs/dialplan.md)")
    dialplan_sub = dialplan.add_subparsers(dest="dialplan_command", required=True)
    check = dialplan_sub.add_parser("check", help="validate a dialplan file: OK and a summary, or FILE:LINE: error")
    check.add_argument("file", help="the dialplan YAML file")
    check.add_argument("-c", "--config", help="also check its profiles' models and turn settings against this "
                       "configuration (YAML file; also EARSHOT_CONFIG)")

    store_commands.add_commands(sub)  # db, persist, users

    args = parser.parse_args(argv)
    if args.command == "run":
        settings = _settings(args, sip_port=args.sip_port, http_port=args.http_port, asr_backend=args.asr)
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
            return runner.run(_run(settings))
    if args.command == "worker":
        from .asr.remote.service import run_worker

        settings = _settings(args, worker_http_port=args.http_port, asr_model=args.model, asr_device=args.device,
                             asr_compute_type=args.compute_type, asr_max_batch=args.batch,
                             asr_batch_wait_ms=args.batch_wait_ms, asr_workers=args.threads, worker_id=args.id)
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
            return runner.run(run_worker(settings))
    if args.command == "status":
        from .status import status_command

        return status_command(_settings(args), as_json=args.json)
    if args.command == "tail":
        from .tail import tail as run_tail

        settings = _settings(args)
        stream = settings.call_stream(args.call) if args.call else settings.events_stream
        return run_tail(settings.redis_url, stream, from_start=args.from_start, partials=args.partials,
                        as_json=args.json, count=args.count)
    if args.command == "dialplan":
        return _dialplan_check(args)
    if args.command == "config":
        settings = _settings(args)
        print(json.dumps(describe(settings), indent=2))
        return 0
    if args.command in store_commands.COMMANDS:
        return store_commands.run_command(args, _settings(args, database_url=args.database_url))
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

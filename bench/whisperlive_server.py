"""WhisperLive's WebSocket server as its own ``run_server.py`` starts it, for bench/realtime_latency.py.

Runs under ``.venv-whisperlive/bin/python`` (bench/setup_whisperlive.sh), never
under Earshot's venv: WhisperLive's pins (torch, faster-whisper 1.2.0, ...) must
not touch the gateway's environment. Nothing here imports Earshot.

Like upstream ``run_server.py``: ``OMP_NUM_THREADS`` is set before anything
loads CTranslate2 (upstream's default is 1; the bench passes the machine's core
count so that WhisperLive gets the same cores the gateway does), one model is
shared by every client (upstream's default ``single_model``), the faster_whisper
backend, and a custom CTranslate2 model directory. ``max_clients`` is raised
to the bench's highest concurrency (upstream's default of 4 would answer the
5th client with WAIT). The REST API stays off.

Usage: whisperlive_server.py --port N --model DIR [--omp-threads N] [--max-clients N]
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="CTranslate2 Whisper model directory")
    parser.add_argument("--omp-threads", type=int, default=1)
    parser.add_argument("--max-clients", type=int, default=4)
    args = parser.parse_args()
    if not os.path.isdir(args.model):
        print(f"whisperlive_server: no model directory {args.model}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", str(args.omp_threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from whisper_live.__version__ import __version__
    from whisper_live.server import TranscriptionServer

    print(f"whisperlive_server: WhisperLive {__version__} on 127.0.0.1:{args.port}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, max_clients={args.max_clients}", flush=True)
    TranscriptionServer().run(
        "127.0.0.1",
        port=args.port,
        backend="faster_whisper",
        faster_whisper_custom_model_path=args.model,
        single_model=True,
        max_clients=args.max_clients,
        max_connection_time=3600,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput and latency of batched Whisper decoding (cross-call batching) on real prompts.

Usage:
    .venv/bin/python bench/asr_batch.py [--n 24] [--batches 1 2 4 8] [--windows 30 short]
        [--configs 1x2 2x1] [--rounds 2] [--json out.json]
    .venv/bin/python bench/asr_batch.py --n 120 --load 5 --seconds 60 --overload 0 8 [--max-batch 4]

Each cell (config, window, batch size) transcribes the same ``--n`` Asterisk
prompts (finals, through ``WhisperEngine.transcribe_batch``: energy gate, batched
encode + generate, guard), ``batch size`` requests per call. A config
``WxT`` is W worker threads sharing one model (CTranslate2 inter_threads),
T intra-op threads each; with W > 1 the batches are taken by W threads at
once, as WhisperTranscriber's workers would. Reported per cell: throughput
(requests per wall second), mean call time (= latency of every request in
the batch, queueing excluded), process CPU per request, WER, and how many
texts differ from batch size 1 of the same config and window. Cells run in
rotated order every round so that load from other processes on a shared
machine hits them alike; the load average is printed with every cell.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from asr_window import speech_set

from gateway.asr.interface import TranscriptionRequest
from gateway.asr.wer import corpus_wer
from gateway.asr.whisper import GuardThresholds, WhisperEngine, WindowPolicy


def run_cell(engine: WhisperEngine, workers: int, requests: list[TranscriptionRequest], batch: int) -> dict:
    """Transcribe all requests in batches of ``batch`` with ``workers`` threads; return timings and texts."""
    batches = [list(range(i, min(i + batch, len(requests)))) for i in range(0, len(requests), batch)]
    texts: list[str] = [""] * len(requests)
    call_ms: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not batches:
                    return
                members = batches.pop(0)
            t = time.perf_counter()
            results = engine.transcribe_batch([requests[i] for i in members])
            ms = (time.perf_counter() - t) * 1000
            with lock:
                call_ms.extend([ms] * len(members))
                for i, r in zip(members, results):
                    assert not isinstance(r, BaseException), r
                    texts[i] = r.text

    wall, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_s": wall, "cpu_ms_per_request": cpu * 1000 / len(requests), "call_ms": call_ms, "texts": texts}


def load_test(args: argparse.Namespace, speech: list) -> None:
    """Finals arriving as a Poisson process through WhisperTranscriber, per overload setting.

    Every setting gets the same arrival times and prompts (seeded), run one
    after the other; latency = submit to result (queueing included).
    """
    import asyncio
    import random

    from gateway.asr.whisper import WhisperTranscriber

    rng = random.Random(1)
    pool = [(text, audio) for _, text, audio in speech if audio.size <= 8 * 16000]  # telephone turns
    arrivals, t = [], 0.0
    while t < args.seconds:
        t += rng.expovariate(args.load)
        arrivals.append((t, *rng.choice(pool)))

    async def one(setting: int) -> None:
        tr = WhisperTranscriber(args.model, compute_type=args.compute_type, cpu_threads=2, local_files_only=True,
                                max_batch=args.max_batch, overload_backlog=setting)
        await tr.transcribe(TranscriptionRequest(pool[0][1], "final"))  # warm-up
        tr.scheduler.batches = tr.scheduler.batched = tr.scheduler.overloaded = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        load = os.getloadavg()[0]

        async def request(at: float, audio) -> tuple[float, str]:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            submitted = loop.time()
            result = await tr.transcribe(TranscriptionRequest(audio, "final"))
            return loop.time() - submitted, result.text

        done = await asyncio.gather(*(request(at, audio) for at, _, audio in arrivals))
        await tr.close()
        lat = sorted(d[0] for d in done)
        wer = corpus_wer((text, d[1]) for (_, text, _), d in zip(arrivals, done))
        print(f"overload_backlog {setting:2d}: {len(done)} finals at {args.load}/s over {args.seconds:.0f} s:"
              f" latency p50 {lat[len(lat) // 2]:.2f} s p95 {lat[round(0.95 * (len(lat) - 1))]:.2f} s max {lat[-1]:.2f} s,"
              f" WER {wer:.3f}, short-window finals {tr.overloaded}, calls {tr.batches}, batched {tr.batched},"
              f" load {load:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)

    for setting in args.overload:
        asyncio.run(one(setting))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--windows", nargs="+", default=["30", "short"])
    parser.add_argument("--configs", nargs="+", default=["1x2", "2x1"], help="WORKERSxTHREADS")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--load", type=float, help="load test instead: finals per second through WhisperTranscriber")
    parser.add_argument("--seconds", type=float, default=60.0, help="load test duration (arrivals)")
    parser.add_argument("--max-batch", type=int, default=2, help="load test: WhisperTranscriber max_batch")
    parser.add_argument("--overload", type=int, nargs="+", default=[0, 8], help="load test: overload_backlog values")
    args = parser.parse_args()

    # Sorted by length so that short-window batches mostly share one window bucket
    # (the engine splits a batch into groups of equal window).
    speech = sorted(speech_set(args.n), key=lambda item: item[2].size)
    refs = [text for _, text, _ in speech]
    requests = [TranscriptionRequest(audio, "final") for _, _, audio in speech]
    seconds = [r.seconds for r in requests]
    print(f"{len(requests)} prompts, {sum(seconds):.0f} s audio, {min(seconds):.1f}-{max(seconds):.1f} s each")
    if args.load:
        load_test(args, speech)
        return
    engines: dict[str, tuple[WhisperEngine, int]] = {}
    for spec in args.configs:
        workers, threads = (int(x) for x in spec.split("x"))
        engines[spec] = (
            WhisperEngine(args.model, device="cpu", compute_type=args.compute_type, cpu_threads=threads,
                          threads=workers, beam_size=1, window=WindowPolicy.parse("30"), guard=GuardThresholds(),
                          local_files_only=True),
            workers,
        )
        engines[spec][0].transcribe_batch(requests[:2])

    cells = [(c, w, b) for c in args.configs for w in args.windows for b in args.batches]
    runs: dict[tuple[str, str, int], list[dict]] = {cell: [] for cell in cells}
    for round_ in range(args.rounds):
        shift = round_ * len(cells) // max(1, args.rounds)
        for config, window, batch in cells[shift:] + cells[:shift]:
            engine, workers = engines[config]
            engine.policy = WindowPolicy.parse(window)
            load = os.getloadavg()[0]
            run = run_cell(engine, workers, requests, batch)
            run["load"] = load
            runs[(config, window, batch)].append(run)
            print(f"  round {round_} {config} window {window:>5s} batch {batch}: {len(requests) / run['wall_s']:.2f} req/s"
                  f"  call {statistics.fmean(run['call_ms']):.0f} ms  load {load:.2f}", flush=True)

    print("\nconfig window batch | req/s (best, mean) | call ms mean | CPU ms/req | WER | texts != batch 1 | load")
    report = []
    for config, window, batch in cells:
        cell_runs = runs[(config, window, batch)]
        base = runs[(config, window, args.batches[0])][0]["texts"]
        rates = [len(requests) / r["wall_s"] for r in cell_runs]
        texts = cell_runs[0]["texts"]
        row = {
            "config": config, "window": window, "batch": batch,
            "req_per_s_best": max(rates), "req_per_s_mean": statistics.fmean(rates),
            "call_ms_mean": statistics.fmean(ms for r in cell_runs for ms in r["call_ms"]),
            "cpu_ms_per_request": statistics.fmean(r["cpu_ms_per_request"] for r in cell_runs),
            "wer": corpus_wer(zip(refs, texts)),
            "differ_from_batch1": sum(a != b for r in cell_runs for a, b in zip(r["texts"], base)),
            "loads": [r["load"] for r in cell_runs],
        }
        report.append(row)
        print(f"{config:>4s} {window:>5s} {batch:>3d} | {row['req_per_s_best']:5.2f} {row['req_per_s_mean']:5.2f} |"
              f" {row['call_ms_mean']:6.0f} | {row['cpu_ms_per_request']:5.0f} | {row['wer']:.3f} |"
              f" {row['differ_from_batch1']} | {' '.join(f'{x:.1f}' for x in row['loads'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

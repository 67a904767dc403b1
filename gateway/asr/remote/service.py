"""The ``earshot worker`` process: engine + :class:`AsrWorker` + heartbeat + /healthz and /metrics.

Composition only; what a worker does is in :mod:`.worker`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ...config import Settings
from ...presence import Heartbeat, default_instance_id
from ..scheduler import Batch
from .worker import AsrWorker, WorkerConfig

log = logging.getLogger(__name__)

__all__ = ["WorkerMetrics", "run_worker", "worker_config"]

BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def worker_config(settings: Settings, worker_id: str | None = None) -> WorkerConfig:
    from ..factory import scheduler_limits

    return WorkerConfig(
        redis_url=settings.redis_url,
        names=settings.asr_pool_names,
        worker_id=worker_id or settings.worker_id or default_instance_id(),
        threads=settings.asr_workers,
        limits=scheduler_limits(settings),
        prefetch=settings.asr_pool_prefetch,
        claim_idle_s=settings.asr_pool_claim_idle_s,
        heartbeat_s=settings.asr_pool_heartbeat_s,
        max_deliveries=settings.asr_pool_max_deliveries,
    )


class _WorkerCollector(Collector):
    def __init__(self, worker: AsrWorker) -> None:
        self.worker = worker

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        w = self.worker
        jobs = CounterMetricFamily("earshot_worker_jobs", "Jobs finished, by kind and outcome "
                                   "(done, failed, cancelled, superseded, deadline, poison, bad-request)",
                                   labels=["kind", "outcome"])
        for (kind, outcome), count in sorted(w.jobs.items()):
            jobs.add_metric([kind, outcome], count)
        yield jobs
        yield CounterMetricFamily("earshot_worker_reclaimed", "Jobs taken over from a worker that stopped answering",
                                  value=w.reclaimed)
        yield CounterMetricFamily("earshot_worker_poison", "Jobs answered with an error instead of being decoded "
                                  "(unreadable, or delivered too often)", value=w.poison)
        yield CounterMetricFamily("earshot_worker_replies", "Replies written to gateways' reply streams",
                                  value=w.replies_written)
        yield GaugeMetricFamily("earshot_worker_queued", "Jobs waiting in this worker for a batch",
                                value=w.scheduler.queued)
        yield GaugeMetricFamily("earshot_worker_held", "Jobs taken from Redis and not answered yet", value=w.held)
        yield GaugeMetricFamily("earshot_worker_running", "Batches being decoded", value=w.scheduler.running)
        yield GaugeMetricFamily("earshot_worker_draining", "1 while draining", value=1.0 if w.draining else 0.0)
        yield GaugeMetricFamily("earshot_worker_redis_up", "1 while Redis answers", value=1.0 if w.redis_up else 0.0)


class WorkerMetrics:
    """Prometheus registry of one worker: its counters plus batch-size and timing histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batch_size = Histogram("earshot_worker_batch_size", "Jobs decoded in one model call", ["kind"],
                                    buckets=BATCH_SIZE_BUCKETS, registry=self.registry)
        self.batch_wait = Histogram("earshot_worker_batch_wait_seconds",
                                    "Time a batch waited for company after its first job (asr_batch_wait_ms)",
                                    buckets=SECONDS_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("earshot_worker_batch_seconds", "Decode time of one batch", ["kind"],
                                       buckets=SECONDS_BUCKETS, registry=self.registry)

    def attach(self, worker: AsrWorker) -> None:
        self.registry.register(_WorkerCollector(worker))

    def on_batch(self, batch: Batch, seconds: float) -> None:
        kind = batch.jobs[0].request.kind if batch.jobs else "final"
        self.batch_size.labels(kind).observe(len(batch.jobs))
        self.batch_wait.observe(batch.waited)
        self.batch_seconds.labels(kind).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _http_app(worker: AsrWorker, metrics: WorkerMetrics, info: dict[str, Any]) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def healthz(request: Request) -> JSONResponse:
        state = "draining" if worker.draining else ("ok" if worker.redis_up else "redis-unreachable")
        body = {"status": state, "worker": worker.id, "held": worker.held, "queued": worker.scheduler.queued, **info}
        return JSONResponse(body, status_code=200 if state == "ok" else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return Starlette(routes=[Route("/healthz", healthz), Route("/metrics", metrics_endpoint)])


async def run_worker(settings: Settings, *, worker_id: str | None = None) -> int:
    """Serve the pool until SIGTERM/SIGINT (drain), or a second signal (stop at once)."""
    from ...http import HttpServer
    from ..factory import build_engine
    from ..models import ModelNotFound

    config = worker_config(settings, worker_id)
    try:
        engine = await asyncio.to_thread(build_engine, settings)
    except ModelNotFound as exc:
        print(f"earshot worker: cannot load ASR model {settings.asr_model!r}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001  # CUDA libraries missing, a corrupt model file...
        print(f"earshot worker: cannot load ASR model {settings.asr_model!r} on {settings.asr_device}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    info = {"model": settings.asr_model, "device": engine.device, "compute_type": engine.compute_type}
    metrics = WorkerMetrics()
    worker = AsrWorker(config, engine, describe=lambda: info, on_batch=metrics.on_batch)
    metrics.attach(worker)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    http = HttpServer(_http_app(worker, metrics, info), settings.worker_http_host, settings.worker_http_port)
    try:
        await http.start()
    except OSError as exc:
        print(f"earshot worker: cannot serve HTTP on {settings.worker_http_host}:{settings.worker_http_port}: {exc}",
              file=sys.stderr)
        return 1
    await worker.start()
    heartbeat = Heartbeat(worker.client, config.names.worker(worker.id), config.heartbeat_s, worker.describe)
    await heartbeat.start()
    print(f"earshot worker: ready (id {worker.id}, model {settings.asr_model} on {engine.device}/"
          f"{engine.compute_type}, batch {config.limits.max_batch}, wait {config.limits.batch_wait_s * 1000:g} ms, "
          f"HTTP http://{settings.worker_http_host}:{http.port})", flush=True)
    await stop.wait()
    print(f"earshot worker: draining ({worker.held} job(s) held)", flush=True)
    drained = asyncio.ensure_future(worker.drain())
    second = asyncio.ensure_future(_second_signal(lambda: signals))
    await asyncio.wait((drained, second), return_when=asyncio.FIRST_COMPLETED)
    second.cancel()
    if not drained.done():
        print("earshot worker: second signal, stopping now (held jobs will be reclaimed)", flush=True)
        drained.cancel()
    await heartbeat.close()
    await worker.close()
    await http.close()
    print("earshot worker: stopped", flush=True)
    return 0


async def _second_signal(count: Any) -> None:
    while count() < 2:
        await asyncio.sleep(0.05)

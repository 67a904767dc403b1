"""``earshot status``: the pool and the gateways as Redis sees them.

Reads heartbeats (:mod:`gateway.presence`) and the job streams' consumer
group; writes nothing. A worker or gateway that stopped heartbeating is gone
from the live lists within three heartbeat intervals; the gateway registry
(:mod:`gateway.instances`) still shows it, silent and then lost.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from .config import Settings, mask_url
from .instances import read_instances
from .presence import read_presence

__all__ = ["collect_status", "render_status", "status_command"]


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


async def collect_status(settings: Settings) -> dict[str, Any]:
    names = settings.asr_pool_names
    client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
    try:
        workers = sorted(await read_presence(client, names.workers_pattern), key=lambda w: str(w.get("id")))
        gateways = sorted(await read_presence(client, names.gateways_pattern), key=lambda g: str(g.get("instance")))
        # the registry also remembers instances whose heartbeat stopped (silent, then lost)
        known = {g.get("instance") for g in gateways}
        for view in await read_instances(client, settings.stream_prefix, heartbeat_s=settings.asr_pool_heartbeat_s,
                                         lost_after_s=settings.gateway_lost_after_s):
            if view.instance in known:
                for g in gateways:
                    if g.get("instance") == view.instance:
                        g["state"] = view.state
            else:
                gateways.append(view.to_dict())
        gateways.sort(key=lambda g: str(g.get("instance")))
        queues = []
        for kind in ("final", "partial"):
            stream = names.jobs(kind)
            row: dict[str, Any] = {"kind": kind, "stream": stream, "length": int(await client.xlen(stream)),
                                   "lag": None, "pending": 0, "consumers": 0, "pending_by_consumer": {}}
            try:
                groups = await client.xinfo_groups(stream)
            except ResponseError:  # no such stream yet
                groups = []
            for group in groups:
                if _text(group.get("name")) != names.group:
                    continue
                row["lag"] = group.get("lag")
                row["pending"] = int(group.get("pending", 0))
                row["consumers"] = int(group.get("consumers", 0))
                if row["pending"]:
                    summary = await client.xpending(stream, names.group)
                    row["pending_by_consumer"] = {_text(c["name"]): int(c["pending"])
                                                  for c in summary.get("consumers", [])}
            queues.append(row)
    finally:
        await client.aclose()
    now = time.time()
    for item in workers + gateways:
        if isinstance(item.get("heartbeat"), (int, float)):
            item["heartbeat_age_s"] = round(now - item["heartbeat"], 1)
    for g in gateways:
        g.setdefault("state", "draining" if g.get("draining") else "alive")
    return {
        "redis": settings.redis_url,
        "stream_prefix": settings.stream_prefix,
        "group": names.group,
        "workers": workers,
        "gateways": gateways,
        "gateway_lost_after_s": settings.gateway_lost_after_s,
        "queues": queues,
        "reclaimed": sum(int(w.get("reclaimed", 0)) for w in workers),
    }


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells]


def render_status(status: dict[str, Any]) -> str:
    lines = [f"Redis {status['redis']}, prefix {status['stream_prefix']!r}, worker group {status['group']!r}", ""]
    workers = status["workers"]
    lines.append(f"ASR workers: {len(workers)}" + ("" if workers else " (none alive: pool finals will time out)"))
    if workers:
        lines += _table(["id", "host", "model", "device", "batch", "wait ms", "jobs done", "reclaimed", "held",
                         "last heartbeat"],
                        [[w.get("id"), w.get("host"), w.get("model"), f"{w.get('device')}/{w.get('compute_type')}",
                          w.get("max_batch"), w.get("batch_wait_ms"), w.get("jobs_done"), w.get("reclaimed"),
                          w.get("held"), f"{w.get('heartbeat_age_s', '?')} s ago"
                          + (" (draining)" if w.get("draining") else "")] for w in workers])
    lines += ["", "Job queues:"]
    lines += _table(["kind", "waiting (lag)", "pending (held by workers)", "stream length", "by consumer"],
                    [[q["kind"], q["lag"], q["pending"], q["length"],
                      ", ".join(f"{k}: {v}" for k, v in q["pending_by_consumer"].items()) or "-"]
                     for q in status["queues"]])
    lines.append(f"Jobs reclaimed from dead workers (live workers' counts): {status['reclaimed']}")
    gateways = status["gateways"]
    lines += ["", f"Gateway instances: {len(gateways)}"]
    if gateways:
        lines += _table(["instance", "state", "host", "SIP", "HTTP", "version", "calls", "ASR", "ASR backlog",
                         "last heartbeat"],
                        [[g.get("instance"), g.get("state"), g.get("host"), g.get("sip_port"), g.get("http_port"),
                          g.get("version"), g.get("active_calls"), g.get("asr_backend"), g.get("asr_backlog"),
                          f"{g.get('heartbeat_age_s', '?')} s ago" + (" (draining)" if g.get("draining") else "")]
                         for g in gateways])
        if any(g.get("state") == "lost" for g in gateways):
            lines.append(f"lost: silent over gateway_lost_after_s ({status.get('gateway_lost_after_s')} s); "
                         "their open calls are ended with reason gateway-lost by the persister")
    return "\n".join(lines)


def status_command(settings: Settings, *, as_json: bool = False) -> int:
    try:
        status = asyncio.run(collect_status(settings))
    except (RedisError, OSError) as exc:
        print(f"earshot status: Redis at {mask_url(settings.redis_url)} is unreachable: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2, default=str) if as_json else render_status(status))
    return 0

"""Prometheus metrics for one gateway.

Per-packet counts are not Prometheus counters (a lock per packet at 25,000
packets/s is real cost): the RTP receivers keep plain integers and a custom
collector sums them at scrape time.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, float]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        s = self._snapshot()
        yield GaugeMetricFamily("earshot_active_calls", "Calls currently up", value=s.get("active_calls", 0))
        yield GaugeMetricFamily("earshot_publish_backlog", "Events waiting to reach Redis",
                                value=s.get("publish_backlog", 0))
        yield GaugeMetricFamily("earshot_draining", "1 while shutting down", value=s.get("draining", 0))
        yield GaugeMetricFamily("earshot_asr_queue", "ASR requests waiting", value=s.get("asr_queued", 0))
        if "persister_db_up" in s:
            yield GaugeMetricFamily("earshot_persister_db_up", "1 while the SQL store is reachable",
                                    value=s["persister_db_up"])
        for name, help_text in (
            ("rtp_packets", "RTP packets accepted"),
            ("rtp_lost_packets", "RTP packets declared lost (concealed with silence)"),
            ("rtp_late_packets", "RTP packets that arrived after their slot was played"),
            ("rtp_duplicate_packets", "Duplicate RTP packets"),
            ("rtp_foreign_packets", "RTP packets from a source other than the latched one"),
            ("rtp_malformed_packets", "Datagrams on RTP ports that were not valid RTP"),
            ("rtp_rtcp_packets", "RTCP packets read and ignored"),
            ("sip_messages_in", "SIP messages received"),
            ("sip_messages_out", "SIP messages sent"),
            ("sip_malformed", "Malformed SIP messages"),
            ("sip_tcp_idle_closed", "SIP TCP connections closed after sip_tcp_idle_s without traffic"),
            ("published_events", "Events written to Redis"),
            ("dropped_partials", "Partial transcripts dropped because the publish buffer was full"),
            ("asr_batches", "Whisper model calls"),
            ("asr_batched", "ASR requests that shared a model call with another call's"),
            ("asr_overloaded", "Finals decoded with the short window because of a backlog"),
            ("persister_stored", "Events written to the SQL store"),
            ("persister_duplicates", "Replayed events the SQL store already had"),
            ("persister_poison", "Unreadable events skipped by the persister"),
            ("persister_db_failures", "Failed SQL transactions (retried)"),
        ):
            yield CounterMetricFamily(f"earshot_{name}", help_text, value=s.get(name, 0))


class Metrics:
    def __init__(self, snapshot: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SnapshotCollector(snapshot))
        self.calls = Counter("earshot_calls", "Calls offered, by outcome", ["outcome"], registry=self.registry)
        self.turns = Counter("earshot_turns", "Turns finalised, by reason", ["reason"], registry=self.registry)
        self.vad_tick = Histogram(
            "earshot_vad_tick_seconds", "Time of one batched VAD inference",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.032, 0.05, 0.1), registry=self.registry)
        self.vad_batch = Gauge("earshot_vad_batch_size", "Streams in the last VAD batch", registry=self.registry)
        self.turn_latency = Histogram(
            "earshot_turn_latency_seconds", "End of speech to turn.final written to Redis",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.asr_seconds = Histogram(
            "earshot_asr_seconds", "ASR processing time per request", ["kind"],
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0), registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

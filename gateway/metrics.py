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
        yield GaugeMetricFamily("earshot_active_sessions", "API sessions currently open (Realtime, REST, Twilio, WebRTC)",
                                value=s.get("active_sessions", 0))
        yield GaugeMetricFamily("earshot_publish_backlog", "Events waiting to reach Redis",
                                value=s.get("publish_backlog", 0))
        yield GaugeMetricFamily("earshot_draining", "1 while shutting down", value=s.get("draining", 0))
        yield GaugeMetricFamily("earshot_asr_queue", "ASR requests waiting", value=s.get("asr_queued", 0))
        # durable publishing (docs/events.md, Delivery)
        for name, help_text in (
            ("publish_spooled", "Events waiting in the publish spool file"),
            ("publish_spool_bytes", "Size of the publish spool file"),
            ("publish_spool_full", "1 while the publish spool is at publish_spool_max_mb (events are refused)"),
            ("publish_spool_ok", "0 when a spool file was configured but cannot be used (held, unwritable)"),
            ("stream_trim_held", "Entries over stream_maxlen kept because the persister group has not read them"),
        ):
            yield GaugeMetricFamily(f"earshot_{name}", help_text, value=s.get(name, 0))
        if "persister_lag" in s:
            yield GaugeMetricFamily("earshot_persister_lag", "Event stream entries the persister group has not "
                                    "acknowledged yet (undelivered + pending)", value=s["persister_lag"])
        for name, help_text in (
            ("publish_refused", "Events lost because the publish buffer and the spool were both full"),
            ("publish_replayed", "Events published from the spool"),
            ("publish_duplicates", "Events sent again (retry, replay) that Redis already had: not written twice"),
            ("stream_trimmed_unread", "Event stream entries found trimmed before the persister group read them"),
        ):
            yield CounterMetricFamily(f"earshot_{name}", help_text, value=s.get(name, 0))
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
            ("rtp_overrun_samples", "Audio samples dropped for running ahead of wall-clock time (8 kHz)"),
            ("dtmf_dropped", "DTMF events over the per-call cap (dtmf_max_per_s, dtmf_max_per_call), not published"),
            ("sip_messages_in", "SIP messages received"),
            ("sip_messages_out", "SIP messages sent"),
            ("sip_malformed", "Malformed SIP messages"),
            ("sip_tcp_idle_closed", "SIP TCP connections closed after sip_tcp_idle_s without traffic"),
            ("sip_unknown_source", "SIP requests from outside every trunk, dropped or refused with 403 (sip_unknown_source)"),
            ("sip_rate_limited", "SIP messages dropped for a source's rate limits (sip_*_rate, sip_source_*_per_s)"),
            ("sip_blocked", "SIP messages ignored from sources on the short block list (sip_block_s)"),
            ("sip_unsent_unverified", "SIP responses not sent to an unverified source: they would exceed what it sent"),
            ("sip_auth_failures", "SIP digest answers refused (wrong credentials, replayed or foreign nonce)"),
            ("sip_tcp_refused", "SIP TCP/TLS connections refused: over 1024 in all or sip_tcp_max_per_ip from one address"),
            ("sip_tls_handshake_failures", "SIP TLS handshakes that failed, or lacked a client certificate the trunk requires"),
            ("srtp_packets", "SRTP packets authenticated and decrypted"),
            ("srtp_auth_failures", "Datagrams on SRTP calls that failed authentication (wrong key, tampered, plain RTP)"),
            ("srtp_replayed", "SRTP packets refused by replay protection"),
            ("srtp_errors", "Datagrams on SRTP calls libsrtp refused otherwise (too short, too long)"),
            ("published_events", "Events written to Redis"),
            ("dropped_partials", "Partial transcripts dropped because the publish buffer was full"),
            ("asr_batches", "Whisper model calls"),
            ("asr_batched", "ASR requests that shared a model call with another call's"),
            ("asr_overloaded", "Finals decoded with the short window because of a backlog"),
            ("persister_stored", "Events written to the SQL store"),
            ("persister_duplicates", "Replayed events the SQL store already had"),
            ("persister_poison", "Unreadable events skipped by the persister"),
            ("persister_trimmed", "Pending entries trimmed from the stream before the persister stored them"),
            ("persister_db_failures", "Failed SQL transactions (retried)"),
        ):
            yield CounterMetricFamily(f"earshot_{name}", help_text, value=s.get(name, 0))
        errors = CounterMetricFamily("earshot_turn_errors", "Finals published with an error, by its code",
                                     labels=["error"])
        for code, count in sorted(s.get("turn_errors", {}).items()):
            errors.add_metric([code], count)
        yield errors
        if "asr_pool_workers" in s:
            yield GaugeMetricFamily("earshot_asr_pool_workers", "Live ASR pool workers (by their heartbeats)",
                                    value=s["asr_pool_workers"])
        for name, help_text in (
            ("asr_remote_sent", "Jobs sent to the ASR pool, by kind"),
            ("asr_remote_requests", "Requests sent to the OpenAI-compatible server, by kind"),
            ("asr_remote_timeouts", "Remote ASR requests that got no result by their deadline, by kind"),
        ):
            if name in s:
                family = CounterMetricFamily(f"earshot_{name}", help_text, labels=["kind"])
                for kind, count in sorted(s[name].items()):
                    family.add_metric([kind], count)
                yield family
        for name, help_text in (
            ("asr_remote_results", "Results received from the remote ASR backend"),
            ("asr_remote_duplicates", "Second results for a job already answered (a reclaimed job done twice)"),
            ("asr_remote_late", "Results that came after their request timed out or was withdrawn"),
            ("asr_remote_superseded", "Partials superseded before their result came"),
            ("asr_remote_cancelled", "Remote requests withdrawn by the call (speech resumed)"),
            ("asr_remote_remote_errors", "Error replies from pool workers"),
            ("asr_remote_resent", "Pool jobs sent again after Redis restarted"),
            ("asr_remote_send_failures", "Failed attempts to send a pool job (retried until its deadline)"),
            ("asr_remote_bad_replies", "Unreadable pool replies"),
            ("asr_remote_errors", "Failed requests to the OpenAI-compatible server"),
            ("asr_remote_gated", "Requests the energy gate answered as silence without sending them"),
        ):
            if name in s:
                yield CounterMetricFamily(f"earshot_{name}", help_text, value=s[name])


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
        # the dialplan in force (docs/dialplan.md): 1 on its version's label; reloads by result (ok, refused)
        self.dialplan_version = Gauge("earshot_dialplan_version", "The dialplan version in force (label)",
                                      ["version"], registry=self.registry)
        self.dialplan_reloads = Counter("earshot_dialplan_reloads", "Dialplan reloads, by result", ["result"],
                                        registry=self.registry)
        # call recordings that failed (docs/recordings.md), by reason: queue-full, disk-full, write-error
        self.recording_failures = Counter("earshot_recording_failures", "Call recordings given up, by reason",
                                          ["reason"], registry=self.registry)
        self.turn_latency = Histogram(
            "earshot_turn_latency_seconds", "End of speech to turn.final written to Redis",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.asr_seconds = Histogram(
            "earshot_asr_seconds", "ASR processing time per request", ["kind"],
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0), registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

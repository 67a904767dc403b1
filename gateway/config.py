"""Gateway settings: defaults, a YAML file, and ``EARSHOT_<NAME>`` environment variables.

Every setting has one flat name (``sip_port``, ``redis_url``...). The file may use
those names directly or group them in sections (``sip: {port: 5060}`` is
``sip_port``). Precedence: defaults < file < environment. Every value is checked
here, once, so that a mistake is reported with where it came from (file and line,
or the variable name) instead of surfacing later as an odd failure deep in a call.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .yamlfile import compose_file, scalar
from .trunks import Trunk, TrunkError, describe_trunk, parse_trunks, trunks_from_node

ENV_PREFIX = "EARSHOT_"
# EARSHOT_* variables that are not settings: the file itself, the split-wheel model cache
# (gateway/asr/models.py) and the tests' Redis.
NOT_SETTINGS = frozenset({"EARSHOT_CONFIG", "EARSHOT_CACHE_DIR", "EARSHOT_TEST_REDIS_URL"})


class ConfigError(ValueError):
    """A setting is invalid; the message names the setting and where it came from."""


@dataclass(frozen=True)
class Settings:
    # SIP
    sip_host: str = "0.0.0.0"
    sip_port: int = 5060
    sip_udp: bool = True
    sip_tcp: bool = True
    sip_advertise_host: str = ""  # Contact/SDP address; empty: the address the caller dialled
    sip_user_agent: str = "Earshot"
    sip_tcp_idle_s: float = 300.0  # close SIP TCP connections with no traffic for this long; 0: never
    # SIP over TLS and SRTP (docs/tls-srtp.md)
    sip_tls: bool = False  # listen for SIP over TLS on sip_tls_port (needs sip_tls_cert_file)
    sip_tls_port: int = 5061
    sip_tls_cert_file: str = ""  # PEM certificate chain (ours first)
    sip_tls_key_file: str = ""  # PEM private key, unencrypted; empty: in sip_tls_cert_file
    sip_tls_ca_file: str = ""  # PEM CAs: verifies client certificates (trunks' tls_client_cert) and peers we dial
    sip_tcp_max_per_ip: int = 32  # SIP TCP + TLS connections one IP address may hold (of the 1024 in all)
    srtp_sdes_insecure: bool = False  # accept SDES keys (a=crypto) over unencrypted SIP (UDP/TCP); they are readable
    # SIP admission control: trunks, digest auth, rate limits (README "Trunks and security", docs/sip.md)
    trunks: tuple[Trunk, ...] = ()  # the peers calls are taken from; empty: loopback only (trunk "loopback")
    sip_unknown_source: str = "drop"  # requests from outside every trunk: drop (silently) or 403 (once, never resent)
    sip_max_unacked: int = 16  # answered calls from not yet verified sources still waiting for their ACK
    sip_invite_rate: float = 20.0  # INVITEs per second one source address may send (burst: as many)
    sip_options_rate: float = 5.0  # OPTIONS per second per source
    sip_register_rate: float = 2.0  # REGISTER per second per source (refused with 405 anyway)
    sip_source_msgs_per_s: int = 200  # SIP messages per second per source, before parsing
    sip_source_bytes_per_s: int = 262_144  # SIP bytes per second per source, before parsing
    sip_block_s: float = 10.0  # an unverified source over its limits is ignored this long
    sip_auth_nonce_s: float = 300.0  # a digest nonce is good this long (then stale=true)
    sip_auth_failures: int = 5  # wrong credentials per source in a minute before it gets only 403
    sip_loopback_verified: bool = True  # loopback sources count as verified (the kernel drops spoofed ones)
    # RTP
    rtp_host: str = "0.0.0.0"
    rtp_port_min: int = 10000
    rtp_port_max: int = 20000
    rtp_jitter_ms: int = 60
    media_timeout_s: float = 30.0
    # bounded media and calls (README "Call limits"): latch, call length, hold, session timers, DTMF, backlog
    rtp_latch: str = "strict"  # strict: media only from the SDP address or the SIP peer's; any: also a stranger after 1 s
    max_call_s: float = 14_400.0  # every call ends (BYE, reason max-duration) after this long
    hold_timeout_s: float = 3_600.0  # a held call (sendonly, inactive, c=0.0.0.0) ends after this long (hold-timeout)
    session_expires_s: int = 1_800  # RFC 4028 session interval we grant at most (refresher=uac)
    session_min_se_s: int = 90  # shorter Session-Expires gets 422 with this Min-SE
    dtmf_max_per_s: float = 20.0  # DTMF events per second per call (burst: as many); more are dropped; 0: no cap
    dtmf_max_per_call: int = 1_000  # DTMF events per call in all; 0: no cap
    media_backlog_s: float = 10.0  # audio a call may have waiting for the VAD; older audio is dropped (as silence)
    # capacity and shutdown
    max_calls: int = 500
    retry_after_s: int = 30
    drain_timeout_s: float = 30.0
    # HTTP (health, metrics)
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Redis Streams output
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream_prefix: str = "earshot"
    stream_maxlen: int = 100_000
    call_stream_maxlen: int = 2_000
    call_stream_ttl_s: int = 86_400
    publish_buffer: int = 100_000  # events held in memory; more (and any while Redis is down) go to the spool
    # durable publishing: the spool, and trimming that spares the persister (docs/events.md, Delivery)
    publish_spool_file: str = ""  # empty: next to the SQLite database (<db>.spool), else ./earshot-events.spool
    publish_spool_max_mb: int = 1024  # spool size cap; when reached, events are refused (and counted)
    publish_spool_after_s: float = 5.0  # Redis unreachable this long: waiting events move to the spool
    # ASR: where turns are transcribed
    asr_backend: str = "embedded"  # embedded: in this process; pool: `earshot worker`s via Redis; openai: an HTTP server
    asr_final_timeout_s: float = 15.0  # a final with no result by then is published with error asr-timeout
    asr_partial_timeout_s: float = 2.0  # a partial with no result by then is dropped
    # ASR model and engine (the embedded backend and `earshot worker`)
    asr_model: str = "tiny.en"  # benchmarks only: "none" transcribes nothing, "stub" answers placeholder words at once
    asr_device: str = "auto"
    asr_compute_type: str = "default"  # default: int8 on CPU, float16 on GPU
    asr_threads: int = 0
    asr_decoder_threads: int = 1  # CPU: decode on a second model instance with this many threads; 0: share (docs/asr.md)
    asr_workers: int = 1
    asr_window: str = "auto"
    asr_language: str = ""  # empty: the model's own (English for .en models, else detect)
    asr_local_files_only: bool = False
    asr_partials: bool = True
    asr_max_batch: int = 2  # finals (or partials) of several calls decoded in one model call
    asr_batch_wait_ms: float = 0.0  # wait up to this long for a batch to fill; 0: never wait (docs/gpu.md)
    asr_overload_backlog: int = 8  # more finals waiting than this: finals use the short window; 0: never
    asr_context_tokens: int = 32  # decode each turn conditioned on this many tokens of the leg's earlier text; 0: off
    asr_beam_size: int = 2  # beam search width for finals (1: greedy); partials are greedy (docs/asr.md)
    asr_context_audio_s: float = 10.0  # finals hear up to this much of the leg's previous turns first; 0: off
    # ASR pool (asr_backend: pool, and `earshot worker`): job streams <stream_prefix>:asr:jobs:{final,partial}
    asr_pool_group: str = "earshot-asr"  # the workers' consumer group
    asr_pool_claim_idle_s: float = 5.0  # a job held this long by a worker that stopped answering is redone elsewhere
    asr_pool_heartbeat_s: float = 2.0  # workers and gateways write a heartbeat this often (gone after 3 missed)
    asr_pool_prefetch: int = 0  # jobs a worker holds beyond those running; 0: asr_max_batch per thread
    asr_pool_max_deliveries: int = 3  # a job delivered this often without an answer is answered with an error
    asr_pool_stream_maxlen: int = 100_000  # cap on each job stream (approximate MAXLEN)
    asr_pool_session_limit: int = 4  # jobs of one call (per kind) in Redis at once; more wait in the gateway
    # ASR over an OpenAI-compatible /v1/audio/transcriptions server (asr_backend: openai)
    asr_openai_url: str = ""  # base URL, e.g. http://asr.example:8000/v1
    asr_openai_api_key: str = ""
    asr_openai_model: str = "whisper-1"
    asr_openai_concurrency: int = 4  # requests in flight at once
    asr_openai_partials: bool = False  # also send partials (one HTTP request each)
    # this process in the pool and in `earshot status`
    instance_id: str = ""  # gateway instance id (its ASR reply stream, its heartbeat); empty: <host>-<pid>-<random>
    worker_id: str = ""  # `earshot worker` id; empty: <host>-<pid>-<random>
    worker_http_host: str = "127.0.0.1"  # `earshot worker` /healthz and /metrics
    worker_http_port: int = 8090
    # audio, VAD and turns
    resampler: str = "polyphase"
    vad_threshold: float = 0.5
    silence_ms: int = 500
    min_speech_ms: int = 250
    pad_before_ms: int = 300
    pad_after_ms: int = 100
    speculative_ms: int = 100
    max_turn_s: float = 20.0
    partial_interval_ms: int = 1000
    # what ends a turn (docs/turns.md): silence: silence_ms of it; semantic: an end-of-turn model
    # (Smart Turn) asked at each pause of semantic_min_silence_ms, up to semantic_max_silence_ms
    turn_detection: str = "silence"
    semantic_min_silence_ms: int = 150  # a pause this long asks the model (and starts the speculative final)
    semantic_max_silence_ms: int = 1500  # a pause this long ends the turn whatever the model said
    semantic_threshold: float = 0.5  # P(complete) at or above ends the turn
    semantic_text: bool = True  # a "complete" also needs the speculative final's text not to read as unfinished
    # SQL store (transcripts for the dashboard) and the persister that fills it
    database_url: str = "sqlite:///earshot.db"  # or postgresql+psycopg://user:password@host/dbname
    persist: bool = True  # run the persister inside `earshot run`
    database_migrate: bool = True  # `earshot run` upgrades the schema at start (as `earshot db upgrade`)
    persister_group: str = "earshot-persister"
    persister_consumer: str = ""  # empty: <hostname>-<pid>
    persister_batch: int = 200  # events per read and per transaction
    persister_claim_idle_s: float = 60.0  # take over entries pending this long in a dead consumer
    # a gateway instance silent this long is lost: its open calls end with reason gateway-lost (gateway/instances.py)
    gateway_lost_after_s: float = 60.0
    # consumers act on calls through <stream_prefix>:control (docs/consumers.md): transfer, hangup, pause, resume
    call_control: bool = True
    # dashboard and JSON API, served by the HTTP server at /
    web_enabled: bool = True
    web_secret_key: str = ""  # signs session cookies; empty: generated once and kept in web_secret_file
    web_secret_file: str = ""  # empty: next to the SQLite database (<db>.web-secret), else ./earshot-web.secret
    web_session_ttl_s: int = 43_200  # a login lasts 12 hours
    web_cookie_secure: bool = False  # true when the dashboard is served over HTTPS (behind a TLS proxy)
    web_live_window_s: float = 14_400.0  # on start, rebuild the live board from this much of the event stream
    web_sse_queue: int = 256  # events buffered per SSE connection; a client further behind is disconnected
    web_stream_recheck_s: float = 10.0  # a live stream re-checks its login/token this often; logged out: it ends
    web_assist: bool = True  # the live call view shows agent-assist suggestions from <stream_prefix>:assist
    # streaming and REST APIs (/v1/realtime, /v1/audio/*, /twilio/media, /v1/whip), served by the HTTP server
    api_enabled: bool = True
    api_auth: bool = True  # every API call needs an API token (Authorization: Bearer); false only for trusted networks
    api_sessions_per_token: int = 50  # open streaming sessions per token; max_calls bounds all of them
    api_max_upload_mb: int = 200  # largest file POST /v1/audio/transcriptions takes
    twilio_auth_token: str = ""  # Twilio account's auth token: accept streams signed by Twilio (X-Twilio-Signature)
    webrtc_ice_servers: str = ""  # WHIP: STUN/TURN URLs, comma-separated; empty: host candidates only (no lookups)
    # PCI redaction of transcripts before any sink: Redis, SQL, APIs, logs (docs/redaction.md)
    redact: str = "pci"  # pci: card numbers, CVV, expiry and SSNs become [REDACTED:...]; off: a deliberate choice
    redact_hold_ms: int = 3000  # a final ending in digits that may start a card number waits this long for the next
    # call recordings (docs/recordings.md): a WAV per call, a channel per leg, card details muted
    recordings_dir: str = ""  # where recordings go; empty: no recordings (a call asked to record says so in call.ended)
    record: bool = False  # record every call; a dialplan rule or profile's record: true|false decides per call
    recording_retention_days: int = 90  # recordings older than this are removed (at start and hourly); 0: kept
    # process
    event_loop: str = "auto"  # auto: uvloop if installed, else asyncio; or "asyncio" / "uvloop"
    # routing and logging
    dialplan: str = ""  # path; empty: dialplans/default.yaml if present, else accept every call
    dialplan_poll_s: float = 2.0  # how often the dialplan file is checked for changes (reloaded); 0: SIGHUP only
    log_level: str = "info"

    def validate(self) -> None:
        """Every number against its range (``RANGES``), then the checks of single values
        and between fields."""
        _check_ranges(self)
        _check(1 <= self.sip_port <= 65535, "sip_port", "must be 1..65535")
        _check(self.sip_tcp_idle_s == 0 or self.sip_tcp_idle_s >= 1, "sip_tcp_idle_s", "must be 0 (never) or at least 1 second")
        # SIP over TLS and SRTP
        _check(not self.sip_tls or bool(self.sip_tls_cert_file), "sip_tls_cert_file",
               "required when sip_tls is true (a PEM certificate chain)")
        _check(not self.sip_tls or self.sip_tls_port == 0 or self.sip_tls_port != self.sip_port
               or not self.sip_tcp, "sip_tls_port", "must differ from sip_port (TCP listens there)")
        for trunk in (t for t in self.trunks if isinstance(t, Trunk)):  # their shape is checked below
            _check(not trunk.tls_client_cert or (self.sip_tls and bool(self.sip_tls_ca_file)), "trunks",
                   f"{trunk.name}: tls_client_cert needs sip_tls: true and sip_tls_ca_file (the CA that signs "
                   "the trunks' client certificates)")
            _check(trunk.srtp != "required" or self.sip_tls or self.srtp_sdes_insecure, "trunks",
                   f"{trunk.name}: srtp: required needs sip_tls: true (SDES keys are taken over TLS only) "
                   "or srtp_sdes_insecure: true")
        # SIP admission control
        _check(self.sip_unknown_source in ("drop", "403"), "sip_unknown_source", "must be drop or 403")
        _check(all(isinstance(t, Trunk) for t in self.trunks), "trunks", "must be a list of trunks")
        # durable publishing
        _check(not self.publish_spool_file or not Path(self.publish_spool_file).is_dir(), "publish_spool_file",
               "must be a file path, not a directory")
        _check(0 <= self.http_port <= 65535, "http_port", "must be 0..65535")
        _check(
            1024 <= self.rtp_port_min < self.rtp_port_max <= 65535,
            "rtp_port_min/rtp_port_max",
            "need 1024 <= rtp_port_min < rtp_port_max <= 65535",
        )
        _check(self.max_calls >= 1, "max_calls", "must be at least 1")
        first_even = self.rtp_port_min + (self.rtp_port_min & 1)  # as RtpPortAllocator counts pairs
        _check(
            first_even + 1 <= self.rtp_port_max,
            "rtp_port_min/rtp_port_max",
            "the range holds no RTP/RTCP port pair (an even port and the next)",
        )
        _check(0.0 < self.vad_threshold < 1.0, "vad_threshold", "must be between 0 and 1")
        _check(self.silence_ms >= 64, "silence_ms", "must be at least 64 (two VAD chunks)")
        _check(
            self.pad_after_ms <= self.speculative_ms < self.silence_ms,
            "speculative_ms",
            "need pad_after_ms <= speculative_ms < silence_ms",
        )
        _check(self.max_turn_s >= 2.0, "max_turn_s", "must be at least 2 seconds")
        _check(self.turn_detection in ("silence", "semantic"), "turn_detection", "must be silence or semantic")
        _check(self.semantic_min_silence_ms < self.semantic_max_silence_ms, "semantic_min_silence_ms",
               "need semantic_min_silence_ms < semantic_max_silence_ms")
        _check(self.turn_detection != "semantic" or self.pad_after_ms <= self.semantic_min_silence_ms,
               "semantic_min_silence_ms", "need pad_after_ms <= semantic_min_silence_ms (turn_detection: semantic)")
        _check(self.media_timeout_s > 0, "media_timeout_s", "must be positive")
        # bounded media and calls
        _check(self.rtp_latch in ("strict", "any"), "rtp_latch", "must be strict or any")
        _check(self.session_min_se_s <= self.session_expires_s, "session_min_se_s",
               "need session_min_se_s <= session_expires_s")
        _check(self.hold_timeout_s <= self.max_call_s, "hold_timeout_s", "need hold_timeout_s <= max_call_s")
        _check(self.resampler in ("polyphase", "ratecv", "soxr"), "resampler",
               "must be one of polyphase, ratecv, soxr")
        _check(self.log_level.lower() in ("debug", "info", "warning", "error"), "log_level",
               "must be one of debug, info, warning, error")
        _check(self.asr_backend in ("embedded", "pool", "openai"), "asr_backend",
               "must be embedded, pool or openai")
        _check(_finite(self.asr_final_timeout_s) and 0.5 <= self.asr_final_timeout_s <= 600, "asr_final_timeout_s",
               "must be 0.5 to 600 seconds")
        _check(_finite(self.asr_partial_timeout_s) and 0.1 <= self.asr_partial_timeout_s <= 60,
               "asr_partial_timeout_s", "must be 0.1 to 60 seconds")
        _check(_finite(self.asr_batch_wait_ms) and 0 <= self.asr_batch_wait_ms <= 1000, "asr_batch_wait_ms",
               "must be 0 (never wait) to 1000 ms")
        _check(bool(self.asr_pool_group.strip()), "asr_pool_group", "must not be empty")
        _check(_finite(self.asr_pool_claim_idle_s) and 0.5 <= self.asr_pool_claim_idle_s <= 3600,
               "asr_pool_claim_idle_s", "must be 0.5 to 3600 seconds")
        _check(_finite(self.asr_pool_heartbeat_s) and 0.1 <= self.asr_pool_heartbeat_s <= 60,
               "asr_pool_heartbeat_s", "must be 0.1 to 60 seconds")
        _check(0 <= self.asr_pool_prefetch <= 4096, "asr_pool_prefetch", "must be 0 (automatic) to 4096")
        _check(1 <= self.asr_pool_max_deliveries <= 100, "asr_pool_max_deliveries", "must be 1 to 100")
        _check(self.asr_pool_stream_maxlen >= 1000, "asr_pool_stream_maxlen", "must be at least 1000")
        _check(1 <= self.asr_pool_session_limit <= 1024, "asr_pool_session_limit", "must be 1 to 1024")
        _check(1 <= self.asr_openai_concurrency <= 256, "asr_openai_concurrency", "must be 1 to 256")
        _check(self.asr_backend != "openai" or self.asr_openai_url.startswith(("http://", "https://")),
               "asr_openai_url", "must be an http:// or https:// base URL (e.g. http://host:8000/v1) "
               "when asr_backend is openai")
        _check(all(url.strip().startswith(("stun:", "stuns:", "turn:", "turns:"))
                   for url in self.webrtc_ice_servers.split(",") if url.strip()),
               "webrtc_ice_servers", "must be stun: / turn: URLs, comma-separated (e.g. stun:stun.example.com:3478)")
        _check(0 <= self.worker_http_port <= 65535, "worker_http_port", "must be 0..65535")
        _check(self.asr_workers >= 1, "asr_workers", "must be at least 1")
        _check(self.asr_max_batch >= 1, "asr_max_batch", "must be at least 1")
        _check(self.asr_overload_backlog >= 0, "asr_overload_backlog", "must be 0 (off) or more")
        _check(0 <= self.asr_decoder_threads <= 64, "asr_decoder_threads", "must be 0 (share the encoder's) to 64")
        _check(1 <= self.asr_beam_size <= 10, "asr_beam_size", "must be 1 (greedy) to 10")
        _check(0 <= self.asr_context_tokens <= 223, "asr_context_tokens", "must be 0 (off) to 223")
        _check(0.0 <= self.asr_context_audio_s <= 20.0, "asr_context_audio_s", "must be 0 (off) to 20 seconds")
        _check(self.event_loop in ("auto", "asyncio", "uvloop"), "event_loop", "must be auto, asyncio or uvloop")
        _check(self.database_url.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql")
               and "://" in self.database_url, "database_url",
               "must be sqlite:///FILE or postgresql+psycopg://USER:PASSWORD@HOST/DBNAME")
        _check(bool(self.persister_group.strip()), "persister_group", "must not be empty")
        _check(self.persister_batch >= 1, "persister_batch", "must be at least 1")
        _check(self.persister_claim_idle_s > 0, "persister_claim_idle_s", "must be positive")
        _check(_finite(self.gateway_lost_after_s) and 1 <= self.gateway_lost_after_s <= 86_400
               and self.gateway_lost_after_s > 3 * self.asr_pool_heartbeat_s, "gateway_lost_after_s",
               "must be 1 to 86400 seconds and longer than 3 heartbeats (asr_pool_heartbeat_s)")
        _check(self.web_session_ttl_s >= 60, "web_session_ttl_s", "must be at least 60 seconds")
        _check(not self.web_secret_key or len(self.web_secret_key) >= 16, "web_secret_key",
               "must have at least 16 characters (or be empty to use a generated one)")
        _check(self.web_live_window_s > 0, "web_live_window_s", "must be positive")
        _check(self.web_sse_queue >= 8, "web_sse_queue", "must be at least 8")
        # PCI redaction
        _check(self.redact in ("pci", "off"), "redact", "must be pci (redact card numbers, the default) or off")
        _check(not self.record or bool(self.recordings_dir), "recordings_dir",
               "required when record is true (the directory recordings are written to)")
        if self.asr_window not in ("auto", "short"):
            try:
                ok = 1.0 <= float(self.asr_window) <= 30.0
            except ValueError:
                ok = False
            _check(ok, "asr_window", "must be 'auto', 'short' or seconds between 1 and 30")

    @property
    def asr_pool_names(self):  # -> gateway.asr.remote.wire.PoolNames (imported lazily: config stays light)
        from .asr.remote.wire import PoolNames

        return PoolNames(self.stream_prefix, self.asr_pool_group)

    @property
    def events_stream(self) -> str:
        return f"{self.stream_prefix}:events"

    def call_stream(self, call_id: str) -> str:
        return f"{self.stream_prefix}:call:{call_id}"


# The allowed range (inclusive) of every number setting. validate() refuses NaN, infinities
# and anything outside, naming the field; a number setting missing here fails at import.
RANGES: dict[str, tuple[float, float]] = {
    "dialplan_poll_s": (0, 3600),
    "sip_port": (1, 65535),
    "sip_tcp_idle_s": (0, 86_400),
    "sip_tls_port": (0, 65535),
    "sip_tcp_max_per_ip": (1, 100_000),
    "sip_max_unacked": (1, 100_000),
    "sip_invite_rate": (0.1, 100_000),
    "sip_options_rate": (0.1, 100_000),
    "sip_register_rate": (0.1, 100_000),
    "sip_source_msgs_per_s": (10, 10_000_000),
    "sip_source_bytes_per_s": (65_536, 10_000_000_000),
    "sip_block_s": (0, 3600),
    "sip_auth_nonce_s": (10, 86_400),
    "sip_auth_failures": (1, 1000),
    "rtp_port_min": (1024, 65535),
    "rtp_port_max": (1024, 65535),
    "rtp_jitter_ms": (0, 1000),
    "media_timeout_s": (1, 3600),
    "max_call_s": (1, 604_800),
    "hold_timeout_s": (1, 604_800),
    "session_expires_s": (90, 86_400),
    "session_min_se_s": (90, 86_400),
    "dtmf_max_per_s": (0, 1000),
    "dtmf_max_per_call": (0, 1_000_000),
    "media_backlog_s": (1, 600),
    "max_calls": (1, 100_000),
    "retry_after_s": (1, 3600),
    "drain_timeout_s": (0, 3600),
    "http_port": (0, 65535),
    "stream_maxlen": (1000, 1_000_000_000),
    "call_stream_maxlen": (100, 10_000_000),
    "call_stream_ttl_s": (60, 2_592_000),
    "publish_buffer": (1000, 100_000_000),
    # durable publishing
    "publish_spool_max_mb": (1, 1_000_000),
    "publish_spool_after_s": (0, 3600),
    "asr_final_timeout_s": (0.5, 600),
    "asr_partial_timeout_s": (0.1, 60),
    "asr_threads": (0, 256),
    "asr_decoder_threads": (0, 64),
    "asr_workers": (1, 64),
    "asr_max_batch": (1, 256),
    "asr_batch_wait_ms": (0, 1000),
    "asr_overload_backlog": (0, 100_000),
    "asr_context_tokens": (0, 223),
    "asr_beam_size": (1, 10),
    "asr_context_audio_s": (0, 20),
    "asr_pool_claim_idle_s": (0.5, 3600),
    "asr_pool_heartbeat_s": (0.1, 60),
    "asr_pool_prefetch": (0, 4096),
    "asr_pool_max_deliveries": (1, 100),
    "asr_pool_stream_maxlen": (1000, 1_000_000_000),
    "asr_pool_session_limit": (1, 1024),
    "asr_openai_concurrency": (1, 256),
    "worker_http_port": (0, 65535),
    "vad_threshold": (0.01, 0.99),
    "silence_ms": (64, 10_000),
    "min_speech_ms": (32, 10_000),
    "pad_before_ms": (0, 2000),
    "pad_after_ms": (0, 2000),
    "speculative_ms": (0, 10_000),
    "max_turn_s": (2, 120),
    "partial_interval_ms": (100, 60_000),
    "semantic_min_silence_ms": (32, 10_000),
    "semantic_max_silence_ms": (64, 30_000),
    "semantic_threshold": (0, 1),
    "persister_batch": (1, 10_000),
    "persister_claim_idle_s": (1, 86_400),
    "gateway_lost_after_s": (1, 86_400),
    "web_session_ttl_s": (60, 2_592_000),
    "web_live_window_s": (60, 604_800),
    "web_sse_queue": (8, 100_000),
    "web_stream_recheck_s": (0.1, 300),
    "redact_hold_ms": (0, 10_000),
    "recording_retention_days": (0, 36_500),
    "api_sessions_per_token": (1, 100_000),
    "api_max_upload_mb": (1, 10_000),
}


def state_file(database_url: str, configured: str, suffix: str, fallback: str) -> Path:
    """Where a piece of local state lives (the web secret, the publisher's spool): the setting if
    given, else beside the SQLite file (``earshot.db`` + ``suffix``), else ``fallback`` in the
    working directory."""
    if configured:
        return Path(configured)
    if database_url.startswith("sqlite:///"):
        db = Path(database_url[len("sqlite:///"):].split("?", 1)[0])
        return db.with_name(db.name + suffix)
    return Path(fallback)


def _check_ranges(settings: "Settings") -> None:
    for name, (low, high) in RANGES.items():
        value = getattr(settings, name)
        if not _finite(value) or not low <= value <= high:
            raise ConfigError(f"{name}: must be a number from {low:g} to {high:g}, got {value!r}")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


_FIELDS = {f.name: f for f in fields(Settings)}
_UNRANGED = {name for name, f in _FIELDS.items() if f.type in ("int", "float")} ^ set(RANGES)
if _UNRANGED:
    raise RuntimeError(f"gateway.config.RANGES and Settings disagree on {sorted(_UNRANGED)}")


def _coerce(name: str, raw: Any, where: str) -> Any:
    """Turn a file or environment value into the field's type, or explain why not."""
    kind = _FIELDS[name].type
    if name == "redact" and isinstance(raw, bool):  # YAML 1.1 reads an unquoted off / on as false / true
        return "pci" if raw else "off"
    if name == "trunks":
        try:
            return parse_trunks(raw, where)
        except TrunkError as exc:
            raise ConfigError(str(exc)) from None
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(str(raw).strip()) if not isinstance(raw, (int, float)) else int(raw)
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if raw is None:
            return ""
        if isinstance(raw, (dict, list)):
            raise ValueError
        return str(raw)
    except (TypeError, ValueError):
        expected = {"bool": "true or false", "int": "an integer", "float": "a number"}.get(kind, "a string")
        raise ConfigError(f"{where}: {name}: expected {expected}, got {raw!r}") from None


def _flatten(node: yaml.Node, path: str, prefix: str, out: dict[str, tuple[Any, str]]) -> None:
    """Flatten a YAML mapping into {setting: (value, "file line N")}."""
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path} line {node.start_mark.line + 1}: expected a mapping of settings")
    for key_node, value_node in node.value:
        key = str(key_node.value).strip().replace("-", "_").lower()
        name = f"{prefix}{key}"
        where = f"{path} line {key_node.start_mark.line + 1}"
        if isinstance(value_node, yaml.MappingNode) and name not in _FIELDS:
            _flatten(value_node, path, f"{name}_", out)
            continue
        if name not in _FIELDS:
            raise ConfigError(f"{where}: unknown setting {name!r}")
        if name == "trunks":  # structured: parsed here so each entry's errors name its own line
            try:
                out[name] = (trunks_from_node(value_node, path), where)
            except TrunkError as exc:
                raise ConfigError(str(exc)) from None
            continue
        value = scalar(value_node)
        out[name] = (value, where)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build validated settings from defaults, an optional YAML file and the environment."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(f"{ENV_PREFIX}CONFIG"):
        path = environ[f"{ENV_PREFIX}CONFIG"]
    values: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        root = compose_file(file, ConfigError, "configuration file")
        if root is not None:
            found: dict[str, tuple[Any, str]] = {}
            _flatten(root, str(file), "", found)
            for name, (raw, where) in found.items():
                values[name] = _coerce(name, raw, where)
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in NOT_SETTINGS:
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in _FIELDS:
            raise ConfigError(f"environment variable {key}: unknown setting {name!r}")
        if any("\udc80" <= c <= "\udcff" for c in raw):  # os.environ keeps bytes that are not UTF-8 so
            raise ConfigError(f"environment variable {key}: not UTF-8 text")
        values[name] = _coerce(name, raw, f"environment variable {key}")
    for name, raw in overrides.items():
        if raw is not None:
            values[name] = _coerce(name, raw, "command line")
    settings = Settings(**values)
    try:
        settings.validate()
    except ConfigError as exc:
        origin = " (from the file and environment given)" if path or values else ""
        raise ConfigError(f"{exc}{origin}") from None
    return settings


def describe(settings: Settings) -> dict[str, Any]:
    """The effective settings as a plain dict (for `earshot config`), secrets masked (:func:`masked`)."""
    out = masked(dataclasses.asdict(settings))
    out["trunks"] = [describe_trunk(t) for t in settings.trunks]  # JSON-safe, passwords masked
    return out


# -- secrets in what is printed and logged (`earshot config`, start-up lines) -- web/config area
MASK = "***"
# settings whose whole value is a secret; names ending in these suffixes are too (trunk
# passwords, keys added later), so a new secret is masked without being listed here
SECRET_SETTINGS = frozenset({"web_secret_key", "asr_openai_api_key", "twilio_auth_token"})
SECRET_SUFFIXES = ("password", "secret", "secret_key", "api_key", "auth_token", "token")
# query parameters that carry credentials in a URL (?password=..., ?token=...)
_SECRET_QUERY = ("password", "passwd", "pass", "secret", "token", "key", "api_key", "apikey", "auth")


def is_secret(name: str) -> bool:
    name = name.lower()
    return name in SECRET_SETTINGS or name.endswith(SECRET_SUFFIXES)


def mask_url(url: str) -> str:
    """``url`` with any password (``scheme://user:PASSWORD@host``) and credential query
    parameters replaced by ``***``; the user name, host and path stay, so the URL still
    says where it points. Not a URL: returned as is (it holds no ``user:password@``)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}{':' + MASK if colon else ''}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_QUERY for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in _SECRET_QUERY else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing to hide (and sqlite:///file keeps its three slashes)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def masked(value: Any, name: str = "") -> Any:
    """A settings dict (or any value under ``name``) with secrets as ``***`` (empty ones stay
    empty, so a missing secret still shows) and passwords in URLs masked; nested dicts and
    lists (trunks) are walked, their keys judged the same way."""
    if isinstance(value, dict):
        return {k: masked(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(masked(v, name) for v in value)
    if isinstance(value, str) and value:
        if is_secret(name):
            return MASK
        if "://" in value:
            return mask_url(value)
    return value

"""The gateway: wires SIP, RTP, VAD, ASR and the publisher together.

Everything runs on one asyncio loop except the heavy numeric work: batched VAD
inference and Whisper run in their own threads (onnxruntime and CTranslate2
release the GIL), so packet handling never waits behind a model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__, sdp
from .asr.factory import build_transcriber
from .asr.interface import Transcriber, TranscriptionResult
from .call import Call
from .config import Settings, mask_url
from .dialplan import Dialplan, DialplanError, Route, load_dialplan
from .dialplan_watch import DialplanSource, ReloadResult
from .events import SIP_KINDS, TURN_FINAL, Source
from .http import HttpServer, build_app
from .identity import identity
from .instances import registry_key
from .media.turn import TurnConfig
from .media.vad import BatchedVadRunner, SileroVad
from .metrics import Metrics
from .presence import Heartbeat, default_instance_id, read_presence
from .publisher import Publisher
from .spool import spool_file_for
from .output.recording import RecordingWriter
from .session import LegSpec, SessionHost
from .rtp.receiver import RtpReceiver
from .rtp.transport import NoFreePortError, RtpPortAllocator, open_rtp_socket
from .sip.events import (
    CallCancelled,
    CallConfirmed,
    CallEnded,
    IncomingCall,
    MalformedMessage,
    ReferNotify,
    ReferResponse,
    ReInvite,
    ReInviteAck,
    SessionRefreshed,
)
from .sip.message import NameAddress, SipRequest, SipUri
from .sip.transport import SipEndpoint
from .sip.admission import Admission, AdmissionConfig
from .sip import session_timer
from .sip.useragent import UserAgent
from .tasks import stop_tasks
from .trunks import Trunk, TrunkTable
from .rtp.srtp import SrtpContext
from .tlsconfig import load_sip_tls

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.02  # jitter-buffer release cadence
# ReceiverStats fields summed over ended and active calls for /metrics
RTP_TOTALS = ("packets", "lost_packets", "late", "duplicates", "foreign_dropped", "malformed", "rtcp", "overrun",
              "dtmf_dropped")
TIMEOUT_CHECK_INTERVAL = 0.5
SRTP_TOTALS = ("packets", "auth_failures", "replayed", "errors")  # SrtpStats fields for /metrics


def turn_config(settings: Settings) -> TurnConfig:
    return TurnConfig(
        threshold=settings.vad_threshold,
        silence_ms=settings.silence_ms,
        min_speech_ms=settings.min_speech_ms,
        pad_before_ms=settings.pad_before_ms,
        pad_after_ms=settings.pad_after_ms,
        speculative_ms=settings.speculative_ms,
        max_turn_s=settings.max_turn_s,
        partial_interval_ms=settings.partial_interval_ms if partials_enabled(settings) else 0,
        policy=settings.turn_detection,  # type: ignore[arg-type]  # validated: silence or semantic
        semantic_min_silence_ms=settings.semantic_min_silence_ms,
        semantic_max_silence_ms=settings.semantic_max_silence_ms,
        semantic_threshold=settings.semantic_threshold,
        semantic_text=settings.semantic_text,
    )


def _load_smart_turn() -> Any:
    from .media.endofturn import EndOfTurnRunner, SmartTurn  # onnxruntime session: only when used

    return EndOfTurnRunner(SmartTurn())


class EndOfTurnModel:
    """The gateway's one end-of-turn model (Smart Turn and its batching runner), shared by every leg.

    Loaded by :meth:`start` when ``turn_detection`` is ``semantic``, so that a missing model
    stops the gateway at start rather than every turn waiting out ``semantic_max_silence_ms``;
    otherwise the first question loads it (a Realtime session with ``semantic_vad``), in a
    thread, once: a load that failed is not retried, its error answers every later question
    (and the legs fall back to the silence bound). Called like ``EndOfTurnRunner.probability``.
    """

    def __init__(self, load: Callable[[], Any] = _load_smart_turn) -> None:
        self._load = load
        self._loading: asyncio.Future[Any] | None = None
        self.runner: Any = None  # gateway.media.endofturn.EndOfTurnRunner once loaded
        self.closed = False

    async def start(self) -> None:
        await self._get()

    async def __call__(self, audio16k: np.ndarray) -> float:
        runner = self.runner if self.runner is not None else await self._get()
        return await runner.probability(audio16k)

    async def _get(self) -> Any:
        if self.closed:
            raise RuntimeError("the end-of-turn model is closed")
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load_once())
        return await asyncio.shield(self._loading)

    async def _load_once(self) -> Any:
        log.info("loading the end-of-turn model (Smart Turn)")
        try:
            runner = await asyncio.to_thread(self._load)
        except Exception as exc:
            log.error("could not load the end-of-turn model: %s; semantic turns end after "
                      "semantic_max_silence_ms", exc)
            raise
        if self.closed:  # closed while loading
            runner.close()
            raise RuntimeError("the end-of-turn model is closed")
        self.runner = runner
        return runner

    def close(self) -> None:
        self.closed = True
        if self.runner is not None:
            self.runner.close()
            self.runner = None


def default_dialplan(settings: Settings) -> Dialplan:
    if settings.dialplan:
        return load_dialplan(settings.dialplan)
    bundled = Path("dialplans/default.yaml")
    if bundled.is_file():
        return load_dialplan(bundled)
    return Dialplan.accept_all()


def admission_config(settings: Settings) -> AdmissionConfig:
    return AdmissionConfig(
        unknown_source=settings.sip_unknown_source,
        max_unacked=settings.sip_max_unacked,
        invite_rate=settings.sip_invite_rate,
        options_rate=settings.sip_options_rate,
        register_rate=settings.sip_register_rate,
        msgs_per_s=settings.sip_source_msgs_per_s,
        bytes_per_s=settings.sip_source_bytes_per_s,
        block_s=settings.sip_block_s,
        nonce_ttl=settings.sip_auth_nonce_s,
        auth_failures=settings.sip_auth_failures,
        loopback_verified=settings.sip_loopback_verified,
    )


def partials_enabled(settings: Settings) -> bool:
    """Partials are asked for unless switched off; over HTTP only when asked for (one request each)."""
    return settings.asr_partials and (settings.asr_backend != "openai" or settings.asr_openai_partials)


def dialplan_path(settings: Settings) -> str | None:
    """The file the dialplan comes from (and is reloaded from); None: every call accepted."""
    if settings.dialplan:
        return settings.dialplan
    return "dialplans/default.yaml" if Path("dialplans/default.yaml").is_file() else None


def served_models(settings: Settings) -> frozenset[str]:
    """The model names a dialplan profile may ask for: the one model this gateway transcribes with."""
    if settings.asr_backend == "openai":
        return frozenset({settings.asr_openai_model})
    return frozenset({settings.asr_model})


def call_partials(settings: Settings, route: Route) -> bool:
    """A profile's ``partials`` overrides ``asr_partials``; over HTTP still only with asr_openai_partials."""
    wanted = settings.asr_partials if route.partials is None else route.partials
    return wanted and (settings.asr_backend != "openai" or settings.asr_openai_partials)


def call_turn_config(settings: Settings, route: Route) -> TurnConfig:
    """The turn settings of a call on ``route``: the gateway's, with the profile's silence
    threshold and partial interval. A shorter silence than ``speculative_ms`` pulls the
    speculative final in (to one VAD chunk before the end, not under ``pad_after_ms``);
    ValueError when the threshold cannot hold ``pad_after_ms`` (validate_dialplan refuses it)."""
    base = turn_config(settings)
    changes: dict[str, Any] = {}
    if route.silence_ms is not None:
        changes["silence_ms"] = route.silence_ms
        if base.speculative_ms >= route.silence_ms:
            changes["speculative_ms"] = max(base.pad_after_ms, route.silence_ms - 32)
    if not call_partials(settings, route):
        changes["partial_interval_ms"] = 0
    elif route.partial_interval_ms is not None:
        changes["partial_interval_ms"] = route.partial_interval_ms
    elif base.partial_interval_ms == 0:  # partials switched on by the profile, off in the settings
        changes["partial_interval_ms"] = settings.partial_interval_ms
    return dataclasses.replace(base, **changes) if changes else base


def validate_dialplan(settings: Settings, plan: Dialplan, *, models: bool = True) -> None:
    """What only the gateway can check of a plan: its models, and its profiles' turn settings."""
    if models:
        plan.check_models(served_models(settings))
    for rule in plan.rules:
        if rule.route.action != "transcribe":
            continue
        try:
            call_turn_config(settings, rule.route)
        except ValueError as exc:
            line = rule.line or 1
            raise DialplanError(f"{plan.source} line {line}: rule {rule.name!r}: {exc}", path=plan.source,
                                line=line, detail=f"rule {rule.name!r}: {exc}") from None


@dataclass(frozen=True)
class _Media:
    """What the receiver needs to know about the negotiated audio stream."""

    remote_host: str
    remote_port: int | None
    codecs: dict[int, str]
    dtmf_payload_type: int | None
    codec: str
    on_hold: bool

    @classmethod
    def from_negotiated(cls, n: sdp.Negotiated) -> "_Media":
        return cls(n.remote_host, n.remote_port, {n.payload_type: n.codec}, n.dtmf_payload_type, n.codec, n.on_hold)

    @classmethod
    def provisional(cls) -> "_Media":
        """Before the answer of a delayed-offer call: both G.711 laws, any source."""
        return cls("0.0.0.0", None, {0: "PCMU", 8: "PCMA"}, 101, "PCMU", False)


class Gateway:
    def __init__(
        self,
        settings: Settings,
        *,
        transcriber: Transcriber | None = None,
        dialplan: Dialplan | None = None,
    ) -> None:
        self.settings = settings
        self.transcriber = transcriber
        self.instance_id = settings.instance_id or default_instance_id()
        self.started_at = time.time()
        # the plan in force for new calls (reloaded on SIGHUP and file change: gateway/dialplan_watch.py)
        self.dialplan_source = self._dialplan_source(dialplan)
        self.dialplan = self.dialplan_source.plan
        self._limit_calls: dict[str, set[str]] = {}  # Route.limit_key -> dialog ids (a profile's max_calls)
        self._sighup_loop: asyncio.AbstractEventLoop | None = None  # where reload_on_sighup installed its handler
        self.calls: dict[str, Call] = {}
        self._setting_up: dict[str, bool] = {}  # dialog id -> cancelled?
        self._ending: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.metrics = Metrics(self._snapshot)
        self.publisher = Publisher(
            settings.redis_url,
            events_stream=settings.events_stream,
            call_stream=settings.call_stream,
            maxlen=settings.stream_maxlen,
            call_maxlen=settings.call_stream_maxlen,
            call_ttl_s=settings.call_stream_ttl_s,
            buffer_limit=settings.publish_buffer,
            on_published=self._on_published,
            spool_path=spool_file_for(settings.database_url, settings.publish_spool_file),
            spool_max_bytes=settings.publish_spool_max_mb << 20,
            spool_after_s=settings.publish_spool_after_s,
            protect_group=settings.persister_group,
            origin=self.instance_id,
        )
        self.ports = RtpPortAllocator(settings.rtp_port_min, settings.rtp_port_max)
        self.admission = Admission(TrunkTable(settings.trunks), admission_config(settings))
        self._trunk_calls: dict[str, set[str]] = {}  # trunk name -> dialog ids of its calls (per-trunk max_calls)
        self.ua = UserAgent(local_host=settings.sip_advertise_host or settings.sip_host,
                            local_port=settings.sip_port, user_agent=settings.sip_user_agent,
                            admission=self.admission, session_expires=settings.session_expires_s,
                            min_se=settings.session_min_se_s)
        self.sip = SipEndpoint(self.ua, self._on_sip_event)
        self.sip.tcp_idle_timeout = settings.sip_tcp_idle_s
        self.sip.max_connections_per_ip = settings.sip_tcp_max_per_ip
        self.tls = load_sip_tls(settings)  # certificate problems stop the gateway here, named
        if self.tls is not None:
            self.sip.tls_client_context = self.tls.client
            self.sip.client_cert_required = self._client_cert_required
            self.ua.local_tls_port = settings.sip_tls_port
        self.vad: SileroVad | None = None
        self.vad_runner: BatchedVadRunner | None = None
        self.http: HttpServer | None = None
        self.persister: Any = None
        self.dashboard: Any = None
        self._ended_rtp: dict[str, int] = {}
        self._presence_client: Any = None
        self.heartbeat: Heartbeat | None = None
        self.asr_workers: int | None = None  # live pool workers, from their heartbeats (pool backend only)
        self.turn_errors: dict[str, int] = {}
        self.sessions: SessionHost | None = None  # non-SIP sessions (streaming APIs, uploads)
        self.api: Any = None
        self.end_of_turn = EndOfTurnModel()  # the semantic turn policy's model (loaded when needed)
        self.control: Any = None  # the call-control stream's reader (gateway/callcontrol.py)
        self.recordings: RecordingWriter | None = None  # call recordings (recordings_dir set)

    # -- life cycle
    async def start(self) -> None:
        s = self.settings
        if self.transcriber is None:
            if s.asr_backend == "embedded":
                log.info("loading ASR model %s", s.asr_model)
            self.transcriber = await asyncio.to_thread(build_transcriber, s, instance=self.instance_id)
        start_transcriber = getattr(self.transcriber, "start", None)
        if start_transcriber is not None:
            await start_transcriber()
        self.vad = SileroVad()
        self.vad_runner = BatchedVadRunner(self.vad)
        self.vad_runner.on_tick = self._on_vad_tick
        self._spawn(self.vad_runner.run())
        self.metrics.dialplan_version.labels(self.dialplan.version).set(1)
        log.info("dialplan %s: version %s in force: %s", self.dialplan_source.path or "<built-in>",
                 self.dialplan.version, self.dialplan.summary())
        if self.dialplan_source.path is not None and s.dialplan_poll_s > 0:
            self._spawn(self._watch_dialplan(s.dialplan_poll_s))
        if s.turn_detection == "semantic":
            await self.end_of_turn.start()
        if s.recordings_dir:  # docs/recordings.md; the start sweep runs here, then hourly in its thread
            self.recordings = RecordingWriter(s.recordings_dir, retention_days=s.recording_retention_days,
                                              on_failure=lambda reason: self.metrics.recording_failures.labels(reason).inc())
            await asyncio.to_thread(self.recordings.start)
        self.sessions = SessionHost(s, vad_runner=self.vad_runner, transcriber=self.transcriber,
                                    publish=self.publisher.publish, capacity=self._free_slots,
                                    on_final=self._on_final, turn_config=turn_config(s),
                                    partials=partials_enabled(s), end_of_turn=self.end_of_turn,
                                    recordings=self.recordings)
        self.sessions.instance = self.instance_id
        await self.publisher.start()
        if s.persist:
            await self._start_persister()
        await self.sip.start(s.sip_host, s.sip_port, udp=s.sip_udp, tcp=s.sip_tcp)
        if s.sip_port == 0:  # tests: learn the real port for Contact headers
            self.ua.local_port = self.sip.udp_port if s.sip_udp else self.sip.tcp_port
        if self.tls is not None:
            await self.sip.start_tls(self.tls.server, s.sip_host, s.sip_tls_port)
            self.ua.local_tls_port = self.sip.tls_port
        web = None
        if s.web_enabled:
            from .web import Dashboard  # FastAPI, Jinja2: only when the dashboard is served

            self.dashboard = Dashboard(s)
            await self.dashboard.start()
            web = self.dashboard.asgi
        api = None
        if s.api_enabled:
            from .ingest.auth import ApiAuth, SessionLimits
            from .ingest.routes import ApiContext, api_routes

            self.api = ApiContext(s, self.sessions, ApiAuth(s, self.dashboard), SessionLimits(s.api_sessions_per_token),
                                  model_name=s.asr_model)
            api = api_routes(self.api)
        self.http = HttpServer(build_app(self.metrics, self._health, web=web, api=api), s.http_host, s.http_port)
        await self.http.start()
        self._spawn(self._poll_loop())
        await self._start_presence()
        if s.call_control:
            from .callcontrol import CallControl

            self.control = CallControl(self)
            await self.control.start()
        log.info("Earshot listening: SIP %s:%d (%s)%s, HTTP http://%s:%d, Redis %s",
                 s.sip_host, self.sip_port, "/".join(t for t, on in (("udp", s.sip_udp), ("tcp", s.sip_tcp)) if on),
                 f", SIP over TLS on {self.sip.tls_port}" if self.tls is not None else "",
                 s.http_host, self.http.port, mask_url(s.redis_url))

    async def _start_persister(self) -> None:
        from .persister import Persister  # SQLAlchemy: only when the store is used
        from .store import migrate

        if self.settings.database_migrate:
            try:
                await asyncio.to_thread(migrate.upgrade, self.settings.database_url)
            except Exception as exc:  # the persister retries until the schema exists
                log.error("could not migrate the database (%s); transcripts wait in Redis until it can", exc)
        self.persister = Persister.from_settings(self.settings)
        await self.persister.start()

    async def _start_presence(self) -> None:
        """This instance's heartbeat (for `earshot status`) and, with the pool, the live workers' count."""
        import redis.asyncio as aioredis

        s = self.settings
        self._presence_client = aioredis.Redis.from_url(s.redis_url, socket_timeout=5, socket_connect_timeout=2)
        names = s.asr_pool_names
        self.heartbeat = Heartbeat(self._presence_client, names.gateway(self.instance_id), s.asr_pool_heartbeat_s,
                                   self._describe, registry=registry_key(s.stream_prefix))
        await self.heartbeat.start()
        if s.asr_backend == "pool":
            self._spawn(self._watch_workers())

    async def _watch_workers(self) -> None:
        from redis.exceptions import RedisError

        pattern = self.settings.asr_pool_names.workers_pattern
        while True:
            try:
                self.asr_workers = len(await read_presence(self._presence_client, pattern))
            except (RedisError, OSError):
                self.asr_workers = None
            await asyncio.sleep(self.settings.asr_pool_heartbeat_s)

    def _describe(self) -> dict[str, Any]:
        return {
            "instance": self.instance_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "sip_port": self.sip_port,
            "http_port": self.http.port if self.http else self.settings.http_port,
            "active_calls": len(self.calls),
            "active_sessions": self._api_sessions(),
            "asr_backend": self.settings.asr_backend,
            "asr_backlog": int(getattr(self.transcriber, "queued", 0)),
            "draining": self.draining,
            "started": self.started_at,
            "version": __version__,
        }

    @property
    def sip_port(self) -> int:
        return self.sip.udp_port if self.settings.sip_udp else self.sip.tcp_port

    # -- the dialplan (docs/dialplan.md)
    def _dialplan_source(self, given: Dialplan | None) -> DialplanSource:
        """A plan given in code is watched if it came from a file; otherwise the configured file."""
        s = self.settings

        def validate(plan: Dialplan) -> None:
            validate_dialplan(s, plan)

        if given is not None:
            validate(given)
            path = given.source if Path(given.source).is_file() else None
            return DialplanSource(given, path, validate, self._on_dialplan)
        path = dialplan_path(s)
        if path is None:
            return DialplanSource(Dialplan.accept_all(), None, validate, self._on_dialplan)
        return DialplanSource.from_file(path, validate, self._on_dialplan)

    def reload_dialplan(self, reason: str = "SIGHUP") -> ReloadResult:
        """Load the dialplan file again (SIGHUP, file change). New calls get the new plan; active
        calls keep the route they started with; a bad file is refused and the old plan stays."""
        result = self.dialplan_source.reload(reason)
        self.dialplan = self.dialplan_source.plan
        return result

    def reload_on_sighup(self) -> None:
        """SIGHUP reloads the dialplan (``earshot run`` asks for it; close() takes the handler away)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload_dialplan, "SIGHUP")
        self._sighup_loop = loop

    async def _watch_dialplan(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if self.dialplan_source.changed():
                    self.reload_dialplan("file changed")
            except Exception:  # the watcher must outlive any one bad read
                log.exception("dialplan watch failed")

    def _on_dialplan(self, result: ReloadResult) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is None:  # the first load, before the metrics exist: start() reports it
            return
        metrics.dialplan_reloads.labels("ok" if result.ok else "refused").inc()
        if result.ok:
            metrics.dialplan_version.clear()
            metrics.dialplan_version.labels(result.version).set(1)

    async def drain(self, timeout: float | None = None) -> None:
        """Stop taking calls (503), let active ones finish, then end the rest cleanly."""
        timeout = self.settings.drain_timeout_s if timeout is None else timeout
        self.draining = True
        self.ua.draining, self.ua.draining_retry_after = True, self.settings.retry_after_s  # OPTIONS: 503
        if self.sessions is not None:
            self.sessions.draining = True
        log.info("draining: %d active calls, %d API sessions, up to %.0f s", len(self.calls),
                 self._api_sessions(), timeout)
        deadline = time.monotonic() + timeout
        while (self.calls or self._setting_up or self._api_sessions()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for call in list(self.calls.values()):
            self.end_call(call, "shutdown", hangup=True)
        if self.sessions is not None:
            await self.sessions.close("shutdown")
        if self._ending:
            await asyncio.gather(*self._ending.values(), return_exceptions=True)

    def _api_sessions(self) -> int:
        """Open sessions that are not SIP calls (those are counted in ``calls``)."""
        if self.sessions is None:
            return 0
        return sum(1 for session in self.sessions.sessions.values() if session.source.kind not in SIP_KINDS)

    def _free_slots(self) -> int:
        """Call slots left: SIP calls (answered or being set up) and API sessions share max_calls."""
        return self.settings.max_calls - len(self.calls) - len(self._setting_up) - self._api_sessions()

    async def close(self) -> None:
        if self._sighup_loop is not None:
            self._sighup_loop.remove_signal_handler(signal.SIGHUP)
            self._sighup_loop = None
        if not self.draining:
            await self.drain(0)
        if self.control is not None:
            await self.control.close()
        await self.sip.close()
        await stop_tasks(list(self._tasks), timeout=10.0)  # bounded, re-cancelled: gateway/tasks.py
        if self.vad_runner is not None:
            self.vad_runner.close()
        self.end_of_turn.close()
        await self.publisher.close()
        if self.persister is not None:
            await self.persister.close()
        if self.http is not None:
            await self.http.close()
        if self.dashboard is not None:
            await self.dashboard.close()
        if self.transcriber is not None:
            await self.transcriber.close()
        if self.recordings is not None:
            await asyncio.to_thread(self.recordings.close)
        if self.heartbeat is not None:
            await self.heartbeat.close()
        if self._presence_client is not None:
            await self._presence_client.aclose()

    # -- SIP events
    def _on_sip_event(self, event: object) -> None:
        if isinstance(event, IncomingCall):
            self._setting_up[event.dialog_id] = False
            self._spawn(self._incoming_counted(event))
        elif isinstance(event, CallConfirmed):
            self._on_confirmed(event)
        elif isinstance(event, ReInviteAck):
            call = self.calls.get(event.dialog_id)
            if call is not None and call.pending_offer is not None:
                self._take_answer(call, event.answer)
        elif isinstance(event, CallCancelled):
            if event.dialog_id in self._setting_up:
                self._setting_up[event.dialog_id] = True
                self.metrics.calls.labels("cancelled").inc()
            call = self.calls.get(event.dialog_id)
            if call is not None:
                self.end_call(call, "cancelled")
        elif isinstance(event, CallEnded):
            if self.control is not None:
                self.control.call_ended(event.dialog_id)
            if event.dialog_id in self._setting_up:
                self._setting_up[event.dialog_id] = True
            call = self.calls.get(event.dialog_id)
            if call is not None:
                self.end_call(call, event.reason)
        elif isinstance(event, ReInvite):
            self._reinvite(event)
        elif isinstance(event, SessionRefreshed):
            call = self.calls.get(event.dialog_id)
            if call is not None:  # RFC 4028: the caller refreshes; no refresh by then ends the call
                call.session_expires_at = (session_timer.bye_at(time.monotonic(), session_timer.SessionTimer(
                    event.interval)) if event.interval else None)
        elif isinstance(event, (ReferResponse, ReferNotify)):
            if self.control is not None:  # a transfer's progress (gateway/callcontrol.py)
                self.control.on_sip_event(event)
        elif isinstance(event, MalformedMessage):
            log.debug("malformed SIP from %s: %s", event.peer, event.reason)

    def _client_cert_required(self, host: str) -> bool:
        trunk = self.admission.trunks.match(host)
        return trunk is not None and trunk.tls_client_cert

    def _srtp_policy(self, trunk: Trunk | None, transport: str) -> tuple[str, str]:
        """The SRTP policy for a call from ``trunk`` over ``transport``, and, when SDES had
        to be switched off for it, why.  SDES keys travel in the SDP: over UDP or TCP anyone
        on the path reads them, so they are taken only over TLS unless srtp_sdes_insecure."""
        wanted = trunk.srtp if trunk is not None else "optional"
        if wanted == "off" or transport == "tls" or self.settings.srtp_sdes_insecure:
            return wanted, ""
        return "off", (f"SRTP keys (SDES) are accepted over SIP over TLS only, not {transport.upper()} "
                       "(srtp_sdes_insecure)")

    def _reject(self, dialog_id: str, status: int, reason: str | None = None,
                headers: list[tuple[str, str]] | None = None, outcome: str = "rejected") -> None:
        self._setting_up.pop(dialog_id, None)
        self.ua.reject(dialog_id, status, reason, headers or [], now=time.monotonic())
        self.sip.flush()
        self.metrics.calls.labels(outcome).inc()

    async def _incoming_counted(self, event: IncomingCall) -> None:
        """``_incoming``, then free the trunk's slot if the call was not taken."""
        try:
            await self._incoming(event)
        finally:
            if event.dialog_id not in self.calls and event.trunk is not None:
                self._trunk_calls.get(event.trunk.name, set()).discard(event.dialog_id)
            if event.dialog_id not in self.calls:
                for taken in self._limit_calls.values():
                    taken.discard(event.dialog_id)

    async def _incoming(self, event: IncomingCall) -> None:
        s = self.settings
        dialog_id = event.dialog_id
        retry_after = [("Retry-After", str(s.retry_after_s))]
        if self.draining:
            self._reject(dialog_id, 503, "Service Unavailable - Shutting Down", retry_after, "draining")
            return
        if len(self.calls) + len(self._setting_up) - 1 + self._api_sessions() >= s.max_calls:
            self._reject(dialog_id, 503, "Service Unavailable - Call Limit Reached", retry_after, "overload")
            return
        trunk = event.trunk
        if trunk is not None:
            taken = self._trunk_calls.setdefault(trunk.name, set())
            if trunk.max_calls and len(taken) >= trunk.max_calls:
                self._reject(dialog_id, 503, "Service Unavailable - Trunk Call Limit Reached", retry_after, "overload")
                return
            taken.add(dialog_id)
        request = event.request
        from_uri, from_user = _party(request, "From")
        to_uri, to_user = _party(request, "To")
        # caller-controlled: cleaned once here (gateway/identity.py), before the dialplan, events and logs see them
        from_uri, from_user, to_uri, to_user = map(identity, (from_uri, from_user, to_uri, to_user))
        # the route is this call's for good: a reload from here on changes nothing for it
        route = self.dialplan.route(to_uri=to_uri, from_uri=from_uri, to_user=to_user, from_user=from_user,
                                    source=event.peer.host, trunk=trunk.name if trunk is not None else "",
                                    ruri_user=identity(_uri_user(request.uri)), siprec=event.siprec,
                                    headers=request.headers)
        if route.action == "reject":
            self._reject(dialog_id, route.status, route.reason, outcome="dialplan")
            return
        if route.max_calls is not None:
            limited = self._limit_calls.setdefault(route.limit_key, set())
            if len(limited) >= route.max_calls:
                self._reject(dialog_id, 503, "Service Unavailable - Profile Call Limit Reached", retry_after,
                             "overload")
                return
            limited.add(dialog_id)
        if event.siprec:  # a SIPREC recording call: one leg per recorded stream (gateway/srs.py)
            from . import srs

            await srs.answer(self, event, route, trunk, from_uri, to_uri)
            return
        local_host = self.ua.local_host_for(request)
        session_id = random.randrange(1, 2**31)
        srtp_policy, srtp_refusal = self._srtp_policy(trunk, event.peer.transport)
        if srtp_refusal and trunk is not None and trunk.srtp == "required":
            self._reject(dialog_id, 488, f"Not Acceptable Here - {srtp_refusal}", outcome="srtp")
            return
        offer: sdp.SessionDescription | None = None
        if event.offer.strip():
            try:
                offer = sdp.SessionDescription.parse(event.offer)
                # codec and SRTP check before a port is taken
                sdp.negotiate(offer, local_host=local_host, local_port=9, session_id=session_id, session_version=1,
                              srtp=srtp_policy)
            except sdp.SrtpNotAcceptable as exc:
                self._reject(dialog_id, 488, f"Not Acceptable Here - {srtp_refusal or exc.reason}", outcome="srtp")
                return
            except sdp.NoAcceptableCodec as exc:
                self._reject(dialog_id, 488, f"Not Acceptable Here - {exc.reason}", outcome="no-codec")
                return
            except sdp.SdpError as exc:
                self._reject(dialog_id, 400, f"Bad Request - Malformed SDP: {exc.reason}", outcome="bad-sdp")
                return
        holder: list[Call] = []
        try:
            rtp_socket = await open_rtp_socket(
                s.rtp_host, self.ports, lambda data, addr: holder[0].on_datagram(data, addr) if holder else None)
        except (OSError, NoFreePortError) as exc:
            log.error("no RTP port for a new call: %s", exc)
            self._reject(dialog_id, 503, "Service Unavailable - No RTP Port", retry_after, "overload")
            return
        srtp_keys: sdp.SrtpKeys | None = None
        if offer is not None:
            negotiated = sdp.negotiate(offer, local_host=local_host, local_port=rtp_socket.port,
                                       session_id=session_id, session_version=1, srtp=srtp_policy)
            media = _Media.from_negotiated(negotiated)
            body = negotiated.answer.to_bytes()
            our_offer = None
            srtp_keys = negotiated.srtp
        else:
            # delayed offer (e.g. Cisco CUCM): we offer in the 200, the answer comes in the ACK
            our_offer = sdp.build_offer(local_host=local_host, local_port=rtp_socket.port, session_id=session_id,
                                        session_version=1, srtp=srtp_policy)
            media = _Media.provisional()
            body = our_offer.to_bytes()
        call = self._make_call(event, route, media, rtp_socket.port, session_id, from_uri, to_uri)
        call.socket = rtp_socket
        call.pending_offer = our_offer
        call.srtp_policy = srtp_policy
        _apply_srtp(call, srtp_keys)
        holder.append(call)
        if self._setting_up.pop(dialog_id, False):  # cancelled while we were setting up
            rtp_socket.close()
            return
        self.calls[dialog_id] = call
        now = time.monotonic()
        call.answered_at = now
        if not self.ua.answer(dialog_id, body, now):  # lost a race with CANCEL
            self.sip.flush()
            self.calls.pop(dialog_id, None)
            rtp_socket.close()
            return
        self.sip.flush()
        self.metrics.calls.labels("answered").inc()
        assert self.sessions is not None
        if call.srtp is not None:
            log.info("call %s: SRTP %s", call.call_id, call.srtp.suite.name)
        started: dict[str, Any] = {
            "codec": media.codec,
            "local_media_port": rtp_socket.port,
            "transport": event.peer.transport,
            **route.started_fields,  # dialplan_rule, dialplan_version, dialplan_profile
            "trunk": trunk.name if trunk is not None else "",
        }
        if offer is not None:
            started["remote_media"] = f"{media.remote_host}:{media.remote_port}"
        sip_call_id = identity(request.headers.get("Call-ID") or "")
        call.session = self.sessions.open(
            Source("sip", (("call_id", sip_call_id), ("transport", event.peer.transport))), [LegSpec(route.leg)],
            session_id=call.call_id, sip_call_id=sip_call_id, from_uri=from_uri, to_uri=to_uri,
            language=call.language, tags=route.tags, started=started, origin_ms=call.origin_ms, admit=False,
            redact=route.redact, turn_config=call_turn_config(s, route), partials=call_partials(s, route),
            record=route.record)

    def _make_call(self, event: IncomingCall, route: Route, media: "_Media", port: int,
                   session_id: int, from_uri: str, to_uri: str) -> Call:
        s = self.settings
        receiver = RtpReceiver(
            expected_host=media.remote_host,
            expected_port=media.remote_port,
            codecs=media.codecs,
            dtmf_payload_type=media.dtmf_payload_type,
            jitter_delay=s.rtp_jitter_ms / 1000.0,
            signalling_host=event.peer.host,
            latch=s.rtp_latch,
            dtmf_per_second=s.dtmf_max_per_s,
            dtmf_per_call=s.dtmf_max_per_call,
        )
        return Call(
            call_id=str(uuid.uuid4()),
            dialog_id=event.dialog_id,
            leg=route.leg,
            receiver=receiver,
            answered_at=time.monotonic(),
            local_port=port,
            codec=media.codec,
            session_id=session_id,
            language=None if route.language == "auto" else route.language or s.asr_language or None,
            on_hold=media.on_hold,
            held_since=time.monotonic() if media.on_hold else None,
            clock=time.monotonic,
        )

    def _on_confirmed(self, event: CallConfirmed) -> None:
        call = self.calls.get(event.dialog_id)
        if call is None:
            return
        call.confirmed = True
        if call.pending_offer is not None:
            self._take_answer(call, event.answer)

    def _take_answer(self, call: Call, answer: bytes) -> None:
        """The peer's SDP answer to our offer (delayed-offer INVITE or offerless re-INVITE)."""
        offer, call.pending_offer = call.pending_offer, None
        assert offer is not None
        try:
            negotiated = sdp.read_answer(offer, sdp.SessionDescription.parse(answer))
        except sdp.SdpError as exc:
            log.warning("call %s: unusable SDP answer (%s); hanging up", call.call_id, exc.reason)
            self.end_call(call, "bad-sdp-answer", hangup=True)
            return
        _apply_srtp(call, negotiated.srtp)
        self._apply_media(call, _Media.from_negotiated(negotiated))

    def _apply_media(self, call: Call, media: "_Media") -> None:
        call.receiver.update(expected_host=media.remote_host, expected_port=media.remote_port,
                             codecs=media.codecs, dtmf_payload_type=media.dtmf_payload_type)
        call.codec = media.codec
        call.set_hold(media.on_hold, time.monotonic())

    def _reinvite(self, event: ReInvite) -> None:
        call = self.calls.get(event.dialog_id)
        now = time.monotonic()
        if call is None or call.ending:
            self.ua.reject_reinvite(event.dialog_id, 481, now)
            self.sip.flush()
            return
        if call.siprec:  # new metadata, a new or paused stream (gateway/srs.py)
            from . import srs

            self._spawn(srs.reinvite(self, call, event))
            return
        local_host = self.ua.local_host_for(event.request)
        if not event.offer.strip():  # offerless re-INVITE: offer in our 200, answer in the ACK
            call.sdp_version += 1
            call.pending_offer = sdp.build_offer(local_host=local_host, local_port=call.local_port,
                                                 session_id=call.session_id, session_version=call.sdp_version,
                                                 srtp=call.srtp_policy)
            self.ua.accept_reinvite(event.dialog_id, call.pending_offer.to_bytes(), now)
            self.sip.flush()
            return
        try:
            offer = sdp.SessionDescription.parse(event.offer)
            current = call.srtp
            keep = None if current is None else sdp.SrtpKeys(current.suite.name, current.receive_key,
                                                              current.send_key, 0)
            negotiated = sdp.negotiate(offer, local_host=local_host, local_port=call.local_port,
                                       session_id=call.session_id, session_version=call.sdp_version + 1,
                                       srtp=call.srtp_policy, keep_srtp=keep)
        except sdp.SdpError as exc:
            log.info("re-INVITE on %s refused: %s", call.call_id, exc.reason)
            self.ua.reject_reinvite(event.dialog_id, 488, now)
            self.sip.flush()
            return
        call.sdp_version += 1
        _apply_srtp(call, negotiated.srtp)
        self._apply_media(call, _Media.from_negotiated(negotiated))
        self.ua.accept_reinvite(event.dialog_id, negotiated.answer.to_bytes(), now)
        self.sip.flush()

    # -- ending calls
    def end_call(self, call: Call, reason: str, *, hangup: bool = False) -> None:
        if call.ending:
            return
        call.ending = True
        if hangup:
            self.ua.hangup(call.dialog_id, time.monotonic())
            self.sip.flush()
        task = asyncio.create_task(self._finish_call(call, reason))
        self._ending[call.dialog_id] = task
        task.add_done_callback(lambda _t, d=call.dialog_id: self._ending.pop(d, None))

    async def _finish_call(self, call: Call, reason: str) -> None:
        try:
            for rtp_socket in call.sockets():
                rtp_socket.close()
            call.flush_media(time.monotonic())
            stats = call.rtp_stats()  # a SIPREC call's streams summed
            for name in RTP_TOTALS:
                self._ended_rtp[name] = self._ended_rtp.get(name, 0) + getattr(stats, name)
            _add_srtp_totals(self._ended_rtp, call)
            if call.session is not None:
                # the leg's open speech is finalised and its finals published before call.ended
                await call.session.end(reason, {"rtp": {
                    "packets": stats.packets,
                    "lost": stats.lost_packets,
                    "late": stats.late,
                    "duplicates": stats.duplicates,
                    "foreign_dropped": stats.foreign_dropped,
                    "malformed": stats.malformed,
                }})
            self.metrics.calls.labels(f"ended-{reason}").inc()
        except Exception:
            log.exception("error while ending call %s", call.call_id)
        finally:
            for rtp_socket in call.sockets():
                rtp_socket.close()  # idempotent; returns the port to the allocator
            self.calls.pop(call.dialog_id, None)
            for taken in self._trunk_calls.values():
                taken.discard(call.dialog_id)
            for taken in self._limit_calls.values():
                taken.discard(call.dialog_id)

    # -- periodic work
    async def _poll_loop(self) -> None:
        next_timeout_check = 0.0
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            now = time.monotonic()
            for call in list(self.calls.values()):
                call.poll(now)
            if now >= next_timeout_check:
                next_timeout_check = now + TIMEOUT_CHECK_INTERVAL
                for call in list(self.calls.values()):
                    self._check_limits(call, now)

    def _check_limits(self, call: Call, now: float) -> None:
        """End a call that outlived its bounds: every call has one (a lost BYE must not leak it)."""
        if call.ending:
            return
        s = self.settings
        expired = call.expired(now, media_timeout=s.media_timeout_s, hold_timeout=s.hold_timeout_s,
                               max_duration=s.max_call_s)
        if expired is not None:
            log.info("call %s: %s, hanging up", call.call_id, expired)
            self.end_call(call, expired, hangup=True)

    # -- observability
    def _on_vad_tick(self, seconds: float, batch: int) -> None:
        self.metrics.vad_tick.observe(seconds)
        self.metrics.vad_batch.set(batch)

    def _on_final(self, reason: str, result: TranscriptionResult | None, error: str) -> None:
        self.metrics.turns.labels(reason).inc()
        if error:
            self.turn_errors[error] = self.turn_errors.get(error, 0) + 1
        if result is not None:
            self.metrics.asr_seconds.labels("final").observe(result.processing_seconds)

    def _on_published(self, event_type: str, latency: float) -> None:
        if event_type == TURN_FINAL and latency == latency:  # not NaN
            self.metrics.turn_latency.observe(latency)

    def _snapshot(self) -> dict[str, float]:
        totals = dict(self._ended_rtp)
        for call in self.calls.values():
            stats = call.rtp_stats()
            for name in RTP_TOTALS:
                totals[name] = totals.get(name, 0) + getattr(stats, name)
            _add_srtp_totals(totals, call)
        return {
            "active_calls": len(self.calls),
            "active_sessions": self._api_sessions(),
            "publish_backlog": self.publisher.backlog,
            "draining": 1.0 if self.draining else 0.0,
            "rtp_packets": totals.get("packets", 0),
            "rtp_lost_packets": totals.get("lost_packets", 0),
            "rtp_late_packets": totals.get("late", 0),
            "rtp_duplicate_packets": totals.get("duplicates", 0),
            "rtp_foreign_packets": totals.get("foreign_dropped", 0),
            "rtp_malformed_packets": totals.get("malformed", 0),
            "rtp_rtcp_packets": totals.get("rtcp", 0),
            "rtp_overrun_samples": totals.get("overrun", 0),
            "dtmf_dropped": totals.get("dtmf_dropped", 0),
            "sip_messages_in": self.sip.messages_in,
            "sip_messages_out": self.sip.messages_out,
            "sip_malformed": self.sip.malformed,
            "sip_tcp_idle_closed": self.sip.idle_closed,
            "sip_unknown_source": self.admission.dropped_unknown + self.admission.rejected_unknown,
            "sip_rate_limited": self.admission.dropped_rate,
            "sip_blocked": self.admission.dropped_blocked,
            "sip_unsent_unverified": self.admission.amplification_dropped,
            "sip_auth_failures": self.admission.auth_failed,
            "sip_tcp_refused": self.sip.refused_connections,
            "sip_tls_handshake_failures": self.sip.tls_handshake_failures,
            **{f"srtp_{name}": totals.get(f"srtp_{name}", 0) for name in SRTP_TOTALS},
            **self.publisher.snapshot(),  # published_events, dropped_partials, spool, trimming, persister_lag
            **(self.persister.snapshot() if self.persister is not None else {}),
            "asr_queued": float(getattr(self.transcriber, "queued", 0)),
            "asr_batches": float(getattr(self.transcriber, "batches", 0)),
            "asr_batched": float(getattr(self.transcriber, "batched", 0)),
            "asr_overloaded": float(getattr(self.transcriber, "overloaded", 0)),
            "turn_errors": dict(self.turn_errors),
            **self._asr_snapshot(),
        }

    def _asr_snapshot(self) -> dict[str, Any]:
        """The remote backends' counters (docs/gpu.md lists them)."""
        stats = getattr(self.transcriber, "stats", None)
        if stats is None:
            return {}
        out: dict[str, Any] = {}
        for name in ("sent", "requests", "timeouts"):
            value = getattr(stats, name, None)
            if value is not None:
                out[f"asr_remote_{name}"] = dict(value)
        for name in ("results", "duplicates", "late", "superseded", "cancelled", "remote_errors", "resent",
                     "send_failures", "bad_replies", "errors", "gated"):
            value = getattr(stats, name, None)
            if value is not None:
                out[f"asr_remote_{name}"] = value
        if self.asr_workers is not None:
            out["asr_pool_workers"] = self.asr_workers
        return out

    async def _health(self) -> dict[str, Any]:
        redis_ok = await self.publisher.ping()
        status = "draining" if self.draining else "ok"
        backend = self.settings.asr_backend
        health: dict[str, Any] = {
            "status": status,
            "instance": self.instance_id,
            "active_calls": len(self.calls),
            "active_sessions": self._api_sessions(),
            "redis": "ok" if redis_ok else "unreachable",
            "publish_backlog": self.publisher.backlog,
            "publish_spooled": self.publisher.spooled_backlog,
            "persister_lag": self.publisher.snapshot().get("persister_lag"),  # unacked by the group; None: unknown
            "asr_backend": backend,
            "asr": "ok",
        }
        if backend == "embedded":
            health["asr_model"] = self.settings.asr_model
        elif backend == "pool":
            health["asr_workers"] = self.asr_workers
            if not self.asr_workers:  # 0, or unknown while Redis is unreachable
                health["asr"] = "no-workers"
        elif backend == "openai":
            health["asr_url"] = self.settings.asr_openai_url
        return health

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())


def _add_srtp_totals(totals: dict[str, int], call: Call) -> None:
    if call.srtp is not None:
        for name in SRTP_TOTALS:
            key = f"srtp_{name}"
            totals[key] = totals.get(key, 0) + getattr(call.srtp.stats, name)


def _apply_srtp(call: Call, keys: sdp.SrtpKeys | None) -> None:
    """Key (or re-key, or stop) the call's SRTP after an offer/answer; unchanged keys keep
    the context, so its replay window and per-SSRC streams survive a hold re-INVITE."""
    current = call.srtp
    if keys is None:
        call.srtp = None
    elif current is None or (current.suite.name, current.receive_key, current.send_key) != (
            keys.suite, keys.remote_key, keys.local_key):
        call.srtp = SrtpContext(keys.suite, receive_key=keys.remote_key, send_key=keys.local_key)


def _uri_user(uri: str) -> str:
    """The user part of a sip:/sips: URI, or a tel: URI's number; "" otherwise."""
    scheme = uri.split(":", 1)[0].lower()
    if scheme == "tel":
        return uri[4:].split(";", 1)[0]
    if scheme not in ("sip", "sips"):
        return ""
    try:
        return SipUri.parse(uri).user or ""
    except ValueError:
        return ""


def _party(request: SipRequest, header: str) -> tuple[str, str]:
    """(URI, user part) of From or To; empty strings when unreadable."""
    value = request.headers.get(header) or ""
    try:
        address = NameAddress.parse(value)
    except ValueError:
        return value, ""
    uri = address.uri
    scheme = uri.split(":", 1)[0].lower()
    if scheme == "tel":  # tel:+15551234;phone-context=...: the number is what rules match
        return uri, uri[4:].split(";", 1)[0]
    if scheme not in ("sip", "sips"):
        return uri, ""
    try:
        return uri, SipUri.parse(uri).user or ""
    except ValueError:
        return uri, ""

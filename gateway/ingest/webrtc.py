"""WebRTC ingest over WHIP (RFC 9725): a browser or any WHIP client sends its microphone.

``POST /v1/whip`` takes an SDP offer (``Content-Type: application/sdp``) and answers
``201 Created`` with the SDP answer and ``Location: /v1/whip/<session id>``;
``DELETE`` on that URL ends the session. The session id is the call id of the
Earshot session, so the dashboard's live view (``/calls/<id>/stream``) and history
find it like any other call.

The server answers once ICE gathering is complete (no trickle ICE: PATCH gets 405,
as RFC 9725 section 4.3.1 asks of a server that supports neither trickle nor ICE
restarts). Without configured STUN/TURN servers (``webrtc_ice_servers``) only host
candidates are offered: nothing is looked up on the internet, which suits a gateway
on the same network as its users.

Media: each audio track's decoded frames (Opus at 48 kHz, as aiortc delivers them)
are resampled to 16 kHz mono and fed to the session's one wideband leg, ``caller``.
One audio stream is transcribed; other streams (video, a second audio) are
answered ``inactive`` so the peer does not send them.

aiortc is imported inside the functions that need it, so the package (and every other
API) still imports where aiortc is not installed; ``POST /v1/whip`` then answers 501.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..events import CALL_ENDED, Source
from ..session import LegSpec, SessionLimit
from .auth import Caller, LimitExceeded

if TYPE_CHECKING:
    from ..events import Event
    from ..session import Session
    from .routes import ApiContext

log = logging.getLogger(__name__)

WHIP_PATH = "/v1/whip"
SDP_TYPE = "application/sdp"
MAX_OFFER_BYTES = 65536
LEG = "caller"
END_WAIT_S = 30.0  # DELETE waits this long for the last turn's transcript before answering
DELETE_REASON = "client-closed"


class OfferError(Exception):
    """An offer refused before any media is set up: the HTTP status, a code and the reason."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "rate_limit_error" if status == 429 else \
        "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status,
                        headers=headers)


def check_offer(body: bytes, content_type: str | None) -> str:
    """The offer's SDP text, or :class:`OfferError` saying what is wrong with it.

    Syntax goes through Earshot's own SDP parser first (it names the bad line);
    then what WebRTC needs: an audio stream the peer sends, ICE credentials and a
    DTLS fingerprint.
    """
    from ..sdp import SdpError, parse_sdp

    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != SDP_TYPE:
        raise OfferError(415, "unsupported_media_type",
                         f"POST the SDP offer as Content-Type: {SDP_TYPE} (got {media_type or 'none'})")
    if not body.strip():
        raise OfferError(400, "empty_offer", "the request body is empty: POST the SDP offer")
    if len(body) > MAX_OFFER_BYTES:
        raise OfferError(413, "offer_too_large", f"the SDP offer is over {MAX_OFFER_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise OfferError(400, "invalid_sdp", "the SDP offer is not UTF-8 text") from None
    if not text.lstrip().startswith("v="):
        raise OfferError(400, "invalid_sdp", f"the body is not an SDP offer (SDP begins with v=0): {text[:40]!r}")
    try:
        sd = parse_sdp(body)
    except SdpError as exc:
        raise OfferError(400, "invalid_sdp", f"malformed SDP offer: {exc.reason}") from None
    audio = [m for m in sd.media if m.media == "audio" and m.port != 0]
    if not audio:
        raise OfferError(422, "no_audio", "the offer has no audio stream (m=audio) to transcribe")
    if not any(sd.direction_of(m) in ("sendrecv", "sendonly") for m in audio):
        raise OfferError(422, "no_audio", "the offer's audio is not sent (a=recvonly or a=inactive): "
                                          "nothing to transcribe")

    def attribute(name: str) -> bool:
        return any(a == name for a, _ in sd.attributes) or \
            all(any(a == name for a, _ in m.attributes) for m in audio)

    if not (attribute("ice-ufrag") and attribute("ice-pwd")):
        raise OfferError(400, "invalid_sdp", "the offer has no ICE credentials (a=ice-ufrag, a=ice-pwd)")
    if not attribute("fingerprint"):
        raise OfferError(400, "invalid_sdp", "the offer has no DTLS fingerprint (a=fingerprint): "
                                             "WebRTC media must be encrypted")
    return text


def parse_ice_servers(value: str) -> list[tuple[str, str | None, str | None]]:
    """``webrtc_ice_servers`` -> (url, username, credential) each.

    TURN credentials ride in the URL as ``turn:USER:PASSWORD@host:port``.
    """
    servers: list[tuple[str, str | None, str | None]] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        scheme, _, rest = item.partition(":")
        if "@" in rest and scheme in ("turn", "turns"):
            creds, _, host = rest.rpartition("@")
            user, _, password = creds.partition(":")
            servers.append((f"{scheme}:{host}", user or None, password or None))
        else:
            servers.append((item, None, None))
    return servers


@dataclass
class WhipResource:
    """One WHIP session: the peer connection, the Earshot session and what they hold."""

    id: str
    caller: Caller
    pc: Any  # aiortc.RTCPeerConnection
    held: contextlib.ExitStack
    session: "Session | None" = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    closing: asyncio.Future[None] | None = None


class WhipIngest:
    """The WHIP endpoint of one gateway: open resources by id."""

    def __init__(self, api: "ApiContext") -> None:
        self.api = api
        self.resources: dict[str, WhipResource] = {}

    # -- HTTP
    async def options(self, request: Request) -> Response:
        return Response(status_code=204, headers={"Allow": "OPTIONS, POST", "Accept-Post": SDP_TYPE})

    async def post(self, request: Request) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        body = await _read_body(request, MAX_OFFER_BYTES)
        try:
            offer = check_offer(body, request.headers.get("content-type"))
        except OfferError as exc:
            return error_response(exc.status, exc.code, exc.message)
        try:
            import aiortc  # noqa: F401
        except ImportError:
            return error_response(501, "webrtc_unavailable", "WebRTC ingest needs aiortc (pip install aiortc)")
        held = contextlib.ExitStack()
        try:
            held.enter_context(self.api.limits.hold(caller))
        except LimitExceeded as exc:
            return error_response(429, "session_limit", str(exc), {"Retry-After": "5"})
        return await self._answer(offer, caller, held)

    async def delete(self, request: Request) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        resource = self.resources.get(request.path_params["session_id"])
        if resource is None or resource.caller.username != caller.username:
            return error_response(404, "not_found", "no such WHIP session")
        ending = self.end(resource, DELETE_REASON)
        try:
            await asyncio.wait_for(asyncio.shield(ending), END_WAIT_S)
        except asyncio.TimeoutError:
            log.warning("whip %s: the session did not finish within %.0f s of DELETE", resource.id, END_WAIT_S)
        return Response(status_code=200)

    async def patch(self, request: Request) -> Response:
        return error_response(405, "method_not_allowed",
                              "this WHIP server supports neither trickle ICE nor ICE restarts: "
                              "send the complete offer in the POST", {"Allow": "DELETE"})

    async def _caller(self, request: Request) -> Caller | Response:
        caller = await self.api.auth.connection(request)
        if caller is None:
            return error_response(401, "unauthorized",
                                  "authentication required: send 'Authorization: Bearer <token>' "
                                  "(earshot users token NAME), or sign in to the dashboard",
                                  {"WWW-Authenticate": "Bearer"})
        if caller.credential.startswith("session:") and not _same_origin(request):
            # the dashboard cookie authenticates a browser: refuse requests that other sites make it send
            return error_response(403, "cross_origin", "cross-site request refused (Origin does not match this site)")
        return caller

    # -- WebRTC
    async def _answer(self, offer: str, caller: Caller, held: contextlib.ExitStack) -> Response:
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

        servers = [RTCIceServer(url, username=user, credential=cred)
                   for url, user, cred in parse_ice_servers(self.api.settings.webrtc_ice_servers)]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))  # [] = host candidates only
        resource = WhipResource(id=str(uuid.uuid4()), caller=caller, pc=pc, held=held)
        tracks: list[Any] = []
        pc.on("track", lambda track: tracks.append(track) if track.kind == "audio" else None)
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            except Exception as exc:  # aiortc: ValueError (bad description), OperationError (no codec in common)
                message = str(exc) or type(exc).__name__
                if "send parameters" in message:
                    return error_response(422, "no_common_codec", "no codec in common with the offer "
                                          "(Earshot takes Opus, PCMU or PCMA audio)")
                return error_response(400, "invalid_sdp", f"the offer was refused: {message}")
            audio_track = None
            for transceiver in pc.getTransceivers():
                track = transceiver.receiver.track
                if transceiver.kind == "audio" and audio_track is None and track is not None and track in tracks:
                    audio_track = track
                    transceiver.direction = "recvonly"
                else:
                    transceiver.direction = "inactive"  # video, a second audio stream: not sent to us
            if audio_track is None:
                return error_response(422, "no_audio", "the offer has no audio stream Earshot can receive")
            await pc.setLocalDescription(await pc.createAnswer())  # gathers every candidate first
            try:
                resource.session = self.api.host.open(
                    Source("webrtc", (("session_id", resource.id),)), [LegSpec(LEG, wideband=True)],
                    listeners=[lambda event: self._on_event(resource, event)], session_id=resource.id)
            except SessionLimit as exc:
                return error_response(503, "gateway_busy", f"the gateway takes no more sessions now ({exc.reason})",
                                      {"Retry-After": "5"})
            self.resources[resource.id] = resource
            pc.on("connectionstatechange", lambda: self._on_state(resource))
            resource.pumps.append(asyncio.ensure_future(self._pump(resource, audio_track)))
            log.info("whip %s: session opened for %s", resource.id, caller.username)
            return Response(pc.localDescription.sdp, status_code=201, media_type=SDP_TYPE,
                            headers={"Location": f"{WHIP_PATH}/{resource.id}", "ETag": f'"{resource.id}"'})
        finally:
            if resource.id not in self.resources:  # refused: nothing stays open
                await pc.close()
                held.close()

    async def _pump(self, resource: WhipResource, track: Any) -> None:
        """Decoded frames -> 16 kHz -> the session, until the track ends or goes quiet too long."""
        from aiortc.mediastreams import MediaStreamError

        from ..media.wideband import StreamResampler

        session = resource.session
        assert session is not None
        timeout = self.api.settings.media_timeout_s
        resampler: StreamResampler | None = None
        reason = "client-closed"
        try:
            while not session.ended:
                try:
                    async with asyncio.timeout(timeout):
                        frame = await track.recv()
                except TimeoutError:
                    reason = "media-timeout"
                    break
                except MediaStreamError:
                    break
                if resampler is None:
                    resampler = StreamResampler(frame.sample_rate, min(2, len(frame.layout.channels)))
                pcm = resampler.feed_frame(frame)
                if pcm.size:
                    session.feed_wideband(LEG, pcm, time.monotonic())
        except Exception:
            log.exception("whip %s: media failed", resource.id)
            reason = "media-error"
        self.end(resource, reason)

    def _on_state(self, resource: WhipResource) -> None:
        if resource.pc.connectionState in ("failed", "closed"):
            self.end(resource, "client-closed")

    def _on_event(self, resource: WhipResource, event: "Event") -> None:
        if event.type == CALL_ENDED:  # also when the gateway ended it (drain): close the peer
            self.end(resource, resource.session.end_reason if resource.session else "shutdown")

    def end(self, resource: WhipResource, reason: str) -> asyncio.Future[None]:
        """End the session (its last turns are transcribed), close the peer, free the slot; once."""
        if resource.closing is None:
            resource.closing = asyncio.ensure_future(self._close(resource, reason))
        return resource.closing

    async def _close(self, resource: WhipResource, reason: str) -> None:
        try:
            ending = resource.session.end(reason) if resource.session is not None else None
            await resource.pc.close()
            current = asyncio.current_task()
            for pump in resource.pumps:
                if pump is not current and not pump.done():
                    pump.cancel()
            if ending is not None:
                await ending
        except Exception:
            log.exception("whip %s: error while closing", resource.id)
        finally:
            resource.held.close()
            self.resources.pop(resource.id, None)
            log.info("whip %s: ended (%s)", resource.id, reason)

    async def close(self) -> None:
        """End every open resource (tests; the gateway's drain ends them through their sessions)."""
        await asyncio.gather(*(self.end(r, "shutdown") for r in list(self.resources.values())),
                             return_exceptions=True)


async def _read_body(request: Request, limit: int) -> bytes:
    """At most ``limit`` + 1 bytes of the body: enough to tell an offer that is too large."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)


def _same_origin(request: Request) -> bool:
    from ..web.auth import same_origin

    return same_origin(request.headers.get("origin"), request.headers.get("host"), request.url.scheme)


def routes(api: "ApiContext") -> list[BaseRoute]:
    ingest = WhipIngest(api)
    api.extra["webrtc"] = ingest
    return [
        Route(WHIP_PATH, ingest.post, methods=["POST"]),
        Route(WHIP_PATH, ingest.options, methods=["OPTIONS"]),
        Route(WHIP_PATH + "/{session_id}", ingest.delete, methods=["DELETE"]),
        Route(WHIP_PATH + "/{session_id}", ingest.patch, methods=["PATCH"]),
    ]

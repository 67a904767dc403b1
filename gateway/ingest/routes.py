"""The API routes the gateway's HTTP server mounts before the dashboard.

Each ingest module exposes ``routes(api)`` returning Starlette routes; they share one
:class:`ApiContext` (the session host, authentication and limits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.routing import BaseRoute

from .auth import ApiAuth, SessionLimits

if TYPE_CHECKING:
    from ..config import Settings
    from ..session import SessionHost


@dataclass
class ApiContext:
    settings: "Settings"
    host: "SessionHost"
    auth: ApiAuth
    limits: SessionLimits
    model_name: str = ""  # what /v1/models lists and results name
    extra: dict[str, object] = field(default_factory=dict)


def api_routes(api: ApiContext) -> list[BaseRoute]:
    """Every API's routes. The modules are imported here, not at the top: the gateway imports
    this only when ``api_enabled`` (aiortc itself waits for the first WHIP offer)."""
    from . import rest, twilio, webrtc
    from .realtime import endpoint as realtime

    return [*rest.routes(api), *realtime.routes(api), *twilio.routes(api), *webrtc.routes(api)]

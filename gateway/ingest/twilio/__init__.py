"""Twilio Media Streams ingest: ``/twilio/media`` (docs/twilio.md).

:mod:`.protocol` is the sans-I/O core (Twilio's messages in, session actions out),
:mod:`.signature` Twilio's request signature, :mod:`.endpoint` the WebSocket edge.
"""

from .endpoint import PATH, routes

__all__ = ["PATH", "routes"]

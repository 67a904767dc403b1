"""Ingest edges other than SIP: the OpenAI-compatible Realtime and REST APIs, Twilio Media
Streams and WebRTC (WHIP). Each builds a :class:`~gateway.session.Session` and feeds it audio;
:func:`gateway.ingest.routes.api_routes` mounts them on the gateway's HTTP server."""

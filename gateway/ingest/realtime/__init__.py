"""The OpenAI-compatible Realtime transcription WebSocket (``/v1/realtime``).

:mod:`.protocol` is the sans-I/O core (client JSON in, server events and session
actions out); :mod:`.endpoint` is the Starlette edge that runs it against a
:class:`~gateway.session.Session`. docs/realtime.md describes what is supported.
"""

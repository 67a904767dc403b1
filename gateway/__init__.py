"""Earshot: a real-time speech transcription gateway for contact centers.

SIP/RTP calls in, Whisper transcripts out to Redis Streams. Protocol cores
(:mod:`gateway.sip`, :mod:`gateway.rtp`, :mod:`gateway.sdp`) are sans-I/O;
asyncio transports sit at the edge.
"""

__version__ = "0.1.0"

"""SIPREC (RFC 7866) recording-server protocol core, sans-I/O.

An SRC (session recording client: an SBC or PBX forking a call to us) sends an
INVITE whose body is ``multipart/mixed``: SDP with one ``sendonly`` stream per
party and RFC 7865 recording metadata saying who the parties are and which
stream carries whose voice.  This package turns those bytes into values:

- :mod:`gateway.siprec.body`: the body split into its SDP and metadata parts
  (:func:`~gateway.siprec.body.split_body`);
- :mod:`gateway.siprec.metadata`: the metadata parsed safely and leniently
  (:func:`~gateway.siprec.metadata.parse_metadata`), each SDP ``a=label`` mapped
  to the party that sends it (``RecordingMetadata.leg_for_label``), and
  metadata-only updates merged (:func:`~gateway.siprec.metadata.merge`).

Nothing here touches a socket, the clock or the user agent; bad input raises
:class:`SiprecError`, whose ``reason`` fits a SIP 400 reason phrase.
docs/siprec.md describes the shapes accepted and the rules.
"""

from __future__ import annotations

from .body import RecordingBody, SiprecError, split_body
from .metadata import LegIdentity, Participant, RecordingMetadata, StreamAssociation, StreamInfo, merge, parse_metadata

__all__ = [
    "LegIdentity",
    "Participant",
    "RecordingBody",
    "RecordingMetadata",
    "SiprecError",
    "StreamAssociation",
    "StreamInfo",
    "merge",
    "parse_metadata",
    "split_body",
]

"""RTP receive path: packet parsing, jitter buffer, RFC 4733 DTMF, per-call receiver."""

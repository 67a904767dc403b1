"""Media stages after RTP: G.711 decode, resampling, voice activity detection, turn detection."""

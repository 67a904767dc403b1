"""Speech recognition behind one narrow interface (see gateway.asr.interface)."""

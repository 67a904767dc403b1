"""SIP protocol core (sans-I/O) and its asyncio transports."""

"""The supervisor dashboard and its JSON API, served by the gateway's HTTP server.

History and search read the SQL store (filled by :mod:`gateway.persister`);
live views read the Redis event streams through one :class:`LiveHub` per
process. Importing this package needs FastAPI, Jinja2, itsdangerous and
SQLAlchemy, but no running database or Redis.
"""

from .app import Dashboard
from .live import LiveBoard, LiveHub
from .throttle import LoginGuard, LoginThrottle

__all__ = ["Dashboard", "LiveBoard", "LiveHub", "LoginGuard", "LoginThrottle"]

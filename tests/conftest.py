"""Fixtures shared by the unit and end-to-end tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

#: The machine's Redis server (deploy/setup.sh starts one if none answers).
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix() -> Iterator[str]:
    """A stream prefix of this test's own on the shared Redis; its keys are deleted afterwards."""
    name = f"earshot-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{name}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()

"""A pending entry trimmed from the stream before the persister stored it is counted and
logged as lost, not passed off as a poison entry (docs/events.md, Trimming and the persister)."""

import logging

import pytest
import redis

from gateway.persister import Persister
from tests.pg_server import recorded_call
from tests.redis_server import RedisServer
from tests.waiting import wait_for


@pytest.fixture
def server():
    srv = RedisServer().start()
    yield srv
    srv.stop()


async def test_a_pending_entry_trimmed_before_it_was_stored_is_counted_as_lost(server, tmp_path, caplog):
    from gateway.store import migrate

    database_url = f"sqlite:///{tmp_path / 'store.db'}"
    migrate.upgrade(database_url)
    client = redis.Redis.from_url(server.url)
    client.xgroup_create("t:events", "earshot-persister", id="0", mkstream=True)
    for event in recorded_call(["hello there", "how are you"], partials=0):
        client.xadd("t:events", event.to_fields())
    # a persister that died holding three entries; then someone trimmed them away
    client.xreadgroup("earshot-persister", "dead", {"t:events": ">"}, count=3)
    client.xtrim("t:events", maxlen=1, approximate=False)
    persister = Persister(server.url, database_url, stream="t:events", consumer="dead", block_ms=100,
                          backoff_max_s=0.5)
    await persister.start()
    try:
        await wait_for(lambda: persister.acked >= 4, 10, "the persister to handle every entry")
    finally:
        await persister.close()
    client.close()
    assert persister.trimmed == 3 and persister.poison == 0
    assert persister.snapshot()["persister_trimmed"] == 3
    assert "was trimmed before it was stored" in caplog.text
    assert any(r.levelno == logging.ERROR for r in caplog.records)

"""Server-sent events over a real HTTP server (uvicorn on 127.0.0.1) fed by events published to Redis."""

import asyncio
import json
import time

import httpx
import pytest
import redis

from gateway.config import Settings
from gateway.events import CALL_ENDED, TURN_FINAL, TURN_PARTIAL
from gateway.http import HttpServer, build_app
from gateway.metrics import Metrics
from gateway.store import migrate
from gateway.store.db import make_engine, make_sessionmaker
from gateway.store.users import create_token, create_user
from gateway.web import Dashboard
from gateway.web.live import REPLAY_CONNECTIONS
from tests.pg_server import prompt_texts, recorded_call
from tests.unit.test_web_live import publish
from tests.waiting import wait_for

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def server(tmp_path, prefix):
    url = f"sqlite:///{tmp_path / 'earshot.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as s:
        user = create_user(s, "alice", "correct horse battery", "supervisor")
        _, token = create_token(s, user, "sse")
        s.commit()
    settings = Settings(database_url=url, redis_url=REDIS_URL, stream_prefix=prefix, web_stream_recheck_s=0.2,
                        web_secret_file=str(tmp_path / "web.secret"))
    dashboard = Dashboard(settings, engine=engine, keepalive_s=0.2)
    dashboard.hub.block_ms = 100
    dashboard.hub.client_name = f"livehub-{prefix}"
    await dashboard.start()
    await asyncio.wait_for(dashboard.hub.ready.wait(), 10)

    async def health():
        return {"status": "ok"}

    http = HttpServer(build_app(Metrics(lambda: {}), health, web=dashboard.asgi), "127.0.0.1", 0)
    await http.start()
    yield {"base": f"http://127.0.0.1:{http.port}", "headers": {"Authorization": f"Bearer {token}"},
           "dashboard": dashboard, "prefix": prefix, "engine": engine}
    await http.close()
    await dashboard.close()
    engine.dispose()


def live_call(texts, **kwargs):
    return recorded_call(texts, start=time.time(), **kwargs)


class SseReader:
    """Parses an SSE response into (event, id, data) tuples."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def next(self, timeout: float = 10.0):
        event, ident, data = "message", None, []
        while True:
            line = await asyncio.wait_for(self.lines.__anext__(), timeout)
            if line == "":
                if data:
                    return event, ident, json.loads("\n".join(data))
                event, ident, data = "message", None, []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "id":
                ident = value
            elif name == "data":
                data.append(value)

    async def until(self, wanted: str, timeout: float = 10.0):
        seen = []
        while True:
            frame = await self.next(timeout)
            seen.append(frame)
            if frame[0] == wanted:
                return frame, seen


async def test_board_stream_shows_a_call_come_talk_and_go(server):
    call = live_call(prompt_texts()[:2], partials=1)
    call_id = call[0].call.call_id
    async with httpx.AsyncClient(base_url=server["base"], headers=server["headers"], timeout=10) as client:
        async with client.stream("GET", "/live/stream") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            sse = SseReader(response)
            event, _, data = await sse.next()
            assert event == "snapshot" and data == {"calls": [], "redis": "ok"}
            await publish(server["prefix"], call[:-1])
            latest = None
            while latest is None or latest["latest_text"] != prompt_texts()[1] or latest["latest_partial"]:
                event, _, latest = await sse.next()
                assert event == "call" and latest["call_id"] == call_id
            assert latest["from"] == "sip:alice@pbx.example" and latest["tags"] == ["support"]
            assert latest["turns"] == 2
            await publish(server["prefix"], call[-1:])
            (event, _, data), _ = await sse.until("ended")
            assert data == {"call_id": call_id}


async def test_call_stream_replays_then_follows_live_then_ends(server):
    texts = prompt_texts()[:3]
    call = live_call(texts, partials=2, digits="7")
    call_id = call[0].call.call_id
    await publish(server["prefix"], call[:4])  # started, two partials and the final of turn 1
    async with httpx.AsyncClient(base_url=server["base"], headers=server["headers"], timeout=10) as client:
        async with client.stream("GET", f"/calls/{call_id}/stream") as response:
            sse = SseReader(response)
            (_, _, marker), replay = await sse.until("live")
            assert [int(ident) for event, ident, _ in replay if event == "event"] == [1, 2, 3, 4]
            assert [d["type"] for e, _, d in replay if e == "event"] == [
                "call.started", TURN_PARTIAL, TURN_PARTIAL, TURN_FINAL]
            assert marker == {"replayed": 4}
            await publish(server["prefix"], call[4:])
            (_, _, end), frames = await sse.until("end")
            live = [(int(i), d) for e, i, d in frames if e == "event"]
            assert [n for n, _ in live] == list(range(5, len(call) + 1))
            assert live[-1][1]["type"] == CALL_ENDED and end == {"reason": "bye"}
            finals = [d["text"] for _, d in live if d["type"] == TURN_FINAL]
            assert finals == texts[1:]
            with pytest.raises(StopAsyncIteration):
                await sse.next()  # the server closed the stream after the end


async def test_call_stream_resumes_after_last_event_id(server):
    call = live_call(prompt_texts()[:2], partials=1)
    call_id = call[0].call.call_id
    await publish(server["prefix"], call)
    headers = {**server["headers"], "Last-Event-ID": "3"}
    async with httpx.AsyncClient(base_url=server["base"], headers=headers, timeout=10) as client:
        async with client.stream("GET", f"/calls/{call_id}/stream") as response:
            (_, _, _), frames = await SseReader(response).until("end")
    assert [int(i) for e, i, _ in frames if e == "event"] == list(range(4, len(call) + 1))


async def test_streams_need_authentication(server):
    async with httpx.AsyncClient(base_url=server["base"], timeout=10) as client:
        r = await client.get("/live/stream")
        assert r.status_code == 401 and "authentication required" in r.json()["detail"]
        r = await client.get("/calls/x/stream", headers={"Authorization": "Bearer esk_wrong"})
        assert r.status_code == 401
        r = await client.get("/calls/bad%20id/stream", headers=server["headers"])
        assert r.status_code == 404


async def test_many_watchers_share_one_reader_and_leave_nothing_behind(server):
    hub = server["dashboard"].hub
    call = live_call(["hello there", "how can I help"], partials=0)
    call_id = call[0].call.call_id
    async with httpx.AsyncClient(base_url=server["base"], headers=server["headers"], timeout=10,
                                 limits=httpx.Limits(max_connections=50)) as client:
        async def watch(path: str, last: str):
            async with client.stream("GET", path) as response:
                sse = SseReader(response)
                await sse.next()  # snapshot, or the live marker
                ready.append(path)
                (event, _, data), _ = await sse.until(last)
                return data

        ready: list[str] = []
        tasks = [asyncio.create_task(watch("/live/stream", "ended")) for _ in range(15)]
        tasks += [asyncio.create_task(watch(f"/calls/{call_id}/stream", "end")) for _ in range(15)]
        await wait_for(lambda: len(ready) == 30, 10, lambda: f"30 watchers to connect ({len(ready)} did)")
        assert hub.subscribers == 30
        await publish(server["prefix"], call)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 15)
        assert results[:15] == [{"call_id": call_id}] * 15 and results[15:] == [{"reason": "bye"}] * 15
    client_list = redis.Redis.from_url(REDIS_URL)
    connections = client_list.client_list()
    client_list.close()
    readers = [c for c in connections if c.get("name") == hub.client_name]
    replayers = [c for c in connections if c.get("name") == hub.client_name + "-replay"]
    assert len(readers) == 1  # one XREAD for 30 browsers
    assert 1 <= len(replayers) <= REPLAY_CONNECTIONS  # 15 replays at once share a small pool
    await wait_for(lambda: hub.subscribers == 0, 10,  # disconnected browsers are unsubscribed
                   lambda: f"no subscribers left ({hub.subscribers} are)")


async def test_closed_browser_is_unsubscribed(server):
    hub = server["dashboard"].hub
    async with httpx.AsyncClient(base_url=server["base"], headers=server["headers"], timeout=10) as client:
        async with client.stream("GET", "/calls/some-call/stream") as response:
            await SseReader(response).until("live")
            assert hub.subscribers == 1
    await wait_for(lambda: hub.subscribers == 0, 10,  # found on the next keep-alive write
                   lambda: f"no subscribers left ({hub.subscribers} is)")


# -- a stream ends with the credential that opened it

async def logged_in(client: httpx.AsyncClient, username: str = "alice", password: str = "correct horse battery") -> str:
    """Log ``client`` in through the form; returns the CSRF token of the new session's pages."""
    import re

    page = await client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = await client.post("/login", data={"username": username, "password": password, "csrf_token": csrf,
                                          "next": "/"})
    assert r.status_code == 303, r.text
    board = await client.get("/")
    return re.search(r'name="csrf_token" value="([^"]+)"', board.text).group(1)


async def assert_ends_unauthorized(sse: "SseReader") -> None:
    (_, _, data), _ = await sse.until("unauthorized", timeout=5)
    assert "no longer valid" in data["reason"]
    with pytest.raises(StopAsyncIteration):
        await sse.next()


async def test_board_stream_ends_when_its_session_logs_out(server):
    async with httpx.AsyncClient(base_url=server["base"], timeout=10) as client:
        csrf = await logged_in(client)
        async with client.stream("GET", "/live/stream") as response:
            assert response.status_code == 200
            sse = SseReader(response)
            assert (await sse.next())[0] == "snapshot"
            async with httpx.AsyncClient(base_url=server["base"], cookies=client.cookies, timeout=10) as other_tab:
                r = await other_tab.post("/logout", data={"csrf_token": csrf})
                assert r.status_code == 303
            await assert_ends_unauthorized(sse)
        # the browser's reconnect with the old cookie: 401
        assert (await client.get("/live/stream")).status_code == 401


async def test_call_stream_ends_when_the_password_changes(server):
    from gateway.store.users import get_user, set_password

    call = live_call(prompt_texts()[:1], ended=False)
    await publish(server["prefix"], call)
    async with httpx.AsyncClient(base_url=server["base"], timeout=10) as client:
        await logged_in(client)
        async with client.stream("GET", f"/calls/{call[0].call.call_id}/stream") as response:
            sse = SseReader(response)
            await sse.until("live")
            with make_sessionmaker(server["engine"])() as s:  # `earshot users passwd`, another process
                set_password(s, get_user(s, "alice"), "a brand new password")
                s.commit()
            await assert_ends_unauthorized(sse)


async def test_streams_end_when_their_token_is_revoked(server):
    from gateway.store.models import ApiToken
    from gateway.store.users import revoke_token

    call = live_call(prompt_texts()[:1], ended=False)
    await publish(server["prefix"], call)
    async with httpx.AsyncClient(base_url=server["base"], headers=server["headers"], timeout=10) as client:
        async with client.stream("GET", "/live/stream") as board, \
                client.stream("GET", f"/calls/{call[0].call.call_id}/stream") as one:
            board_sse, call_sse = SseReader(board), SseReader(one)
            await board_sse.next()
            await call_sse.until("live")
            with make_sessionmaker(server["engine"])() as s:
                token_id = s.query(ApiToken.id).filter(ApiToken.name == "sse").scalar()
                revoke_token(s, token_id)
                s.commit()
            await assert_ends_unauthorized(board_sse)
            await assert_ends_unauthorized(call_sse)
        assert (await client.get("/live/stream")).status_code == 401


async def test_a_valid_stream_is_not_ended_by_its_rechecks(server):
    """Over several recheck periods (0.2 s here) a stream whose token still holds gets only
    keep-alives and the events published meanwhile, never ``unauthorized``."""
    call = live_call(prompt_texts()[:1], ended=False)
    async with httpx.AsyncClient(base_url=server["base"], headers=server["headers"], timeout=10) as client:
        async with client.stream("GET", "/live/stream") as response:
            sse = SseReader(response)
            assert (await sse.next())[0] == "snapshot"
            frames = []

            async def read_on():
                while True:
                    frames.append(await sse.next())

            reader = asyncio.create_task(read_on())
            await asyncio.sleep(0.6)  # three rechecks
            await publish(server["prefix"], call)  # the stream still delivers
            await asyncio.sleep(0.9)
            assert not reader.done(), reader  # the stream did not end
            reader.cancel()
    kinds = [frame[0] for frame in frames]
    assert "call" in kinds and "unauthorized" not in kinds, kinds

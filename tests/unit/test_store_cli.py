"""``earshot db``, ``earshot users`` and ``earshot persist`` on a real SQLite file and Redis."""

import asyncio
import io
import os
import pty
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis
from sqlalchemy import func, select

from gateway.cli import main
from gateway.publisher import Publisher
from gateway.store import migrate
from gateway.store import users
from gateway.store.db import make_engine, make_sessionmaker
from gateway.store.models import CallEvent
from tests.pg_server import recorded_call

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def db_url(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("EARSHOT_"):
            monkeypatch.delenv(key)
    return f"sqlite:///{tmp_path / 'cli.db'}"


def earshot(*args: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.stdin, sys.stdout, sys.stderr = old
    return code, out.getvalue(), err.getvalue()


def test_db_upgrade_current_downgrade(db_url):
    assert earshot("db", "current", "--database-url", db_url)[1].strip().endswith(": empty")
    code, out, _ = earshot("db", "upgrade", "--database-url", db_url)
    head = migrate.head_revision()
    assert code == 0 and out.strip().endswith(f"{head} (head)")
    assert earshot("db", "current", "--database-url", db_url)[1].strip().endswith(f"{head} (head)")
    code, out, _ = earshot("db", "downgrade", "base", "--database-url", db_url)
    assert code == 0 and out.strip().endswith(": empty")
    code, _, err = earshot("db", "current", "--database-url", "mysql://x@y/z")
    assert code == 2 and "database_url" in err


def test_users_need_the_schema_first(db_url):
    code, _, err = earshot("users", "list", "--database-url", db_url)
    assert code == 1 and "earshot db upgrade" in err


def test_the_first_users_add_creates_the_schema_of_a_fresh_store(db_url):
    """README's order for a new user: `earshot users add` before anything else has touched the store."""
    code, out, err = earshot("users", "add", "admin", "--role", "admin", "--password-stdin", "--database-url", db_url,
                             stdin="a long passphrase\n")
    assert code == 0, err
    assert "admin (admin) created" in out
    assert "(head)" in earshot("db", "current", "--database-url", db_url)[1]
    assert earshot("users", "list", "--database-url", db_url)[0] == 0


def test_users_add_list_and_token(db_url):
    assert earshot("db", "upgrade", "--database-url", db_url)[0] == 0
    code, out, _ = earshot("users", "add", "Carol", "--role", "admin", "--password-stdin", "--database-url", db_url,
                           stdin="a long passphrase\n")
    assert code == 0 and "carol (admin) created" in out
    code, _, err = earshot("users", "add", "dave", "--role", "supervisor", "--password-stdin",
                           "--database-url", db_url, stdin="short\n")
    assert code == 1 and "at least 8" in err
    code, _, err = earshot("users", "add", "carol", "--role", "supervisor", "--password-stdin",
                           "--database-url", db_url, stdin="another passphrase\n")
    assert code == 1 and "already exists" in err
    code, out, _ = earshot("users", "list", "--database-url", db_url)
    assert code == 0 and out.splitlines()[1].split()[:2] == ["carol", "admin"] and len(out.splitlines()) == 2
    code, out, _ = earshot("users", "token", "carol", "--name", "wallboard", "--database-url", db_url)
    token = out.strip()
    assert code == 0 and token.startswith("esk_")
    assert earshot("users", "token", "nobody", "--name", "x", "--database-url", db_url)[0] == 1
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as s:
        assert users.verify_token(s, token).username == "carol"
        assert users.authenticate(s, "carol", "a long passphrase") is not None
    engine.dispose()


def _spawn_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", *args], stdin=slave, stdout=slave, stderr=slave,
                            cwd=ROOT, env=env, start_new_session=True)
    os.close(slave)
    return proc, master


def _read_until(master: int, text: str, timeout: float = 20.0) -> str:
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        assert time.monotonic() < deadline, f"no {text!r} in {seen!r}"
        try:
            seen += os.read(master, 1024)
        except OSError:
            break
    return seen.decode(errors="replace")


def test_users_add_asks_the_password_twice_on_a_terminal(db_url):
    assert earshot("db", "upgrade", "--database-url", db_url)[0] == 0
    env = {**os.environ, "EARSHOT_DATABASE_URL": db_url}
    for second, expected in (("typo passphrase", 1), ("terminal passphrase", 0)):
        proc, master = _spawn_on_a_terminal(["users", "add", "erin", "--role", "supervisor"], env)
        try:
            _read_until(master, "Password: ")
            os.write(master, b"terminal passphrase\n")
            _read_until(master, "Password (again): ")
            os.write(master, second.encode() + b"\n")
            output = _read_until(master, "\n", 20) if expected else _read_until(master, "created")
            assert proc.wait(20) == expected, output
            assert "terminal passphrase" not in output  # not echoed
        finally:
            os.close(master)
            if proc.poll() is None:
                proc.kill()
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as s:
        assert users.authenticate(s, "erin", "terminal passphrase") is not None
    engine.dispose()


async def test_persist_command_stores_the_stream_until_interrupted(db_url):
    assert earshot("db", "upgrade", "--database-url", db_url)[0] == 0
    prefix = f"earshot-test-{uuid.uuid4().hex[:12]}"
    env = {**os.environ, "EARSHOT_DATABASE_URL": db_url, "EARSHOT_STREAM_PREFIX": prefix}
    events = recorded_call(["Testing the persist command."])
    publisher = Publisher("redis://127.0.0.1:6379/0", events_stream=f"{prefix}:events",
                          call_stream=lambda c: f"{prefix}:call:{c}")
    await publisher.start()
    for event in events:
        publisher.publish(event)
    assert await publisher.flush(5)
    await publisher.close()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "persist"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    engine = make_engine(db_url)
    try:
        expected = len([e for e in events if e.type != "turn.partial"])
        for _ in range(400):
            with make_sessionmaker(engine)() as s:
                if s.scalar(select(func.count()).select_from(CallEvent)) == expected:
                    break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, output
        assert f"persisting {prefix}:events" in output and "stopped (" in output
        with make_sessionmaker(engine)() as s:
            assert s.scalar(select(func.count()).select_from(CallEvent)) == expected
    finally:
        engine.dispose()
        if proc.poll() is None:
            proc.kill()
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()

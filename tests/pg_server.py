"""PostgreSQL for tests: scratch databases on the shared server, a private server,
and the fixtures and recorded event streams the store and persister tests share.

The shared server is the machine's PostgreSQL on 127.0.0.1:5432. The tests assume
nothing of it beyond one role and one database that ``deploy/setup.sh`` creates:
the role ``earshot_test`` (password ``earshot_test``, LOGIN CREATEDB) and its
database ``earshot_test``. They connect as that role over TCP with that password
(no trust auth, no superuser, no pre-made ``test`` database), create a uniquely
named scratch database per test or module and drop it afterwards; the server is
never stopped. Another server or role is chosen with one environment variable:

``EARSHOT_TEST_PG_URL``
    ``postgresql://USER:PASSWORD@HOST:PORT/ADMIN_DB``, default
    ``postgresql://earshot_test:earshot_test@127.0.0.1:5432/earshot_test``.
    USER needs LOGIN and CREATEDB; ADMIN_DB is any database USER may connect to
    (it is only used to issue CREATE/DROP DATABASE).

When the shared server cannot be reached, the PostgreSQL tests skip with a reason
naming PostgreSQL; under ``CI=true`` tests/conftest.py turns that skip into a failure.

Tests that stop PostgreSQL mid-stream start their own :class:`PrivatePostgres`
from the installed server binaries (``initdb``/``pg_ctl`` under
``/usr/lib/postgresql/*/bin``, Debian's ``postgresql`` package), in a temporary
directory, on a free port, with the same role name and password (scram-sha-256
over TCP). As root it runs the server as the ``postgres`` system user the package
creates (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import functools
import glob
import gzip
import os
import pathlib
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, unquote, urlsplit

import pytest

from gateway.events import (CALL_ENDED, CALL_STARTED, DTMF, TURN_FINAL, TURN_PARTIAL, CallInfo, Event, EventFactory,
                            Source)

DEFAULT_PG_URL = "postgresql://earshot_test:earshot_test@127.0.0.1:5432/earshot_test"
PG_URL = os.environ.get("EARSHOT_TEST_PG_URL") or DEFAULT_PG_URL

_parts = urlsplit(PG_URL)
SHARED_HOST = _parts.hostname or "127.0.0.1"
SHARED_PORT = _parts.port or 5432
SHARED_USER = unquote(_parts.username or "earshot_test")
SHARED_PASSWORD = unquote(_parts.password or "")
SHARED_ADMIN_DB = _parts.path.lstrip("/") or SHARED_USER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url(dbname: str, port: int = SHARED_PORT, host: str = SHARED_HOST) -> str:
    """A SQLAlchemy URL for ``dbname`` on the shared server (or a private one's port), as the test role."""
    auth = quote(SHARED_USER, safe="")
    if SHARED_PASSWORD:
        auth += ":" + quote(SHARED_PASSWORD, safe="")
    return f"postgresql+psycopg://{auth}@{host}:{port}/{dbname}"


def _connect(port: int = SHARED_PORT, dbname: str = SHARED_ADMIN_DB, host: str = SHARED_HOST):
    import psycopg

    return psycopg.connect(host=host, port=port, user=SHARED_USER, password=SHARED_PASSWORD or None,
                           dbname=dbname, autocommit=True, connect_timeout=5)


@functools.cache
def shared_unavailable() -> str | None:
    """Why the shared server cannot be used as the test role (``None`` when it can): checked once."""
    where = f"{SHARED_USER}@{SHARED_HOST}:{SHARED_PORT}/{SHARED_ADMIN_DB}"
    try:
        with socket.create_connection((SHARED_HOST, SHARED_PORT), timeout=2):
            pass
    except OSError as error:
        return f"no PostgreSQL server on {SHARED_HOST}:{SHARED_PORT} ({error}); deploy/setup.sh starts one"
    try:
        with _connect() as conn:
            can_create = conn.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
                                      ).fetchone()
    except Exception as error:  # noqa: BLE001 - any failure is a reason not to run
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"PostgreSQL at {where} refused the test role ({first_line}); deploy/setup.sh creates it"
    if not (can_create and can_create[0]):
        return f"PostgreSQL role {SHARED_USER} lacks CREATEDB; deploy/setup.sh creates it with CREATEDB"
    return None


def shared_available() -> bool:
    return shared_unavailable() is None


def require_shared() -> None:
    """Skip the calling test (a failure under CI=true, see tests/conftest.py) without the shared server."""
    reason = shared_unavailable()
    if reason is not None:
        pytest.skip(reason)


def _admin(sql: str, port: int = SHARED_PORT, dbname: str = SHARED_ADMIN_DB) -> None:
    with _connect(port, dbname) as conn:
        conn.execute(sql)


def create_database(port: int = SHARED_PORT, admin_db: str = SHARED_ADMIN_DB) -> str:
    """A new empty database with a unique name, owned by the test role; returns its name."""
    name = f"earshot_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    _admin(f'CREATE DATABASE "{name}"', port, admin_db)
    return name


def drop_database(name: str, port: int = SHARED_PORT, admin_db: str = SHARED_ADMIN_DB) -> None:
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', port, admin_db)


@contextmanager
def scratch_database(port: int = SHARED_PORT, admin_db: str = SHARED_ADMIN_DB) -> Iterator[str]:
    """The URL of a fresh database, dropped afterwards."""
    name = create_database(port, admin_db)
    try:
        yield url(name, port)
    finally:
        drop_database(name, port, admin_db)


def _bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[4].split(".")])
    if found:
        return os.path.dirname(found[-1])
    pg_ctl = shutil.which("pg_ctl")
    return os.path.dirname(pg_ctl) if pg_ctl else None


def private_unavailable() -> str | None:
    """Why a :class:`PrivatePostgres` cannot be started here (``None`` when it can)."""
    bindir = _bindir()
    if bindir is None or not os.access(os.path.join(bindir, "initdb"), os.X_OK):
        return "PostgreSQL server binaries (initdb, pg_ctl) are not installed; deploy/setup.sh installs postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' system user to run a private PostgreSQL server as"
    return None


class PrivatePostgres:
    """A throw-away PostgreSQL server (no fsync) that a test may stop and restart.

    Its superuser is the test role (``SHARED_USER``/``SHARED_PASSWORD``), with
    scram-sha-256 over TCP, so :meth:`url` works the same as on the shared server.
    """

    def __init__(self, port: int | None = None) -> None:
        reason = private_unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        self.bindir = _bindir()
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="earshot-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "postgres.log")
        pwfile = os.path.join(self.dir, "pwfile")
        with open(pwfile, "w") as f:
            f.write((SHARED_PASSWORD or SHARED_USER) + "\n")
        # PostgreSQL refuses to run as root: run it as the postgres user then
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        # local (socket) connections: only the OS user that owns the server; TCP: the password
        self._run("initdb", "-D", self.data, "-U", SHARED_USER, f"--pwfile={pwfile}", "--auth-local=peer",
                  "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C")
        os.unlink(pwfile)

    def _run(self, tool: str, *args: str) -> None:
        command = [os.path.join(self.bindir, tool), *args]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=self.dir)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def url(self, dbname: str = "postgres") -> str:
        return url(dbname, self.port, host="127.0.0.1")

    def start(self) -> PrivatePostgres:
        # fsync off is safe here: the server may crash, the machine does not. Commits
        # stay synchronous: an asynchronous commit is lost when the server crashes
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off -c shared_buffers=16MB")
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "30", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``immediate`` is a crash (no shutdown checkpoint)."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "30", "stop")

    def running(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def create_database(self) -> str:
        """A new empty database on this server; returns its name."""
        name = f"earshot_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with _connect(self.port, "postgres", host="127.0.0.1") as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def destroy(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except RuntimeError:
                pass
        deadline = time.monotonic() + 5
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- fixtures and data shared by the store and persister tests

PROMPTS_TXT = pathlib.Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")


def prompt_texts() -> list[str]:
    """Real telephone prompt texts (the Asterisk core sounds), as transcripts."""
    texts = []
    with gzip.open(PROMPTS_TXT, "rt", encoding="utf-8") as f:
        for line in f:
            name, sep, text = line.partition(": ")
            text = text.strip()
            if sep and text and not line.startswith(";") and not text.startswith("["):
                texts.append(text)
    return texts


def recorded_call(texts: list[str], *, call_id: str | None = None, start: float = 1_700_000_000.0,
                  tags: tuple[str, ...] = ("support",), from_user: str = "alice", to_user: str = "support",
                  digits: str = "", partials: int = 2, ended: bool = True,
                  source: Source | None = None) -> list[Event]:
    """The events the gateway publishes for one call, in publication order.

    ``source``: a session from another source than SIP (no SIP fields, no SIP call.started fields).
    """
    if source is None or source.is_sip:
        sip_call_id = uuid.uuid4().hex[:14]
        info = CallInfo(call_id or str(uuid.uuid4()), sip_call_id, f"sip:{from_user}@pbx.example",
                        f"sip:{to_user}@earshot", start, tags,
                        source or Source("sip", (("call_id", sip_call_id), ("transport", "udp"))))
    else:
        info = CallInfo(call_id or str(uuid.uuid4()), started_at=start, tags=tags, source=source)
    factory = EventFactory(info)
    clock = [start]

    def make(kind: str, data: dict, leg: str | None = None) -> Event:
        event = factory.make(kind, data, leg=leg)
        event.created_at = clock[0]
        clock[0] += 0.25
        return event

    if info.source.is_sip:
        events = [make(CALL_STARTED, {"codec": "PCMU", "remote_media": "192.0.2.10:4000", "local_media_port": 10002,
                                      "transport": "udp", "dialplan_rule": tags[0] if tags else "default",
                                      "language": None, "legs": ["caller"]})]
    else:
        events = [make(CALL_STARTED, {"language": None, "legs": ["caller"]})]
    offset = 500
    for number, text in enumerate(texts, 1):
        words = text.split()
        end = offset + 400 * max(1, len(words))
        for p in range(1, partials + 1):
            cut = max(1, len(words) * p // (partials + 1))
            events.append(make(TURN_PARTIAL, {
                "turn": number, "partial": p, "start_ms": offset, "end_ms": offset + (end - offset) * p // (partials + 1),
                "text": " ".join(words[:cut]), "language": "en",
                "confidence": {"avg_logprob": -0.4, "no_speech_prob": 0.05, "compression_ratio": 1.2,
                               "language_probability": 1.0},
                "asr": {"model": "tiny.en", "audio_ms": 1000, "processing_ms": 80.0, "speculative": False}},
                leg="caller"))
        events.append(make(TURN_FINAL, {
            "turn": number, "start_ms": offset, "end_ms": end, "text": text, "reason": "silence",
            "partials": partials, "language": "en",
            "confidence": {"avg_logprob": -0.21, "no_speech_prob": 0.01, "compression_ratio": 1.1,
                           "language_probability": 1.0},
            "asr": {"model": "tiny.en", "audio_ms": end - offset, "processing_ms": 140.2, "speculative": True},
            "latency_ms": 512.3}, leg="caller"))
        offset = end + 700
    for digit in digits:
        events.append(make(DTMF, {"digit": digit, "duration_ms": 120, "offset_ms": offset}, leg="caller"))
        offset += 300
    if ended and not info.source.is_sip:
        events.append(make(CALL_ENDED, {"reason": "client-closed", "duration_ms": offset + 500, "turns": len(texts),
                                        "dtmf": len(digits)}))
    elif ended:
        events.append(make(CALL_ENDED, {"reason": "bye", "duration_ms": offset + 500, "turns": len(texts),
                                        "dtmf": len(digits), "rtp": {"packets": offset // 20, "lost": 3, "late": 1,
                                                                     "duplicates": 0, "foreign_dropped": 0,
                                                                     "malformed": 0}}))
    return events


def interleave(calls: list[list[Event]], seed: int = 7) -> list[Event]:
    """Events of concurrent calls merged as a shared stream would see them (each call in order)."""
    rng = random.Random(seed)
    queues = [list(c) for c in calls if c]
    out: list[Event] = []
    while queues:
        q = rng.choice(queues)
        out.append(q.pop(0))
        if not q:
            queues.remove(q)
    return out


@pytest.fixture(scope="module")
def pg_store_url() -> Iterator[str]:
    """A migrated scratch database on the shared server, for one test module."""
    from gateway.store import migrate

    require_shared()
    with scratch_database() as database_url:
        migrate.upgrade(database_url)
        yield database_url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    """A migrated store: a fresh SQLite file, or the module's PostgreSQL database."""
    from gateway.store import migrate

    if request.param == "sqlite":
        database_url = f"sqlite:///{tmp_path / 'store.db'}"
        migrate.upgrade(database_url)
        return database_url
    return request.getfixturevalue("pg_store_url")


@pytest.fixture
def engine(store_url: str):
    from gateway.store.db import make_engine

    engine = make_engine(store_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine):
    from gateway.store.db import make_sessionmaker

    with make_sessionmaker(engine)() as session:
        yield session

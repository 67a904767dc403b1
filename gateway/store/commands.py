"""``earshot db``, ``earshot persist`` and ``earshot users``: the store's command line.

Kept out of :mod:`gateway.cli` so that SQLAlchemy and Alembic load only when
one of these commands runs.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ..config import Settings

COMMANDS = ("db", "persist", "users")


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="YAML configuration file (also EARSHOT_CONFIG)")
        p.add_argument("--database-url", help="SQLAlchemy URL of the store (also EARSHOT_DATABASE_URL)")

    db = sub.add_parser("db", help="create or migrate the SQL store's schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="migrate the schema up (default: to the latest revision)")
    up.add_argument("revision", nargs="?", default="head")
    down = db_sub.add_parser("downgrade", help="migrate the schema down (e.g. -1, or base: drop everything)")
    down.add_argument("revision")
    cur = db_sub.add_parser("current", help="print the schema revision of the database")
    for p in (up, down, cur):
        common(p)

    persist = sub.add_parser("persist", help="copy the event stream into the SQL store (without the gateway)")
    common(persist)

    users = sub.add_parser("users", help="manage dashboard users and API tokens")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", help="create a user (the password is asked twice)")
    add.add_argument("username")
    add.add_argument("--role", required=True, choices=("admin", "supervisor"))
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    lst = users_sub.add_parser("list", help="list users")
    token = users_sub.add_parser("token", help="create an API token for a user and print it (once)")
    token.add_argument("username")
    token.add_argument("--name", required=True, help="what the token is for")
    for p in (add, lst, token):
        common(p)


def run_command(args: argparse.Namespace, settings: Settings, *, stdin: TextIO | None = None,
                out: TextIO | None = None) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from .db import DatabaseUrlError, redact
    from .migrate import SchemaError

    out = out or sys.stdout
    try:
        if args.command == "db":
            return _db(args, settings, out)
        if args.command == "persist":
            return _persist(settings)
        if args.command == "users":
            return _users(args, settings, stdin or sys.stdin, out)
    except DatabaseUrlError as exc:
        print(f"earshot: database_url: {exc}", file=sys.stderr)
        return 2
    except SchemaError as exc:
        print(f"earshot: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"earshot: database {redact(settings.database_url)}: {detail}", file=sys.stderr)
        return 1
    raise ValueError(f"not a store command: {args.command}")


def _db(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from . import migrate
    from .db import redact

    url = settings.database_url
    if args.db_command == "upgrade":
        migrate.upgrade(url, args.revision)
    elif args.db_command == "downgrade":
        migrate.downgrade(url, args.revision)
    found = migrate.current(url)
    head = migrate.head_revision()
    state = "empty" if found is None else found + (" (head)" if found == head else f" (head is {head})")
    print(f"{redact(url)}: {state}", file=out)
    return 0


def _persist(settings: Settings) -> int:
    from ..persister import Persister

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        persister = Persister.from_settings(settings)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await persister.start()
        print(f"earshot: persisting {settings.events_stream} as {persister.group}/{persister.consumer}", flush=True)
        await stop.wait()
        await persister.close()
        print(f"earshot: stopped ({persister.stored} events stored, {persister.duplicates} duplicates, "
              f"{persister.poison} poison)", flush=True)

    asyncio.run(main())
    return 0


def _read_password(args: argparse.Namespace, stdin: TextIO) -> str | None:
    if args.password_stdin:
        line = stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password (again): ") != first:
        print("earshot: the passwords differ", file=sys.stderr)
        return None
    return first


def _users(args: argparse.Namespace, settings: Settings, stdin: TextIO, out: TextIO) -> int:
    from . import users
    from .db import make_engine, make_sessionmaker
    from .migrate import check_schema, current_revision, upgrade

    engine = make_engine(settings.database_url)
    try:
        if args.users_command == "add" and current_revision(engine) is None:
            # a fresh store: create its schema, as `earshot run` would (an outdated one still needs
            # an explicit `earshot db upgrade`)
            upgrade(settings.database_url)
        check_schema(engine)
        with make_sessionmaker(engine)() as session:
            if args.users_command == "add":
                password = _read_password(args, stdin)
                if password is None:
                    return 1
                try:
                    user = users.create_user(session, args.username, password, args.role)
                except users.UserError as exc:
                    print(f"earshot: {exc}", file=sys.stderr)
                    return 1
                session.commit()
                print(f"user {user.username} ({user.role}) created", file=out)
            elif args.users_command == "list":
                print(f"{'USERNAME':24} {'ROLE':10} {'CREATED':20} {'LAST LOGIN':20} STATE", file=out)
                for u in users.list_users(session):
                    state = "disabled" if u.disabled else "locked" if users.is_locked(u) else "active"
                    last = u.last_login_at.strftime("%Y-%m-%d %H:%M:%S") if u.last_login_at else "-"
                    print(f"{u.username:24} {u.role:10} {u.created_at:%Y-%m-%d %H:%M:%S}  {last:20} {state}", file=out)
            elif args.users_command == "token":
                user = users.get_user(session, args.username)
                if user is None:
                    print(f"earshot: no user {args.username!r}", file=sys.stderr)
                    return 1
                try:
                    _row, token = users.create_token(session, user, args.name)
                except users.UserError as exc:
                    print(f"earshot: {exc}", file=sys.stderr)
                    return 1
                session.commit()
                print(token, file=out)  # the only time it is shown: only its hash is stored
        return 0
    finally:
        engine.dispose()

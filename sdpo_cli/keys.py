"""`sdpo keys create|list|revoke`: API keys, written straight into the service's database.

A local command: it reads the same SDPO_* settings as the API (core.settings), so `keys create`
writes to the database the API uses. It imports core (SQLAlchemy, the models) only when it runs,
so the HTTP commands of `sdpo` never load the server's code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from sqlalchemy.orm import Session


def _session() -> AbstractContextManager[Session]:
    """One transaction on SDPO_DATABASE_URL, committed when the block ends without an error."""
    from core.db import make_engine, make_session_factory, session_scope
    from core.settings import get_settings

    return session_scope(make_session_factory(make_engine(get_settings().database_url)))


def _database_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`run`, with a refused value (core.errors.ServiceError) or a database that is not migrated
    told in one line on stderr and exit code 2."""

    @wraps(run)
    def handler(args: argparse.Namespace) -> int:
        from sqlalchemy.exc import OperationalError, ProgrammingError

        from core.errors import ServiceError

        try:
            return run(args)
        except ServiceError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        except (OperationalError, ProgrammingError) as exc:
            # The usual cause is a database that was never migrated.
            print(f"error: database not ready ({type(exc.orig).__name__}); run `alembic upgrade head` "
                  "with the same SDPO_DATABASE_URL first", file=sys.stderr)
            return 2

    return handler


@_database_errors
def _create(args: argparse.Namespace) -> int:
    from core.keys import create_api_key

    with _session() as session:
        row, plaintext = create_api_key(session, name=args.name, owner=args.owner, is_admin=args.admin)
        key_id, owner = row.id, row.owner
    # Only the hash is stored (committed above): this is the one time the key is visible.
    print(plaintext)
    print(f"id={key_id} owner={owner} admin={'yes' if args.admin else 'no'} "
          "(store the key now: it cannot be shown again)", file=sys.stderr)
    return 0


@_database_errors
def _list(_args: argparse.Namespace) -> int:
    from core.keys import list_keys

    with _session() as session:
        for row in list_keys(session):
            state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
            print(f"{row.id}\t{row.owner}\t{row.name}\t{'admin' if row.is_admin else 'user'}\t{state}")
    return 0


@_database_errors
def _revoke(args: argparse.Namespace) -> int:
    from core.keys import revoke_key

    with _session() as session:
        row = revoke_key(session, args.key_id)
    if row is None:
        print(f"no key {args.key_id}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}", file=sys.stderr)
    return 0


def register_keys(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    sub = keys.add_subparsers(dest="keys_command", required=True)

    create = sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True, help="a label for the key (e.g. who or what uses it)")
    create.add_argument("--owner", help="the owner its objects belong to (default: the name); keys with "
                                        "the same owner see the same files and jobs")
    create.add_argument("--admin", action="store_true", help="may register models (POST /v1/models)")
    create.set_defaults(handler=_create)

    sub.add_parser("list", help="list keys (never their secrets)").set_defaults(handler=_list)

    revoke = sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_revoke)

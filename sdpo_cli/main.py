"""`sdpo` command line.

    sdpo up [--host H] [--port P]                            the API and one worker (sdpo_cli.up)
    sdpo demo                                                the main job (sdpo_cli.demo)
    sdpo keys create --name NAME [--owner OWNER] [--admin]   print a new API key (shown once)
    sdpo keys list                                           keys, without their secrets
    sdpo keys revoke KEY_ID                                  revoke a key
    sdpo files|jobs|checkpoints …                            the HTTP client (sdpo_cli.client)

Commands read the same SDPO_* settings as the API (core.settings), so `keys create` writes to
the database the API uses. Each command is a `register_*` function that adds its sub-parser and
sets `handler`; a new command is one more `register_*` call in `build_parser`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sqlalchemy.exc import OperationalError, ProgrammingError

from core.db import make_engine, make_session_factory, session_scope
from core.errors import ServiceError
from core.keys import create_api_key, list_keys, revoke_key
from core.settings import get_settings
from sdpo_cli.client import register_client
from sdpo_cli.demo import register_demo
from sdpo_cli.up import register_up


def _session_factory():
    return make_session_factory(make_engine(get_settings().database_url))


# ------------------------------------------------------------------------------------------------
# sdpo keys …


def _keys_create(args: argparse.Namespace) -> int:
    with session_scope(_session_factory()) as session:
        row, plaintext = create_api_key(session, name=args.name, owner=args.owner, is_admin=args.admin)
        key_id, owner = row.id, row.owner
    # Only the hash is stored: this is the one time the key is visible.
    print(plaintext)
    print(f"id={key_id} owner={owner} admin={'yes' if args.admin else 'no'} "
          "(store the key now: it cannot be shown again)", file=sys.stderr)
    return 0


def _keys_list(_args: argparse.Namespace) -> int:
    with session_scope(_session_factory()) as session:
        for row in list_keys(session):
            state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
            print(f"{row.id}\t{row.owner}\t{row.name}\t{'admin' if row.is_admin else 'user'}\t{state}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    with session_scope(_session_factory()) as session:
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
    create.set_defaults(handler=_keys_create)

    sub.add_parser("list", help="list keys (never their secrets)").set_defaults(handler=_keys_list)

    revoke = sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_keys_revoke)


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdpo", description="Stepwise DPO (sDPO) training service.")
    commands = parser.add_subparsers(dest="command", required=True)
    register_keys(commands)
    register_up(commands)
    register_demo(commands)
    register_client(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except (OperationalError, ProgrammingError) as exc:
        # The usual cause is a database that was never migrated.
        print(f"error: database not ready ({type(exc.orig).__name__}); run `alembic upgrade head` "
              "with the same SDPO_DATABASE_URL first", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

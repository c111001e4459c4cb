"""`sdpo` command line.

    sdpo up [--host H] [--port P]                            the API and one worker (sdpo_cli.up)
    sdpo demo                                                the main job (sdpo_cli.demo)
    sdpo keys create --name NAME [--owner OWNER] [--admin]   print a new API key (shown once)
    sdpo keys list                                           keys, without their secrets
    sdpo keys revoke KEY_ID                                  revoke a key
    sdpo files|jobs|checkpoints …                            the HTTP client (sdpo_cli.client)

The HTTP commands talk to the service through sdpo_cli.sdk only. The local ones (up, demo's
embedded service, keys) read the same SDPO_* settings as the API and import core (SQLAlchemy,
the models, migrations) when they run, never when this module is imported (tests/cli pins it).
Each command is a `register_*` function that adds its sub-parser and sets `handler`; a new command
is one more `register_*` call in `build_parser`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sdpo_cli.client import register_client
from sdpo_cli.demo import register_demo
from sdpo_cli.keys import register_keys
from sdpo_cli.up import register_up


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
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

"""The service `sdpo up` started on this machine, found without the server's code.

`sdpo up` writes `SDPO_HOME/service.json` (`{"url", "api_pid", "worker_pid", "home"}`) and keeps the
admin key in `SDPO_ADMIN_KEY` or `SDPO_HOME/admin_key`. SDPO_HOME defaults to `./.sdpo`, as
`core.settings.Settings.home` does (tests/cli/test_sdk.py checks that the two agree).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx


def home() -> Path:
    """SDPO_HOME (default ./.sdpo), absolute."""
    return Path(os.environ.get("SDPO_HOME") or ".sdpo").expanduser().resolve()


def running_service(home_dir: Path) -> dict[str, Any] | None:
    """The `service.json` of the service started under `home_dir`, if that service answers /healthz."""
    path = home_dir / "service.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    try:
        if httpx.get(info["url"] + "/healthz", timeout=2).status_code == 200:
            return info
    except httpx.HTTPError:
        pass
    return None


def admin_key(home_dir: Path) -> str | None:
    """SDPO_ADMIN_KEY, else the key `sdpo up` generated into `home_dir/admin_key`, else None."""
    if os.environ.get("SDPO_ADMIN_KEY"):
        return os.environ["SDPO_ADMIN_KEY"]
    path = home_dir / "admin_key"
    return path.read_text().strip() if path.is_file() else None

"""A job's `integrations`: OpenAI's `[{"type": "wandb", "wandb": {...}}]`, plus `mlflow`, checked
at job creation and stored (normalised) on the job, which echoes them; the worker's
`worker/tracking.py` logs each step to them.

Shapes (unknown keys are refused, each error names its place, e.g. `integrations[0].type`):

- `{"type": "wandb", "wandb": {"project": str, "entity": str | null, "name": str | null,
  "tags": [str] | null}}` (OpenAI's). The run is written in W&B's offline mode on the worker
  (no W&B server is called); credentials never come from the job body.
- `{"type": "mlflow", "mlflow": {"tracking_uri": str | null, "experiment_name": str | null,
  "run_name": str | null}}`. Without `tracking_uri`, the server's `SDPO_MLFLOW_TRACKING_URI` (400
  when that is unset). Any other URI is a URL the worker will call, chosen by a user: it must be
  http(s), carry no credentials, and pass the webhooks' SSRF guard (`core.netguard.check_url`,
  with `SDPO_WEBHOOK_ALLOWED_PRIVATE_NETWORKS` as the admin's exceptions); the worker checks the
  addresses it resolves to again before each use.

At most one integration of each type.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from core.errors import InvalidRequest
from core.netguard import Allowance, UnsafeURL, check_url
from core.settings import Settings

INTEGRATION_TYPES = ("wandb", "mlflow")
MAX_NAME = 128  # W&B project/entity/run names and MLflow experiment/run names
MAX_TAGS, MAX_TAG = 50, 64  # W&B refuses tags longer than 64 characters
MAX_URI = 1024

_FIELDS = {
    "wandb": {"project": True, "entity": False, "name": False, "tags": False},  # {field: required}
    "mlflow": {"tracking_uri": False, "experiment_name": False, "run_name": False},
}


def _bad(message: str, param: str, code: str = "invalid_integration") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def check_integrations(raw: list[Any] | None, settings: Settings) -> list[dict[str, Any]] | None:
    """The job's integrations, normalised (every key present, null where not given), or None when
    none were given. Raises `InvalidRequest` (400) naming the bad entry's place."""
    if raw is None:
        return None
    if not isinstance(raw, list):  # pragma: no cover - the request model already types it
        raise _bad("integrations must be a list.", "integrations")
    seen: set[str] = set()
    out = []
    for i, entry in enumerate(raw):
        p = f"integrations[{i}]"
        if not isinstance(entry, dict):
            raise _bad("Each integration must be an object with a type.", p)
        kind = entry.get("type")
        if kind not in INTEGRATION_TYPES:
            raise _bad(f"Unknown integration type {kind!r}; one of {', '.join(INTEGRATION_TYPES)}.", f"{p}.type",
                       "unsupported_integration")
        if kind in seen:
            raise _bad(f"Only one {kind} integration per job.", f"{p}.type")
        seen.add(kind)
        for key in entry:
            if key not in ("type", kind):
                raise _bad(f"Unknown field {key!r} in a {kind} integration.", f"{p}.{key}", "unknown_parameter")
        settings_of = entry.get(kind)
        if kind == "mlflow" and settings_of is None:
            settings_of = {}
        if not isinstance(settings_of, dict):
            raise _bad(f"A {kind} integration needs its settings object under {kind!r}.", f"{p}.{kind}",
                       "missing_required_parameter")
        out.append({"type": kind, kind: _check_fields(kind, settings_of, f"{p}.{kind}", settings)})
    return out


def _check_fields(kind: str, values: dict[str, Any], p: str, settings: Settings) -> dict[str, Any]:
    known = _FIELDS[kind]
    for key in values:
        if key not in known:
            raise _bad(f"Unknown field {key!r}; known: {', '.join(known)}.", f"{p}.{key}", "unknown_parameter")
    out: dict[str, Any] = {}
    for key, required in known.items():
        value = values.get(key)
        if value is None:
            if required:
                raise _bad(f"Missing required parameter: {key!r}.", f"{p}.{key}", "missing_required_parameter")
            out[key] = None
        elif key == "tags":
            out[key] = _check_tags(value, f"{p}.{key}")
        elif key == "tracking_uri":
            out[key] = _check_tracking_uri(value, f"{p}.{key}", settings)
        else:
            out[key] = _check_name(value, f"{p}.{key}")
    if kind == "mlflow" and out["tracking_uri"] is None and not settings.mlflow_tracking_uri:
        raise _bad("This server has no default MLflow tracking server (SDPO_MLFLOW_TRACKING_URI): give "
                   "tracking_uri.", f"{p}.tracking_uri", "missing_required_parameter")
    return out


def _check_name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
        raise _bad(f"Must be a string of 1 to {MAX_NAME} characters.", param)
    if any(ord(c) < 32 for c in value):
        raise _bad("Must not contain control characters.", param)
    return value


def _check_tags(value: Any, param: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_TAGS:
        raise _bad(f"tags must be a list of at most {MAX_TAGS} strings.", param)
    for j, tag in enumerate(value):
        if not isinstance(tag, str) or not tag or len(tag) > MAX_TAG or any(ord(c) < 32 for c in tag):
            raise _bad(f"Each tag must be a string of 1 to {MAX_TAG} characters.", f"{param}[{j}]")
    return list(value)


def _check_tracking_uri(value: Any, param: str, settings: Settings) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_URI:
        raise _bad(f"tracking_uri must be a URL of at most {MAX_URI} characters.", param)
    if value == settings.mlflow_tracking_uri:
        return value  # the admin's own choice: trusted as configured
    try:
        has_credentials = bool(urlsplit(value).username or urlsplit(value).password)
    except ValueError:
        has_credentials = False  # check_url names the malformed URL
    if has_credentials:
        raise _bad("tracking_uri must not carry credentials: the worker's MLflow credentials come from its "
                   "environment, and are only sent to the server's default tracking URI.", param)
    try:
        check_url(value, Allowance.parse(settings.webhook_allowed_private_networks))
    except UnsafeURL as exc:
        # check_url words its refusals for webhooks; the first clause names what is wrong.
        raise _bad(f"tracking_uri is not allowed: {str(exc).split(';')[0].rstrip('.')}. The worker calls this URL, "
                   "so it must be a public http(s) address (an admin can allow private networks with "
                   "SDPO_WEBHOOK_ALLOWED_PRIVATE_NETWORKS, or set SDPO_MLFLOW_TRACKING_URI).", param, exc.code) from None
    return value

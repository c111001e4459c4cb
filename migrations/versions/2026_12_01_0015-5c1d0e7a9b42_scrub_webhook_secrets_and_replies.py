"""Scrub what earlier versions kept of webhook secrets and receivers' replies (data only).

- Stored Idempotency-Key replies of `POST /v1/webhooks` held the signing secret, so a replay showed
  it again: the stored copy loses it (`"secret": null`); the webhook's own row keeps it.
- `webhook_deliveries.last_error` held up to 200 characters of the receiver's reply or the
  connection error's text (a reader of internal services): it becomes a general class, as the
  worker now writes it (`core.webhooks.DELIVERY_ERROR_CLASSES`; the mapping is copied here so this
  revision never changes with the code).

Downgrade changes nothing: what was scrubbed is gone.

Revision ID: 5c1d0e7a9b42
Revises: e4b67df11643
Create Date: 2026-12-01 00:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5c1d0e7a9b42"
down_revision: str | None = "e4b67df11643"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CLASSES = ("blocked_address", "dns_error", "connect_refused", "connect_error", "timeout", "tls_error",
            "protocol_error", "network_error", "invalid_url", "http_1xx", "http_3xx", "http_4xx", "http_5xx",
            "webhook_deleted")


def _error_class(text: str, status_code: int | None) -> str:
    if status_code is not None:
        return f"http_{status_code // 100}xx"
    return "webhook_deleted" if text == "the webhook was deleted" else "network_error"


def upgrade() -> None:
    conn = op.get_bind()
    keys = sa.table("idempotency_keys", sa.column("owner", sa.String), sa.column("key", sa.String),
                    sa.column("response_body", sa.JSON))
    query = sa.select(keys.c.owner, keys.c.key, keys.c.response_body).where(
        sa.cast(keys.c.response_body, sa.Text).like("%whsec_%"))
    for owner, key, body in conn.execute(query).all():
        if isinstance(body, dict) and body.get("object") == "webhook" and body.get("secret"):
            conn.execute(keys.update().where(keys.c.owner == owner, keys.c.key == key)
                         .values(response_body={**body, "secret": None}))

    deliveries = sa.table("webhook_deliveries", sa.column("id", sa.String), sa.column("last_error", sa.String),
                          sa.column("last_status_code", sa.Integer))
    query = sa.select(deliveries.c.id, deliveries.c.last_error, deliveries.c.last_status_code).where(
        deliveries.c.last_error.is_not(None), deliveries.c.last_error.not_in(_CLASSES))
    for delivery_id, text, status_code in conn.execute(query).all():
        conn.execute(deliveries.update().where(deliveries.c.id == delivery_id)
                     .values(last_error=_error_class(text, status_code)))


def downgrade() -> None:
    pass

"""Every change this service makes to kombu's classes, in one place, for the kombu version it was written for.

kombu's SQLAlchemy transport (the embedded broker of `sdpo up`: `sqla+sqlite:///…`) polls its table
for messages once a second by default, which adds a second to every hop of a job's chain. The
interval must be set on the transport class: passed as the `polling_interval` transport option it
also reaches `create_engine()`, which refuses the unknown keyword and breaks the connection.

`install()` is called where the Celery app is made (`core.queue.make_celery`), not at import.
`tests/worker/test_kombu_patches.py` fails when the installed kombu is not `KOMBU_VERSION`: check the
class attribute is still what the transport's consumer reads, then move the pin.
"""

from __future__ import annotations

__all__ = ["KOMBU_VERSION", "SQLALCHEMY_POLLING_INTERVAL", "install"]

KOMBU_VERSION = "5.7.0"  # the kombu this patch was written for and tested on
SQLALCHEMY_POLLING_INTERVAL = 0.1  # seconds between polls of the SQLAlchemy broker's table (kombu: 1.0)


def install() -> None:
    """Set the SQLAlchemy transport's polling interval (idempotent; affects every connection made after)."""
    import kombu.transport.sqlalchemy

    kombu.transport.sqlalchemy.Transport.polling_interval = SQLALCHEMY_POLLING_INTERVAL

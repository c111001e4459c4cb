"""core/kombu_patches.py: pinned to the kombu it was written for, installed where the Celery app is made, and
read by the transport a worker consumes with."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import kombu.transport.sqlalchemy
import kombu.transport.virtual.base

from core.kombu_patches import KOMBU_VERSION, SQLALCHEMY_POLLING_INTERVAL
from core.queue import make_celery
from core.settings import Settings


def test_installed_kombu_is_the_one_the_patch_was_written_for():
    assert version("kombu") == KOMBU_VERSION, (
        f"kombu {version('kombu')} is installed; core/kombu_patches.py was written for {KOMBU_VERSION}. Check that "
        "the virtual transport still sleeps Transport.polling_interval between polls, then move the pin")


def test_the_virtual_transport_polls_at_its_class_attribute():
    source = inspect.getsource(kombu.transport.virtual.base.Transport)
    assert "polling_interval = self.polling_interval" in source and "sleep(polling_interval)" in source
    assert kombu.transport.virtual.base.Transport.polling_interval == 1.0  # kombu's own default, left alone


def test_making_the_app_installs_the_patch_on_the_embedded_broker(tmp_path, monkeypatch):
    # As before any app was made in this process: importing core.queue alone changes nothing.
    if "polling_interval" in vars(kombu.transport.sqlalchemy.Transport):
        monkeypatch.delattr(kombu.transport.sqlalchemy.Transport, "polling_interval")
    assert kombu.transport.sqlalchemy.Transport.polling_interval == 1.0
    app = make_celery(Settings(home=tmp_path))
    assert kombu.transport.sqlalchemy.Transport.polling_interval == SQLALCHEMY_POLLING_INTERVAL
    with app.connection_for_read() as connection:
        assert isinstance(connection.transport, kombu.transport.sqlalchemy.Transport)
        assert connection.transport.polling_interval == SQLALCHEMY_POLLING_INTERVAL

"""Every API test starts from empty tables, an empty broker and an empty store."""

import pytest


@pytest.fixture(autouse=True)
def _clean(clean_state):
    yield

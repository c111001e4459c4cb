"""Webhook registration refuses URLs whose target is internal on its face, in every spelling a
resolver accepts (the worker checks the resolved addresses again at every delivery:
tests/webhooks/test_delivery_guard.py). A refusal is a 400 on `url` and writes nothing."""

from __future__ import annotations

import pytest

from tests.conftest import bearer

HOOKS = "/v1/webhooks"

INTERNAL_URLS = [
    # loopback, in the spellings inet_aton and the IPv6 parser accept
    "http://127.0.0.1:5432/", "http://127.0.0.1./", "http://127.1/", "http://0x7f000001/", "http://2130706433/",
    "http://017700000001/", "http://0177.0.0.1/", "http://0x7f.0.0.1/", "http://127.255.255.254:8080/hook",
    "http://[::1]:6379/", "http://[0:0:0:0:0:0:0:1]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/",
    "http://[64:ff9b::7f00:1]/", "http://[2002:7f00:1::]/",
    # unspecified
    "http://0.0.0.0/", "http://0/", "http://[::]/",
    # link-local (cloud metadata) and its names
    "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "http://metadata.google.internal/",
    "http://metadata/", "http://instance-data/latest/",
    # private, shared (CGNAT), unique-local
    "http://10.0.0.1/", "http://10.255.255.255/", "http://192.168.1.1/", "http://172.16.0.1/",
    "http://172.31.255.255/", "http://100.64.0.1/", "http://100.100.100.200/", "http://[fd00::1]/",
    "http://[fc00::1]/",
    # multicast, reserved, broadcast, documentation
    "http://224.0.0.1/", "http://239.255.255.250:1900/", "http://[ff02::1]/", "http://240.0.0.1/",
    "http://255.255.255.255/", "http://192.0.2.1/", "http://198.18.0.1/",
    # names that are internal by convention, and single-label names (search domains: `redis`, `postgres`)
    "http://localhost/", "http://LOCALHOST:8000/", "http://localhost./", "http://api.localhost/",
    "http://anything.internal/", "http://printer.local/", "http://box.localdomain/", "http://nas.home.arpa/",
    "http://redis:6379/", "http://postgres/",
]
NOT_HTTP = ["ftp://example.com/x", "file:///etc/passwd", "gopher://example.com/", "dict://example.com:11211/",
            "ws://example.com/", "/relative", "//example.com/x", "http:///path-only",
            "http://exa_mple.com/", "http://example.com%2f@127.0.0.1/"]


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_internal_targets_are_refused(client, user_key, count_rows, url):
    before = count_rows()
    response = client.post(HOOKS, headers=bearer(user_key), json={"url": url})
    assert response.status_code == 400, (url, response.text)
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == ("url", "url_not_allowed", "invalid_request_error")
    assert count_rows() == before


@pytest.mark.parametrize("url", NOT_HTTP)
def test_other_schemes_and_malformed_urls_are_refused(client, user_key, count_rows, url):
    before = count_rows()
    response = client.post(HOOKS, headers=bearer(user_key), json={"url": url})
    assert response.status_code == 400, (url, response.text)
    assert response.json()["error"]["param"] == "url"
    assert count_rows() == before


@pytest.mark.parametrize("url", ["https://example.com/hook", "https://hooks.example.org:8443/a?b=c",
                                 "http://93.184.216.34/x", "https://[2606:2800:220:1:248:1893:25c8:1946]/",
                                 "https://xn--bcher-kva.example/"])
def test_public_targets_are_accepted(client, user_key, url):
    response = client.post(HOOKS, headers=bearer(user_key), json={"url": url})
    assert response.status_code == 200, (url, response.text)
    assert response.json()["url"] == url


def test_the_admin_allowance_admits_listed_private_targets(make_client, user_key):
    client = make_client(webhook_allowed_private_networks=["10.1.0.0/16", "127.0.0.1", "receiver.internal",
                                                           "localhost"])
    for url in ("http://10.1.2.3/", "http://127.0.0.1:9000/", "http://127.1:9000/", "http://0x7f000001/",
                "http://[::ffff:127.0.0.1]/", "http://receiver.internal/", "http://LocalHost./"):
        response = client.post(HOOKS, headers=bearer(user_key), json={"url": url})
        assert response.status_code == 200, (url, response.text)
    for url in ("http://10.2.0.1/", "http://127.0.0.2/", "http://other.internal/", "http://169.254.169.254/"):
        response = client.post(HOOKS, headers=bearer(user_key), json={"url": url})
        assert response.status_code == 400 and response.json()["error"]["code"] == "url_not_allowed", url

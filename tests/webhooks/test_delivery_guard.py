"""The delivery side of the SSRF guard (core.netguard.GuardedTransport, what the worker sends
webhooks through), against real listeners on loopback: a name or numeric spelling that resolves
to a non-public address is refused before any connection is made; the admin's allowance admits
listed targets; the connection goes to the address that was checked (a resolver that changes its
answer cannot redirect it), with the URL's Host header and the URL's name for TLS (SNI and the
certificate check). Error classes are general, never the reply or the error text."""

from __future__ import annotations

import socket
import ssl

import httpx
import pytest
import trustme

from core.netguard import NO_ALLOWANCE, Allowance, BlockedAddress, GuardedTransport
from tests.webhooks.conftest import Listener
from worker.webhooks import error_class


def _post(url: str, allowance: Allowance = NO_ALLOWANCE, **transport_options) -> httpx.Response:
    transport = GuardedTransport(allowance, **transport_options)
    with httpx.Client(transport=transport, timeout=5, follow_redirects=False) as client:
        return client.post(url, content=b"{}")


@pytest.mark.parametrize("host", ["localhost", "localhost.", "LocalHost", "127.0.0.1", "127.1", "0x7f000001",
                                  "2130706433", "017700000001", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"])
def test_loopback_in_any_spelling_is_refused_before_connecting(listener, host):
    with pytest.raises(BlockedAddress) as refused:
        _post(f"http://{host}:{listener.port}/hook")
    assert error_class(refused.value) == "blocked_address"
    assert listener.connections == 0 and listener.requests == []


def test_the_allowance_admits_listed_names_and_networks(listener):
    for allowance in (["localhost"], ["LOCALHOST."], ["127.0.0.1"], ["127.0.0.0/8"]):
        response = _post(f"http://localhost:{listener.port}/hook", Allowance.parse(allowance))
        assert response.status_code == 200, allowance
    assert listener.connections == 4 and [r["path"] for r in listener.requests] == ["/hook"] * 4
    # Another private network allowed does not open this one.
    with pytest.raises(BlockedAddress):
        _post(f"http://localhost:{listener.port}/hook", Allowance.parse(["10.0.0.0/8", "other.internal"]))
    assert listener.connections == 4


class Rebinding:
    """A resolver whose answer changes after the first lookup (DNS rebinding)."""

    def __init__(self, *answers: list[str]):
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, host, port, family=0, type=0, *args):  # noqa: A002 (getaddrinfo's names)
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answer]


def test_the_connection_goes_to_the_address_that_was_checked():
    allowed = Listener("127.0.0.2")  # the address the check sees and allows
    other = Listener("127.0.0.1")  # where a second lookup would point
    try:
        resolver = Rebinding(["127.0.0.2"], ["127.0.0.1"])
        allowance = Allowance.parse(["127.0.0.2"])
        response = _post(f"http://hooks.example:{allowed.port}/hook", allowance, resolver=resolver)
        assert response.status_code == 200 and resolver.calls == 1  # resolved once, for check and connect
        assert allowed.requests[0]["headers"]["host"] == f"hooks.example:{allowed.port}"
        # The next connection resolves again, sees the new answer and refuses it.
        with pytest.raises(BlockedAddress):
            _post(f"http://hooks.example:{allowed.port}/hook", allowance, resolver=resolver)
        assert other.connections == 0 and allowed.connections == 1
    finally:
        allowed.close()
        other.close()


def test_one_non_public_address_among_public_ones_refuses_the_name(listener):
    resolver = Rebinding(["93.184.216.34", "127.0.0.1"])
    with pytest.raises(BlockedAddress) as refused:
        _post(f"http://hooks.example:{listener.port}/", resolver=resolver)
    assert refused.value.address == "127.0.0.1" and listener.connections == 0


def test_tls_names_and_verifies_the_urls_host_not_the_address():
    ca = trustme.CA()
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    allowance = Allowance.parse(["127.0.0.2"])
    for cert_name, outcome in (("hooks.example", 200), ("someone-else.example", "tls_error")):
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(cert_name).configure_cert(server_context)
        server = Listener("127.0.0.2", ssl_context=server_context)
        try:
            url = f"https://hooks.example:{server.port}/hook"
            try:
                result = _post(url, allowance, verify=client_context, resolver=Rebinding(["127.0.0.2"])).status_code
            except httpx.HTTPError as exc:
                result = error_class(exc)
            assert result == outcome, cert_name
            assert server.server_names == ["hooks.example"]  # SNI is the URL's name, not 127.0.0.2
            assert len(server.requests) == (1 if outcome == 200 else 0)
        finally:
            server.close()


def test_failures_are_reported_as_general_classes():
    allowance = Allowance.parse(["127.0.0.1"])
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with pytest.raises(httpx.ConnectError) as refused:
        _post(f"http://127.0.0.1:{port}/", allowance)
    assert error_class(refused.value) == "connect_refused"

    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never answers
    try:
        with pytest.raises(httpx.TimeoutException) as timed_out:
            transport = GuardedTransport(allowance)
            with httpx.Client(transport=transport, timeout=0.5) as client:
                client.post(f"http://127.0.0.1:{silent.getsockname()[1]}/", content=b"{}")
        assert error_class(timed_out.value) == "timeout"
    finally:
        silent.close()

    with pytest.raises(httpx.ConnectError) as unknown:
        _post("http://no-such-host.invalid/", Allowance.parse(["no-such-host.invalid"]))
    assert error_class(unknown.value) == "dns_error"

"""Where the service's own HTTP requests (webhook deliveries) may go: public addresses only.

A webhook URL is chosen by a user, and the service POSTs to it from inside the deployment, so an
unguarded URL reaches the database, Redis, the cloud metadata service or any internal HTTP server
(server-side request forgery). Two checks, both with the stdlib `ipaddress` classification:

- `check_url(url, allowance)` when a webhook is registered: refuses other schemes and hosts that
  are internal on their face: an IP literal in any spelling the C resolver accepts (`127.1`,
  `0x7f000001`, `2130706433`, `017700000001`, `[::ffff:127.0.0.1]`, ...) that is not public, and
  names that are internal by convention (`localhost`, `*.localhost`, `*.internal` such as
  `metadata.google.internal`, `*.local`, `*.localdomain`, `*.home.arpa`, and single-label names
  such as `redis`, which resolve through the search domains of the deployment). It does not
  resolve names: registration stays fast and works offline; a name is judged when it is used.
- `GuardedTransport` when a delivery is sent: an httpx transport whose connections resolve the
  host once, refuse it (`BlockedAddress`) if *any* of its addresses is not public, and connect to
  the very address that was checked, so a DNS answer that changes between check and connect
  (rebinding) cannot redirect the request. The request is otherwise untouched: the Host header is
  the URL's, and TLS sends the URL's hostname (SNI) and verifies the certificate against it.

"Public" is `ipaddress`'s `is_global` less multicast, reserved, link-local, loopback and
unspecified addresses; an IPv6 address that carries an IPv4 one (v4-mapped `::ffff:a.b.c.d`,
NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) is judged by the IPv4 address too.

`Allowance` is the admin's exception list (`SDPO_WEBHOOK_ALLOWED_PRIVATE_NETWORKS`): networks in
CIDR form (`10.0.0.0/8`, `127.0.0.1`, `fd00::/8`) whose addresses are allowed, and hostnames
(`receiver.internal`, `localhost`) that may be registered and whose addresses are allowed whatever
they are.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# socket.getaddrinfo's signature: (host, port, family, type, ...) -> [(family, type, proto, canonname, sockaddr)]
Resolver = Callable[..., Sequence[tuple[Any, ...]]]

# Names that never denote a public host (RFC 6761 localhost, RFC 6762 .local, RFC 8375 home.arpa,
# ICANN's 2024 private-use .internal, the common .localdomain).
INTERNAL_NAMES = ("localhost",)
INTERNAL_SUFFIXES = (".localhost", ".internal", ".local", ".localdomain", ".home.arpa")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Letters-digits-hyphen labels: what DNS names are; anything else (%, _, spaces) is refused.
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Candidates for inet_aton's numeric spellings (decimal, octal, hex parts; 1 to 4 of them).
_NUMERIC_HOST = re.compile(r"^[0-9][0-9a-fx]*(\.[0-9][0-9a-fx]*){0,3}$")


class UnsafeURL(ValueError):
    """A webhook URL refused at registration; the message says why (for a 400 on `url`), `code`
    is `invalid_url` (not an http(s) URL) or `url_not_allowed` (an internal target)."""

    def __init__(self, message: str, code: str = "url_not_allowed"):
        super().__init__(message)
        self.code = code


class BlockedAddress(Exception):
    """A connection refused because its host resolves to an address that is not public and not
    allowed; `host` is the URL's host, `address` the offending address (None: no address at all)."""

    def __init__(self, host: str, address: str | None):
        super().__init__(f"{host} resolves to {address}, which is not a public address" if address
                         else f"{host} has no address")
        self.host, self.address = host, address


def normalise_host(host: str) -> str:
    """Lower case, without IPv6 brackets and without the root's trailing dot (`localhost.`)."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host[:-1] if host.endswith(".") else host


def ip_literal(host: str) -> IPAddress | None:
    """The address `host` spells, if it is an IP literal in any form the C resolver accepts
    (`inet_aton`: `127.1`, `0x7f000001`, `2130706433`, `0177.0.0.1`), else None (a name)."""
    host = normalise_host(host)
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (v4-mapped, NAT64, 6to4), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def is_public(address: IPAddress) -> bool:
    """True for an address on the public internet (see the module's docstring)."""
    inner = embedded_ipv4(address)
    if inner is not None and not is_public(inner):
        return False
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_link_local
                                      or address.is_loopback or address.is_unspecified)


def is_internal_name(host: str) -> bool:
    """True for names that are internal by convention, and for single-label names."""
    host = normalise_host(host)
    return host in INTERNAL_NAMES or host.endswith(INTERNAL_SUFFIXES) or "." not in host


@dataclass(frozen=True)
class Allowance:
    """Private targets the admin allows: networks (any address in them) and exact hostnames."""

    networks: tuple[IPNetwork, ...] = ()
    hostnames: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowance:
        """From `10.0.0.0/8`, `127.0.0.1`, `[::1]`, `fd00::/8`, `receiver.internal`; raises
        ValueError naming an entry that is neither a network nor a hostname."""
        networks, hostnames = [], set()
        for raw in entries:
            entry = normalise_host(raw)
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if "/" in entry or not all(_LABEL.match(label) for label in entry.split(".")):
                raise ValueError(f"{raw!r} is neither a network (CIDR) nor a hostname")
            hostnames.add(entry)
        return cls(tuple(networks), frozenset(hostnames))

    def allows_address(self, address: IPAddress) -> bool:
        inner = embedded_ipv4(address)
        return any(address in net or (inner is not None and inner in net) for net in self.networks)

    def allows_hostname(self, host: str) -> bool:
        return normalise_host(host) in self.hostnames


NO_ALLOWANCE = Allowance()


def check_url(url: str, allowance: Allowance = NO_ALLOWANCE) -> httpx.URL:
    """Refuse a webhook URL whose target is internal on its face (no DNS lookup); returns the
    parsed URL. Raises `UnsafeURL` with a message that says what is wrong."""
    try:
        split_host = urlsplit(url).hostname or ""
    except ValueError:  # a malformed IPv6 literal: httpx says so below
        split_host = ""
    # A numeric spelling that httpx itself refuses (`0177.0.0.1`) is still named for what it is.
    _check_literal(ip_literal(split_host), allowance)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UnsafeURL(f"url is not a valid URL ({exc}).", "invalid_url") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UnsafeURL("url must be an absolute http(s) URL.", "invalid_url")
    # raw_host is what is resolved and connected to (IDNA-encoded); judge that, not the display form.
    host = normalise_host(parsed.raw_host.decode("ascii"))
    address = ip_literal(host)
    if address is not None:
        _check_literal(address, allowance)
        return parsed
    if allowance.allows_hostname(host):
        return parsed
    if not all(_LABEL.match(label) for label in host.split(".")):
        raise UnsafeURL("url's host must be a DNS name (letters, digits, '-', '.') or an IP address.", "invalid_url")
    if is_internal_name(host):
        raise UnsafeURL(f"url's host {host!r} is an internal name; webhooks are sent to the public internet "
                        "only (an admin can allow private hosts).")
    return parsed


def _check_literal(address: IPAddress | None, allowance: Allowance) -> None:
    if address is not None and not (is_public(address) or allowance.allows_address(address)):
        raise UnsafeURL(f"url points at {address}, which is not a public address; webhooks are sent to the "
                        "public internet only (an admin can allow private networks).")


def resolve_checked(host: str, port: int, allowance: Allowance = NO_ALLOWANCE, *,
                    resolver: Resolver = socket.getaddrinfo) -> list[IPAddress]:
    """The addresses of `host` (resolved once, in the resolver's order) if every one of them is
    public or allowed; raises `BlockedAddress` otherwise, `httpcore.ConnectError` when the name
    does not resolve."""
    literal = ip_literal(host)
    if literal is not None:
        # Even a numeric spelling is connected to in its canonical form, never re-parsed.
        addresses = [literal]
    else:
        try:
            infos = resolver(normalise_host(host), port, 0, socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise httpcore.ConnectError(f"name resolution failed: {exc}") from exc
        addresses = []
        for info in infos:
            try:
                address = ipaddress.ip_address(info[4][0])
            except ValueError:  # an answer we cannot classify is not trusted
                raise BlockedAddress(host, str(info[4][0])) from None
            if address not in addresses:
                addresses.append(address)
    if not addresses:
        raise BlockedAddress(host, None)
    if literal is None and allowance.allows_hostname(host):
        return addresses
    for address in addresses:
        if not (is_public(address) or allowance.allows_address(address)):
            raise BlockedAddress(host, str(address))
    return addresses


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, connecting only to checked addresses (see `resolve_checked`)."""

    def __init__(self, allowance: Allowance = NO_ALLOWANCE, *, resolver: Resolver = socket.getaddrinfo):
        self.allowance, self.resolver = allowance, resolver

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        addresses = resolve_checked(host, port, self.allowance, resolver=self.resolver)
        last_error: httpcore.ConnectError | None = None
        for address in addresses:  # like socket.create_connection: the next address if one refuses
            try:
                return super().connect_tcp(str(address), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last_error = exc
        assert last_error is not None
        raise last_error


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport that only connects to public (or allowed) addresses, each resolved and
    checked once per connection; no proxy from the environment. TLS verification as httpx's
    default (`verify`: True, False or an `ssl.SSLContext`)."""

    def __init__(self, allowance: Allowance = NO_ALLOWANCE, *, verify: ssl.SSLContext | bool = True,
                 resolver: Resolver = socket.getaddrinfo, limits: httpx.Limits | None = None):
        limits = limits or httpx.Limits(max_connections=10, max_keepalive_connections=0)
        ssl_context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify)
        super().__init__(verify=ssl_context, trust_env=False, limits=limits)
        # httpx has no public way to give its connection pool a network backend; the pool it made
        # is replaced by the same pool with ours (HTTPTransport only uses it through `_pool`).
        self._pool.close()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(allowance, resolver=resolver))

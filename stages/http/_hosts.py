"""Which URLs may be fetched: the scheme and host rules, ``deny_private``'s address check.

The rules are applied to each request as requests will send it (the prepared URL, every
redirect hop), never to a parse that disagrees with the connection; with ``deny_private`` the
address actually connected is checked too (:meth:`_HostCheck.peer`), before a byte is sent.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import urllib.parse
from collections.abc import Callable
from typing import Annotated

import idna
import pydantic
import requests

from pipeline import TransientError

from ._errors import DownloadError, _redact

_SCHEMES = ("http", "https")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Shared address space (RFC 6598): carrier-grade NAT, and inside some clouds (Alibaba's metadata
# service is 100.100.100.200). ipaddress counts it neither private nor global.
_SHARED_SPACE = ipaddress.ip_network("100.64.0.0/10")


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: where the IPv4 sits varies
_TEREDO = ipaddress.ip_network("2001::/32")


def _private_reason(address: IPAddress) -> str | None:
    """What kind of non-public address ``address`` is ("a loopback address"), or ``None`` if public.

    An IPv6 address that carries an IPv4 one (IPv4-mapped ``::ffff:0:0/96``, 6to4 ``2002::/16``,
    NAT64 ``64:ff9b::/96``) is judged by the IPv4 address it carries; local-use NAT64 and Teredo
    (``2001::/32``), which reach IPv4 hosts through relays this check cannot see, are refused.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded: tuple[str, ipaddress.IPv4Address] | None = None
        if address.ipv4_mapped is not None:
            embedded = ("an IPv4-mapped address", address.ipv4_mapped)
        elif address.sixtofour is not None:
            embedded = ("a 6to4 address", address.sixtofour)
        elif address in _NAT64:
            embedded = ("a NAT64 address", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        elif address in _LOCAL_NAT64:
            return "a local-use NAT64 address (it may reach any IPv4 host behind the translator)"
        elif address in _TEREDO:
            return "a Teredo address (it reaches IPv4 hosts through a relay)"
        if embedded is not None:
            kind, inner = embedded
            reason = _private_reason(inner)
            return None if reason is None else f"{kind} embedding {inner}, {reason}"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        if address == ipaddress.IPv4Address("169.254.169.254"):
            return "a link-local address (the cloud metadata service)"
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private or address in _SHARED_SPACE:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    return None


def _host_patterns(hosts: list[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """Exact names, and the ``.suffix`` of each ``"*.suffix"`` pattern."""
    cleaned = [h.strip().lower().rstrip(".") for h in hosts]
    return (
        frozenset(h for h in cleaned if not h.startswith("*.")),
        tuple(h[1:] for h in cleaned if h.startswith("*.")),
    )


def _host_list(value: object, info: pydantic.ValidationInfo) -> object:
    if not isinstance(value, list | tuple):
        raise ValueError(
            f"{info.field_name} must be a list of host names, got {value!r}; "
            'write for example ["images.example.com", "*.cdn.example.com"]'
        )
    bad = [h for h in value if not isinstance(h, str) or not h.strip()]
    if bad:
        raise ValueError(
            f"{info.field_name} must hold host names, got {bad[0]!r}; "
            "write each host as a non-empty string, or remove the entry"
        )
    return value


def _not_empty_hosts(value: list[str], info: pydantic.ValidationInfo) -> list[str]:
    if not value:
        raise ValueError(
            f"{info.field_name} is an empty list, which refuses every URL; "
            "list the hosts to allow, or remove the option to allow any host"
        )
    return value


HostList = Annotated[list[str], pydantic.BeforeValidator(_host_list)]
"""Host names, each exact (``"example.com"``) or a ``"*.suffix"`` pattern."""

AllowedHosts = Annotated[HostList, pydantic.AfterValidator(_not_empty_hosts)]
"""A :data:`HostList` that is not empty (an empty allow-list would refuse every URL)."""


class _HostCheck:
    """The scheme and host rules, applied to each request as requests sends it.

    :meth:`prepare` reads a catalog URL as requests will (``PreparedRequest.prepare_url``) and
    refuses one that ``urllib.parse`` reads as another host: ``http://127.0.0.1:8080\\@a.example/``
    is ``a.example`` to urllib but a request to 127.0.0.1. :meth:`rules` then judges the host
    of a prepared URL, the one requests' adapter connects to, for the first URL and every
    redirect hop. With ``deny_private`` a host name is resolved here, and the connection
    resolves it again: :meth:`peer` checks the address actually connected, so a DNS server
    that answers differently the second time (DNS rebinding) is caught once connected, before
    anything is sent.
    """

    def __init__(
        self,
        allowed_hosts: list[str] | None,
        denied_hosts: list[str] | None = None,
        deny_private: bool = False,
        resolve: Callable[[str], list[str]] | None = None,
    ) -> None:
        self._exact: frozenset[str] | None = None
        self._suffixes: tuple[str, ...] = ()
        if allowed_hosts is not None:
            self._exact, self._suffixes = _host_patterns(allowed_hosts)
        self._denied_exact, self._denied_suffixes = _host_patterns(denied_hosts or [])
        self.deny_private = deny_private
        self._resolve = resolve or _resolve

    def __call__(self, url: str, *, what: str) -> None:
        """Check ``url`` as :meth:`prepare` then :meth:`rules` do (for tests and direct use)."""
        self.rules(self.prepare(url, what=what), what=what)

    def prepare(self, url: str, *, what: str) -> str:
        """Return ``url`` as requests will send it, after checking that it is one.

        Raises:
            DownloadError: Not an http(s) URL with a host, or an ambiguous one.
        """
        shown = _redact(url)
        written = self._host(url, shown, what)
        request = requests.PreparedRequest()
        try:
            request.prepare_url(url, None)
        except (requests.RequestException, ValueError) as exc:
            raise DownloadError(
                f"{what} {shown!r} is not a valid URL ({exc}); fix the URL", url=shown
            ) from exc
        prepared = str(request.url)
        sent = (urllib.parse.urlsplit(prepared).hostname or "").rstrip(".")
        if not written.isascii():
            # The encoding prepare_url uses (IDNA 2008 with UTS 46), so an honest IDN matches.
            with contextlib.suppress(idna.IDNAError):
                written = idna.encode(written, uts46=True).decode("ascii")
        if written.isascii() and written.lower() != sent.lower():
            raise DownloadError(
                f"{what} {shown!r} is ambiguous: it reads as host {written!r}, but requests would "
                f"connect to host {sent!r} (a backslash, or another character URL parsers read "
                "differently, in front of '@'); fix the URL",
                url=shown,
            )
        return prepared

    def rules(self, url: str, *, what: str) -> None:
        """Apply the scheme and host rules to ``url``, a prepared URL, before it is requested.

        The host is read with ``urllib.parse``, exactly as requests' adapter reads it to pick
        the connection.

        Raises:
            DownloadError: The URL is refused.
            TransientError: With ``deny_private``, its host name did not resolve.
        """
        shown = _redact(url)
        host = self._host(url, shown, what)
        if host in self._denied_exact or (self._denied_suffixes and host.endswith(self._denied_suffixes)):
            raise DownloadError(
                f"{what} {shown!r} is on host {host!r}, which is in denied_hosts; "
                "remove the URL from the catalog, or the host from the stage's denied_hosts",
                url=shown,
            )
        if self._exact is not None and host not in self._exact and not host.endswith(self._suffixes):
            raise DownloadError(
                f"{what} {shown!r} is on host {host!r}, which is not in allowed_hosts; "
                "add it to the stage's allowed_hosts or fix the URL",
                url=shown,
            )
        if self.deny_private:
            self._check_addresses(url, host, what)

    def peer(self, address: str, host: str, shown: str) -> None:
        """With ``deny_private``, refuse a connection to ``host`` that reached ``address``.

        Raises:
            DownloadError: ``address`` is not public.
        """
        if not self.deny_private:
            return
        reason = _private_reason(ipaddress.ip_address(address.partition("%")[0]))
        if reason is not None:
            raise DownloadError(
                f"GET {shown} is refused: the connection to host {host!r} connected to {address!r}, "
                f"{reason}, and deny_private is set (the name resolved to a public address when "
                "checked: DNS rebinding, or a changing DNS answer); remove the URL from the catalog, "
                "or set deny_private = false if the stage must reach internal hosts",
                url=shown,
            )

    @staticmethod
    def _host(url: str, shown: str, what: str) -> str:
        """The host of ``url`` as ``urllib.parse`` reads it (no trailing dot), once its scheme is
        http(s) and it has one.

        Raises:
            DownloadError: Not a valid http(s) URL with a host.
        """
        try:
            parts = urllib.parse.urlsplit(url)
            host = (parts.hostname or "").rstrip(".")
        except ValueError as exc:
            raise DownloadError(
                f"{what} {shown!r} is not a valid URL ({exc}); fix the URL", url=shown
            ) from exc
        if parts.scheme.lower() not in _SCHEMES:
            raise DownloadError(
                f"{what} {shown!r} has {parts.scheme or 'no scheme'!r}: only http and https URLs are "
                "downloaded; fix the URL",
                url=shown,
            )
        if not host:
            raise DownloadError(f"{what} {shown!r} has no host; fix the URL", url=shown)
        return host

    def _check_addresses(self, url: str, host: str, what: str) -> None:
        shown = _redact(url)
        try:
            addresses = [ipaddress.ip_address(host)]
            literal = True
        except ValueError:
            try:
                resolved = self._resolve(host)
            except OSError as exc:
                # requests would fail to connect the same way; a DNS outage passes, so retry.
                raise TransientError(
                    f"{what} {shown!r}: host {host!r} could not be resolved ({exc}), so deny_private "
                    "cannot check its addresses"
                ) from exc
            addresses = [ipaddress.ip_address(a.partition("%")[0]) for a in resolved]
            literal = False
        for address in addresses:
            reason = _private_reason(address)
            if reason is not None:
                target = f"host {host!r} is" if literal else f"host {host!r} resolves to {str(address)!r},"
                raise DownloadError(
                    f"{what} {shown!r} is refused: {target} {reason}, and deny_private is set; "
                    "remove the URL from the catalog, or set deny_private = false if the stage must "
                    "reach internal hosts",
                    url=shown,
                )


def _resolve(host: str) -> list[str]:
    """Every address ``host`` resolves to, as requests would connect to it."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})

"""Strict http(s) URL parsing: one reading of a URL that the allow-list, the token check and the connection share.

Parsers disagree on odd URLs: for `http://127.0.0.1:9\\@ls:8080/x` the stdlib sees host `ls`, urllib3 (what
requests connects with) sees `127.0.0.1`. So a URL is accepted only in a form every parser reads the same way
(no backslashes, userinfo, percent-encoding or non-ASCII in the authority, no zone ids, canonical IPv4 only),
reduced to an `Origin`, and the request is made to the canonical URL rebuilt from that origin, checked once
more with urllib3's own parser.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from urllib3.util import parse_url

DEFAULT_PORTS = {"http": 80, "https": 443}
_AUTHORITY = re.compile(r"(?:(?P<name>[a-z0-9.-]+)|\[(?P<ip6>[0-9a-f:.]+)\])(?::(?P<port>[0-9]{1,5}))?")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class UnsafeURL(ValueError):
    """A URL that is malformed or ambiguous; the message says what is wrong with it (never the query)."""


@dataclass(frozen=True)
class Origin:
    """scheme + canonical host + port: the unit the allow-list and the token are bound to."""
    scheme: str
    host: str          # lower-case name, dotted-quad IPv4, or compressed IPv6 without brackets
    port: int

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}"


def canonical_host(host: str) -> str:
    """A host name or IP literal -> its one canonical spelling; raises UnsafeURL for ambiguous forms."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise UnsafeURL(f"{host[:60]!r} is not a valid IPv6 address (zone ids are not accepted)") from None
    if host.endswith("."):
        raise UnsafeURL(f"host {host[:60]!r} ends with a dot; write it without the trailing dot")
    try:
        packed = socket.inet_aton(host)          # what the C resolver would take as an IPv4 literal
    except OSError:
        packed = None
    if packed is not None:
        canonical = socket.inet_ntoa(packed)
        if canonical != host:
            raise UnsafeURL(f"host {host[:60]!r} is an IPv4 address in an unusual form "
                            f"(decimal, octal, hex or short); write it as {canonical}")
        return host
    labels = host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels) or len(host) > 253:
        raise UnsafeURL(f"host {host[:60]!r} is not a valid host name")
    if labels[-1].isdigit():
        raise UnsafeURL(f"host {host[:60]!r} ends in a number but is not an IPv4 address")
    return host


def parse_authority(authority: str, scheme: str = "http") -> Origin:
    """'host', 'host:port' or '[v6]:port' -> Origin; raises UnsafeURL."""
    if "@" in authority:
        raise UnsafeURL("URLs with user information (user:password@host) are not accepted")
    if "%" in authority:
        raise UnsafeURL("percent-encoding in the host is not accepted")
    if not authority.isascii():
        raise UnsafeURL("non-ASCII host names are not accepted; write the host in its IDNA form (xn--...)")
    m = _AUTHORITY.fullmatch(authority.lower())
    if m is None:
        raise UnsafeURL(f"{authority[:80]!r} is not a valid host[:port]")
    host = canonical_host(m["name"] if m["name"] is not None else m["ip6"])
    port = int(m["port"]) if m["port"] else DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise UnsafeURL(f"port {port} is out of range")
    return Origin(scheme, host, port)


def parse_http_url(url: str) -> tuple[Origin, str]:
    """An http(s) URL -> (its origin, the canonical URL to connect to). Raises UnsafeURL.

    The canonical URL is rebuilt from the checked parts (fragment dropped) and read back with urllib3's
    parser, the one requests connects with; both readings must name the same host and port.
    """
    if not isinstance(url, str):
        raise UnsafeURL(f"a URL must be a string, got {type(url).__name__}")
    if "\\" in url:
        raise UnsafeURL("URLs with backslashes are not accepted")
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise UnsafeURL("URLs with control characters are not accepted")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise UnsafeURL(f"malformed URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UnsafeURL(f"only http and https URLs are fetched, not {scheme or 'a relative path'!r}")
    origin = parse_authority(parts.netloc, scheme)
    path = parts.path or "/"
    canonical = f"{origin}{path}" + (f"?{parts.query}" if parts.query else "")
    try:
        check = parse_url(canonical)
    except ValueError as e:
        raise UnsafeURL(f"malformed URL ({type(e).__name__})") from None
    seen_host = (check.host or "").strip("[]").lower()
    if seen_host != origin.host or (check.port or DEFAULT_PORTS[scheme]) != origin.port:
        raise UnsafeURL("the URL's host reads differently to different parsers")
    return origin, canonical


def path_prefix(url: str) -> str:
    """The path a service is served at, without its trailing slash ("/ls" for https://host/ls/; "" at the root):
    Label Studio behind a proxy at a path (LABEL_STUDIO_HOST=https://host/ls) names its own URLs under it."""
    return urlsplit(url).path.rstrip("/") if url else ""


def parse_host_entry(entry: str) -> tuple[str, int | None]:
    """A TESSERA_ALLOWED_HOSTS entry ('host', 'host:port', '[v6]:port' or a URL) -> (host, port or None)."""
    entry = entry.strip().lower()
    if "://" in entry:
        origin, _ = parse_http_url(entry)
        return origin.host, origin.port
    origin = parse_authority(entry)
    has_port = bool(re.search(r":[0-9]+$", entry)) and (not entry.startswith("[") or "]:" in entry)
    return origin.host, origin.port if has_port else None

"""Stand-in HTTP hosts for the media tests: real listeners this process starts on loopback (127.0.0.1 or ::1).

`start(answer)` serves every GET with `answer(path) -> (status, headers, body)` on a free port and records
each request's (path, Authorization header) in `server.seen`; `start(handler=...)` serves a handler class
of one's own (a host that trickles its bytes).
"""
from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Answer = Callable[[str], tuple[int, dict, bytes]]
LOOPBACK = ("127.0.0.1", "::1")


class Recording(BaseHTTPRequestHandler):
    """Records (path, Authorization) and answers with the server's `answer`."""

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        status, headers, body = self.server.answer(self.path)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


class StandIn(ThreadingHTTPServer):
    """A loopback HTTP server on a free port; `url` is its origin, `seen` the requests it got."""
    daemon_threads = True

    def __init__(self, host: str, handler: type[BaseHTTPRequestHandler], answer: Answer | None):
        assert host in LOOPBACK, f"stand-in hosts listen on loopback only, not {host!r}"
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), handler)
        self.answer, self.seen = answer, []

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


def start(answer: Answer | None = None, host: str = "127.0.0.1",
          handler: type[BaseHTTPRequestHandler] = Recording) -> StandIn:
    """A StandIn serving on a daemon thread; call .shutdown() when done."""
    srv = StandIn(host, handler, answer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def ok(body: bytes) -> tuple[int, dict, bytes]:
    return 200, {}, body


def has_ipv6() -> bool:
    """Whether ::1 can be listened on here (some containers have no IPv6 loopback)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class _PrefixProxy(BaseHTTPRequestHandler):
    """Forwards every request under the server's `prefix` to `target` with the prefix removed, as a reverse proxy
    in front of an app served at a path does (nginx: location /ls/ { proxy_pass http://app/; })."""

    def _forward(self):
        import httpx

        prefix, target = self.server.answer
        if not (self.path == prefix or self.path.startswith(prefix + "/")):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        r = httpx.request(self.command, target + (self.path[len(prefix):] or "/"), headers=headers, content=body,
                          timeout=300)
        self.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *a):
        pass


def start_prefix_proxy(prefix: str) -> StandIn:
    """A reverse proxy on 127.0.0.1 serving an app under `prefix`; set `server.answer = (prefix, target)`
    once the app's origin is known."""
    srv = start(None, handler=_PrefixProxy)
    srv.answer = (prefix, "")
    return srv

"""`tessera serve`: the app under waitress, a server that reads whole request bodies before a thread runs the app.

gunicorn's gthread workers hand a connection to a thread, which then blocks reading the body: 16 clients
sending one byte a second held every thread and /health timed out. waitress reads requests in one async
loop (poll), buffers each body (to a temp file past `inbuf_overflow`) and only dispatches complete requests
to its thread pool, so slow clients cost a socket each, not a thread. With `--workers N` > 1 the listening
socket is bound once and N forked processes serve it (each with its own model cache, as before).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time

from tessera.backend.settings import Settings

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("tessera.access")


class AccessLog:
    """WSGI middleware: one line per request, without credentials (no user name, no query string)."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        t0 = time.perf_counter()
        status = {}

        def _start(code, headers, exc_info=None):
            status["code"] = code.split(" ", 1)[0]
            return start_response(code, headers, exc_info)

        try:
            return self.app(environ, _start)
        finally:
            access_logger.info('%s "%s %s" %s %.0fms', environ.get("REMOTE_ADDR", "-"), environ.get("REQUEST_METHOD"),
                               environ.get("PATH_INFO", ""), status.get("code", "-"),
                               (time.perf_counter() - t0) * 1000)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


def _run(sock: socket.socket, settings: Settings, threads: int) -> None:
    from waitress import create_server

    from tessera.backend.app import create_app

    app = AccessLog(create_app(settings))
    server = create_server(
        app, sockets=[sock], threads=threads, ident="tessera",
        max_request_body_size=settings.max_request_bytes,   # larger bodies: 413 before they are read
        max_request_header_size=64 * 1024,
        connection_limit=settings.connection_limit,     # open connections (slow or not) before the backlog
        channel_timeout=settings.channel_timeout_s,     # seconds a connection may send nothing at all
        asyncore_use_poll=True,          # select() breaks past 1024 file descriptors
        clear_untrusted_proxy_headers=True)
    logger.info("tessera serving on %s with %d threads (pid %d)", sock.getsockname()[:2], threads, os.getpid())
    server.run()


def _exit(signum, frame):
    raise SystemExit(0)


def serve(settings: Settings, host: str, port: int, workers: int = 1, threads: int = 8) -> int:
    """Bind host:port and serve until SIGTERM/SIGINT."""
    if workers < 1 or threads < 1:
        raise ValueError("--workers and --threads must be at least 1")
    sock = _listen(host, port)
    if workers == 1:
        # as PID 1 in a container a signal without a handler is ignored: `docker stop` would wait for SIGKILL
        signal.signal(signal.SIGTERM, _exit)
        try:
            _run(sock, settings, threads)
        except (KeyboardInterrupt, SystemExit):
            pass
        return 0
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:                                       # child: serve the shared socket
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            try:
                _run(sock, settings, threads)
            finally:
                os._exit(0)
        children.append(pid)
    sock.close()

    def _stop(signum, frame):
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or (os.waitstatus_to_exitcode(code) > 0)
    logger.info("tessera: %d worker processes stopped", workers)
    sys.stdout.flush()
    return int(status)

"""Label Studio 1.23's personal access tokens for media: Label Studio refuses the token itself on
/data/upload (and a legacy key where the organization turned legacy tokens off, its default), so Tessera
exchanges it at /api/token/refresh/ for a short-lived access token, sent as Bearer to Label Studio only.

A loopback listener plays Label Studio's token refresh and uploads; another plays an allowed media host."""
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler

import jwt
import numpy as np
import pytest
from PIL import Image

from tessera.backend import media as media_mod
from tessera.backend.media import MediaError, MediaResolver, personal_token
from tessera.backend.settings import Settings
from tests.standin import ok, start


def _jwt(claims: dict) -> str:
    return jwt.encode(claims, "a key only this stand-in Label Studio knows", algorithm="HS256")


PAT = _jwt({"token_type": "refresh", "exp": 8103862750, "iat": 1796662750, "jti": "p1", "user_id": "1"})
LEGACY = "0123456789abcdef0123456789abcdef01234567"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 9, 3), 50, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class _LS(BaseHTTPRequestHandler):
    """Label Studio's /api/token/refresh/ (POST) and /data/upload/... (GET, Bearer of the current access only)."""

    def _reply(self, status: int, body: bytes, kind: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        srv.seen.append(("POST " + self.path, self.headers.get("Authorization")))
        if self.path != "/api/token/refresh/" or body.get("refresh") != srv.answer["pat"]:
            return self._reply(401, b'{"detail": "Token is invalid or expired"}')
        with srv.lock:
            srv.answer["n"] += 1
            now = int(time.time())
            srv.answer["access"] = _jwt({"token_type": "access", "iat": now, "exp": now + 300,
                                         "jti": f"a{srv.answer['n']}"})
        self._reply(200, json.dumps({"access": srv.answer["access"]}).encode())

    def do_GET(self):
        srv = self.server
        auth = self.headers.get("Authorization")
        srv.seen.append(("GET " + self.path, auth))
        if auth != f"Bearer {srv.answer['access']}" and auth != f"Token {LEGACY}":
            return self._reply(401, b'{"detail": "Authentication credentials were not provided."}')
        self._reply(200, _png(), "image/png")

    def log_message(self, *a):
        pass


@pytest.fixture
def ls():
    srv = start(None, handler=_LS)
    srv.answer, srv.lock = {"pat": PAT, "access": "", "n": 0}, threading.Lock()
    media_mod._access.clear()
    yield srv
    srv.shutdown()


def _resolver(ls, tmp_path, key=PAT, **kw) -> MediaResolver:
    return MediaResolver(Settings(model_dir=tmp_path, label_studio_url=ls.url, label_studio_api_key=key, **kw))


def test_personal_tokens_are_told_from_legacy_keys():
    assert personal_token(PAT) and not personal_token(LEGACY)
    for junk in ("a.b.c", "x.eyJ0b2tlbl90eXBlIjoiYWNjZXNzIn0.y", "...", "", ".".join([PAT] * 2)):
        assert not personal_token(junk), junk


def test_a_personal_token_is_exchanged_once_and_sent_as_bearer(ls, tmp_path):
    r = _resolver(ls, tmp_path)
    for i in range(5):
        assert r.load_image(f"/data/upload/1/{i}.png").shape == (6, 9, 3)
    assert ls.answer["n"] == 1                                     # one exchange for five images
    gets = [a for p, a in ls.seen if p.startswith("GET")]
    assert gets == [f"Bearer {ls.answer['access']}"] * 5
    assert all(PAT not in (a or "") for _, a in ls.seen)           # the personal token itself is never a header
    # another resolver of the same process (the next request) reuses the access token
    _resolver(ls, tmp_path).fetch("/data/upload/1/x.png")
    assert ls.answer["n"] == 1


def test_an_access_token_label_studio_refuses_is_exchanged_again(ls, tmp_path):
    r = _resolver(ls, tmp_path)
    r.fetch("/data/upload/1/a.png")
    ls.answer["access"] = "rotated-elsewhere"                       # e.g. Label Studio restarted with a new key
    with pytest.raises(MediaError, match="HTTP 401"):
        r.fetch("/data/upload/1/b.png")
    assert r.load_image("/data/upload/1/b.png").shape == (6, 9, 3)
    assert ls.answer["n"] == 2


def test_a_refused_personal_token_is_named(ls, tmp_path):
    ls.answer["pat"] = "another"
    with pytest.raises(MediaError, match="refused LABEL_STUDIO_API_KEY, a personal access token"):
        _resolver(ls, tmp_path).fetch("/data/upload/1/a.png")


def test_neither_token_goes_to_another_host(ls, tmp_path):
    other = start(lambda path: ok(_png()))
    try:
        r = _resolver(ls, tmp_path, allowed_hosts=(f"127.0.0.1:{other.port}",))
        assert r.load_image(f"{other.url}/img.png").shape == (6, 9, 3)
        assert other.seen == [("/img.png", None)] and ls.seen == []    # no exchange either: nothing for LS
        r.fetch("/data/upload/1/a.png")
        r.load_image(f"{other.url}/img2.png")
        assert other.seen[-1] == ("/img2.png", None)
    finally:
        other.shutdown()


def test_a_legacy_key_goes_as_it_is(ls, tmp_path):
    r = _resolver(ls, tmp_path, key=LEGACY)
    r.fetch("/data/upload/1/a.png")
    assert ls.seen == [("GET /data/upload/1/a.png", f"Token {LEGACY}")]

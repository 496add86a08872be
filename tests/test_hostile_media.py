"""The Label Studio key goes to the Label Studio origin and nowhere else, whatever the URL looks like.

Real listeners on loopback record every request's Authorization header: one plays Label Studio, the others
are hosts that are not allowed (127.0.0.1 on another port, ::1). Every URL form that parsers read differently
(backslash, userinfo, fragments, decimal/octal/hex/short IPv4, trailing dots, percent-encoding, IDNA look-alikes,
IPv6) is tried against a resolver that holds the key; the key must never reach another listener.
"""
import io

import numpy as np
import pytest
from PIL import Image

from tessera.backend.app import create_app
from tessera.backend.media import MediaError, MediaResolver
from tessera.backend.predictions import ModelCache
from tessera.backend.settings import Settings
from tests.conftest import CONFIG_ALL, RecordingRunner, register_stub
from tests.standin import has_ipv6, ok, start

KEY = "secret-ls-key-0123456789abcdef01234567"
ENV_KEY = "env-ls-key-fedcba9876543210fedcba98765"


def png_bytes(w=16, h=12):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 250, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _png(path: str):
    return ok(png_bytes())


@pytest.fixture(scope="module")
def servers():
    """Label Studio on 127.0.0.1, another (not allowed) host on 127.0.0.1 and, if the machine has it, on ::1."""
    ls, other = start(_png), start(_png)
    v6 = start(_png, "::1") if has_ipv6() else None
    yield ls, other, v6
    for s in (ls, other, v6):
        if s is not None:
            s.shutdown()


@pytest.fixture
def seen(servers):
    """Clears the recorders; returns them."""
    for s in servers:
        if s is not None:
            s.seen.clear()
    return servers


def _forms(ls_port: int, other: int, v6: int | None) -> list[str]:
    forms = [
        f"http://127.0.0.1:{other}\\@127.0.0.1:{ls_port}/x.png",          # urlparse: LS, urllib3: other
        f"http://127.0.0.1:{other}\\\\@127.0.0.1:{ls_port}/x.png",
        f"http://127.0.0.1:{other}/\\@127.0.0.1:{ls_port}/x.png",
        f"http://127.0.0.1:{ls_port}@127.0.0.1:{other}/x.png",             # userinfo
        f"http://u:{KEY[:4]}@127.0.0.1:{other}/x.png",
        f"http://127.0.0.1:{other}#@127.0.0.1:{ls_port}/x.png",            # fragment / query in the authority
        f"http://127.0.0.1:{other}?@127.0.0.1:{ls_port}/x.png",
        f"http://2130706433:{other}/x.png",                                # decimal, octal, hex, short IPv4
        f"http://0177.0.0.1:{other}/x.png",
        f"http://0x7f.0.0.1:{other}/x.png",
        f"http://0x7f000001:{other}/x.png",
        f"http://127.1:{other}/x.png",
        f"http://2130706433:{ls_port}/x.png",                              # LS itself, spelled oddly
        f"http://localhost:{other}/x.png",
        f"http://localhost.:{other}/x.png",                                # trailing dot
        f"http://127.0.0.%31:{other}/x.png",                               # percent-encoding
        f"http://%6c%6f%63%61%6c%68%6f%73%74:{other}/x.png",
        f"http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:{other}/x.png",  # fullwidth: IDNA -> localhost
        f"http://xn--localhost-:{other}/x.png",
        f"http://127.0.0.1:{other} /x.png",
        f"http://127.0.0.1:{other}\t/x.png",
        f"http://[::ffff:127.0.0.1]:{other}/x.png",                        # IPv4-mapped IPv6
        "http://[::1/x.png",
        f"HTTP://127.0.0.1:{other}/x.png",
        f"//127.0.0.1:{other}/x.png",
        f"/data/upload/../..//127.0.0.1:{other}/x.png",
    ]
    if v6 is not None:
        forms += [f"http://[::1]:{v6}/x.png", f"http://[0:0:0:0:0:0:0:1]:{v6}/x.png", f"http://[::1%25lo]:{v6}/x.png",
                  f"http://127.0.0.1:{ls_port}\\@[::1]:{v6}/x.png", f"http://[::1]:{v6}\\@127.0.0.1:{ls_port}/x.png"]
    return forms


def _try_all(resolver: MediaResolver, forms: list[str]) -> None:
    for url in forms:
        try:
            resolver.fetch(url)
        except MediaError:
            pass


def _leaks(servers, key: str) -> list:
    """Every request that reached a listener other than Label Studio with the key."""
    _, other, v6 = servers
    return [(s.server_address[:2], path, auth) for s in (other, v6) if s is not None
            for path, auth in s.seen if auth and key in auth]


def test_no_url_form_sends_the_key_to_another_host(seen, settings):
    ls, other, v6 = seen
    ls_url = f"http://127.0.0.1:{ls.server_address[1]}"
    r = MediaResolver(settings, ls_url=ls_url, token=KEY)
    _try_all(r, _forms(ls.server_address[1], other.server_address[1], v6.server_address[1] if v6 else None))
    assert _leaks(seen, KEY) == []
    # nothing reached the other hosts at all: none of them is allowed
    assert other.seen == [] and (v6 is None or v6.seen == [])
    # Label Studio itself still gets the key, for the plain forms
    r.fetch("/data/upload/1/a.png")
    r.fetch(ls_url + "/data/upload/1/b.png")
    assert ls.seen[-2:] == [("/data/upload/1/a.png", f"Token {KEY}"), ("/data/upload/1/b.png", f"Token {KEY}")]


def test_backslash_is_refused_with_a_reason(seen, settings):
    ls, other, _ = seen
    r = MediaResolver(settings, ls_url=f"http://127.0.0.1:{ls.server_address[1]}", token=KEY)
    with pytest.raises(MediaError, match="backslash"):
        r.fetch(f"http://127.0.0.1:{other.server_address[1]}\\@127.0.0.1:{ls.server_address[1]}/x.png")
    assert other.seen == []


def test_an_allowed_other_host_gets_media_requests_but_never_the_key(seen, settings):
    ls, other, v6 = seen
    hosts = (f"127.0.0.1:{other.server_address[1]}",) + ((f"[::1]:{v6.server_address[1]}",) if v6 else ())
    s = Settings(model_dir=settings.model_dir, allowed_hosts=hosts)
    r = MediaResolver(s, ls_url=f"http://127.0.0.1:{ls.server_address[1]}", token=KEY)
    forms = _forms(ls.server_address[1], other.server_address[1], v6.server_address[1] if v6 else None)
    _try_all(r, forms)
    assert other.seen, "the allowed host is fetched from"
    assert all(auth is None for _, auth in other.seen) and (v6 is None or all(a is None for _, a in v6.seen))
    assert _leaks(seen, KEY) == []


@pytest.mark.parametrize("ls_host", ["localhost", "127.0.0.1"])
def test_the_key_is_bound_to_the_exact_origin(seen, settings, ls_host):
    """Same host on another port, or the LS host spelled another way, is another origin: no key."""
    ls, other, _ = seen
    s = Settings(model_dir=settings.model_dir, allowed_hosts=("*",))
    r = MediaResolver(s, ls_url=f"http://{ls_host}:{ls.server_address[1]}", token=KEY)
    r.fetch(f"http://127.0.0.1:{other.server_address[1]}/x.png")
    r.fetch(f"http://localhost:{other.server_address[1]}/y.png")
    assert [auth for _, auth in other.seen] == [None, None]


def test_with_label_studio_url_set_request_hosts_are_not_trusted(seen, settings, caplog):
    ls, other, _ = seen
    s = Settings(model_dir=settings.model_dir, label_studio_url=f"http://127.0.0.1:{ls.server_address[1]}",
                 label_studio_api_key=ENV_KEY)
    request_host = f"http://127.0.0.1:{other.server_address[1]}"
    r = MediaResolver(s, ls_url=request_host, token=KEY)
    with pytest.raises(MediaError, match="not allowed"):
        r.fetch(request_host + "/x.png")
    r.fetch("/data/upload/1/a.png")
    assert other.seen == []
    assert ls.seen == [("/data/upload/1/a.png", f"Token {ENV_KEY}")]
    assert any("not trusted" in rec.message for rec in caplog.records)


# ------------------------------------------------------------------------ through the HTTP app

def _app(settings, stub_predictor, **overrides):
    s = Settings(model_dir=settings.model_dir, **overrides)
    register_stub(s)
    cache = ModelCache(s, loader=lambda p, d: stub_predictor)
    return create_app(s, runner=RecordingRunner(), cache=cache).test_client()


def _predict(client, image, **extra):
    return client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": image}}], "project": "3.1",
                                         "label_config": CONFIG_ALL, **extra})


def _setup(client, **fields):
    return client.post("/setup", json={"project": "3.1", "schema": CONFIG_ALL, **fields})


def test_a_second_setup_with_only_a_host_does_not_inherit_the_token(seen, settings, stub_predictor):
    ls, other, _ = seen
    c = _app(settings, stub_predictor)
    assert _setup(c, hostname=f"http://127.0.0.1:{ls.server_address[1]}", access_token=KEY).status_code == 200
    assert _setup(c, hostname=f"http://127.0.0.1:{other.server_address[1]}").status_code == 200
    assert _predict(c, "/data/upload/1/a.png").status_code == 200
    assert other.seen == [("/data/upload/1/a.png", None)], "the new host gets no token"
    assert _leaks(seen, KEY) == []


def test_a_predict_hostname_is_not_trusted_when_label_studio_url_is_set(seen, settings, stub_predictor):
    ls, other, _ = seen
    c = _app(settings, stub_predictor, label_studio_url=f"http://127.0.0.1:{ls.server_address[1]}",
             label_studio_api_key=ENV_KEY)
    other_url = f"http://127.0.0.1:{other.server_address[1]}"
    r = _predict(c, other_url + "/x.png", hostname=other_url, access_token="whatever")
    assert r.status_code == 200 and r.json["results"][0] == []         # not fetched, no prediction
    assert other.seen == []
    assert _predict(c, "/data/upload/1/a.png", hostname=other_url).status_code == 200
    assert other.seen == [] and ls.seen == [("/data/upload/1/a.png", f"Token {ENV_KEY}")]


def test_a_predict_pair_is_used_together(seen, settings, stub_predictor):
    """Without LABEL_STUDIO_URL a /predict's (hostname, token) replaces /setup's as one pair."""
    ls, other, _ = seen
    c = _app(settings, stub_predictor)
    _setup(c, hostname=f"http://127.0.0.1:{ls.server_address[1]}", access_token=KEY)
    _predict(c, "/data/upload/1/a.png", hostname=f"http://127.0.0.1:{other.server_address[1]}")
    _predict(c, "/data/upload/1/b.png")
    assert other.seen == [("/data/upload/1/a.png", None)]
    assert ls.seen == [("/data/upload/1/b.png", f"Token {KEY}")]


@pytest.mark.parametrize("hostname", ["http://127.0.0.1:1\\@label-studio:8080", "http://[::1", "ftp://x",
                                      "http://u:p@label-studio:8080"])
def test_setup_refuses_an_unusable_hostname(settings, stub_predictor, hostname):
    c = _app(settings, stub_predictor)
    r = _setup(c, hostname=hostname, access_token=KEY)
    assert r.status_code == 400 and "hostname" in r.json["error"] and KEY not in r.json["error"]

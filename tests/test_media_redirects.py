"""Redirects of image downloads: followed to hosts media may come from (Label Studio's origin and
TESSERA_ALLOWED_HOSTS), at most MAX_REDIRECTS, within one deadline, and the key only where Label Studio sent the
request on to itself. Three real listeners on loopback play Label Studio, an allowed image host and a host that
is not allowed (each a port of 127.0.0.1, allowed as host:port)."""
import io
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from tessera.backend.media import MAX_REDIRECTS, MediaError, MediaResolver
from tessera.backend.settings import Settings
from tests.standin import ok, start


def png_bytes(value=200):
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


ROUTES: dict = {}           # (host name, path) -> (status, headers, body) or a callable giving one
HOSTS: dict = {}            # host name -> StandIn


def _answer(name):
    def answer(path):
        route = ROUTES.get((name, urlsplit(path).path), (404, {}, b""))
        return route() if callable(route) else route
    return answer


def to(name: str, path: str, status: int = 302):
    return status, {"Location": HOSTS[name].url + path}, b""


@pytest.fixture(scope="module", autouse=True)
def hosts():
    for name in ("ls", "images", "other"):
        HOSTS[name] = start(_answer(name))
    yield HOSTS
    for srv in HOSTS.values():
        srv.shutdown()


@pytest.fixture
def media(tmp_path):
    ROUTES.clear()
    for srv in HOSTS.values():
        srv.seen.clear()
    allowed = (f"127.0.0.1:{HOSTS['images'].port}",)
    return MediaResolver(Settings(model_dir=tmp_path, allowed_hosts=allowed), ls_url=HOSTS["ls"].url,
                         token="secret-token")


def test_an_allowed_host_may_redirect_within_the_allowed_hosts(media):
    """http -> https on an image server, a bucket's regional endpoint: the image comes, without the key."""
    ROUTES["images", "/old/a.png"] = 301, {"Location": "/new/a.png"}, b""          # relative
    ROUTES["images", "/new/a.png"] = to("ls", "/static/a.png", 307)
    ROUTES["ls", "/static/a.png"] = ok(png_bytes(value=31))
    assert media.load_image(HOSTS["images"].url + "/old/a.png")[0, 0, 0] == 31
    assert [a for _, a in HOSTS["images"].seen] == [None, None]
    assert HOSTS["ls"].seen == [("/static/a.png", None)], \
        "a request another host sent to Label Studio goes without the key"


def test_label_studio_redirecting_to_itself_keeps_the_key_and_to_another_host_drops_it(media):
    ROUTES["ls", "/data/upload/1/a.png"] = to("ls", "/data/upload/1/b.png")
    ROUTES["ls", "/data/upload/1/b.png"] = to("images", "/b.png")
    ROUTES["images", "/b.png"] = ok(png_bytes(value=9))
    assert media.load_image("/data/upload/1/a.png")[0, 0, 0] == 9
    assert HOSTS["ls"].seen == [("/data/upload/1/a.png", "Token secret-token"),
                                ("/data/upload/1/b.png", "Token secret-token")]
    assert HOSTS["images"].seen == [("/b.png", None)]


def test_a_redirect_to_a_host_not_allowed_is_refused_before_it_is_contacted(media):
    ROUTES["images", "/c.png"] = to("other", "/c.png")
    ROUTES["ls", "/data/upload/c.png"] = to("other", "/c.png")
    for ref in (HOSTS["images"].url + "/c.png", "/data/upload/c.png"):
        with pytest.raises(MediaError, match="TESSERA_ALLOWED_HOSTS") as e:
            media.fetch(ref)
        assert f"127.0.0.1:{HOSTS['other'].port}" in str(e.value) and e.value.retry, \
            "the error names the host to allow, and the task is asked again once it is"
    assert HOSTS["other"].seen == []


def test_redirects_are_bounded(media):
    ROUTES["images", "/loop.png"] = to("images", "/loop.png")
    with pytest.raises(MediaError, match=f"more than {MAX_REDIRECTS} redirects"):
        media.fetch(HOSTS["images"].url + "/loop.png")
    assert len(HOSTS["images"].seen) == MAX_REDIRECTS + 1


@pytest.mark.parametrize("location", ["file:///etc/passwd", "http://user:pw@127.0.0.1:9/x.png",
                                      "http://127.0.0.1:9\\@example.com/x.png", "gopher://127.0.0.1:9/x"])
def test_a_redirect_to_an_odd_url_is_refused(media, location):
    ROUTES["images", "/odd.png"] = 302, {"Location": location}, b""
    with pytest.raises(MediaError, match="redirects to a URL not accepted"):
        media.fetch(HOSTS["images"].url + "/odd.png")


def test_a_redirect_without_a_location_says_so(media):
    ROUTES["images", "/nowhere.png"] = 302, {}, b""
    with pytest.raises(MediaError, match="without saying where"):
        media.fetch(HOSTS["images"].url + "/nowhere.png")


def test_one_deadline_holds_the_whole_chain(tmp_path):
    """Four hops of 0.4 s each: within TESSERA_FETCH_TIMEOUT_S 1 s per hop, but not as a whole."""
    ROUTES.clear()

    def slow(n):
        def answer():
            time.sleep(0.4)
            return to("images", f"/slow{n + 1}.png") if n < 3 else ok(png_bytes())
        return answer
    for n in range(4):
        ROUTES["images", f"/slow{n}.png"] = slow(n)
    allowed = (f"127.0.0.1:{HOSTS['images'].port}",)
    media = MediaResolver(Settings(model_dir=tmp_path, allowed_hosts=allowed, fetch_timeout_s=1.0),
                          ls_url=HOSTS["ls"].url)
    t0 = time.monotonic()
    with pytest.raises(MediaError, match="took longer than 1 s"):
        media.fetch(HOSTS["images"].url + "/slow0.png")
    assert time.monotonic() - t0 < 1.5
    roomy = MediaResolver(Settings(model_dir=tmp_path, allowed_hosts=allowed, fetch_timeout_s=5.0),
                          ls_url=HOSTS["ls"].url)
    assert roomy.load_image(HOSTS["images"].url + "/slow0.png").shape == (30, 40, 3)

"""Media resolver: allowed and denied hosts, the token only for LS, caps, corrupt bytes, path traversal."""
import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from backend.media import MediaError, MediaResolver
from backend.settings import Settings


def png_bytes(w=40, h=30, value=200, mode="RGB"):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).convert(mode).save(buf, "PNG")
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    files: dict = {}
    seen: list = []

    def do_GET(self):
        Handler.seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/data/redirect"):
            self.send_response(302)
            self.send_header("Location", "http://example.com/x.png")
            self.end_headers()
            return
        body = Handler.files.get(self.path.split("?")[0])
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def http_server():
    """A real HTTP server on 127.0.0.1 that plays Label Studio's /data/upload."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture
def ls(http_server, settings):
    Handler.files = {"/data/upload/1/a.png": png_bytes(), "/big.png": png_bytes(3000, 2000),
                     "/data/upload/junk.png": b"\x89PNG this is not an image"}
    Handler.seen.clear()
    return MediaResolver(settings, ls_url=http_server, token="secret-token")


def test_ls_upload_path_uses_the_token(ls):
    img = ls.load_image("/data/upload/1/a.png")
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8 and img[0, 0, 0] == 200
    assert Handler.seen[-1] == ("/data/upload/1/a.png", "Token secret-token")


def test_absolute_url_on_ls_host_is_allowed(ls, http_server):
    assert ls.load_image(http_server + "/data/upload/1/a.png").shape == (30, 40, 3)


def test_other_hosts_are_denied_unless_allowed(settings, http_server):
    r = MediaResolver(settings, ls_url="http://label-studio:8080", token="t")
    with pytest.raises(MediaError, match="not allowed"):
        r.fetch(http_server + "/data/upload/1/a.png")
    allowed = Settings(model_dir=settings.model_dir, allowed_hosts=("127.0.0.1",))
    Handler.files = {"/x.png": png_bytes()}
    r = MediaResolver(allowed, ls_url="http://label-studio:8080", token="t")
    assert r.load_image(http_server + "/x.png").shape == (30, 40, 3)
    assert Handler.seen[-1][1] is None, "the LS token must not be sent to another host"


def test_byte_and_pixel_caps(http_server, settings, tmp_path):
    small = Settings(model_dir=tmp_path, max_image_bytes=1000, max_pixels=10_000)
    Handler.files = {"/data/upload/big.png": png_bytes(3000, 2000)}
    r = MediaResolver(small, ls_url=http_server)
    with pytest.raises(MediaError, match="byte cap"):
        r.fetch("/data/upload/big.png")
    roomy = Settings(model_dir=tmp_path, max_pixels=10_000)
    with pytest.raises(MediaError, match="pixel cap"):
        MediaResolver(roomy, ls_url=http_server).load_image("/data/upload/big.png")


def test_corrupt_bytes_and_http_errors(ls):
    with pytest.raises(MediaError, match="not a readable image"):
        ls.load_image("/data/upload/junk.png")
    with pytest.raises(MediaError, match="HTTP 404"):
        ls.fetch("/data/upload/1/missing.png")
    with pytest.raises(MediaError, match="redirect"):
        ls.fetch("/data/redirect")


def test_data_uri(settings):
    r = MediaResolver(settings)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(8, 6)).decode()
    assert r.load_image(uri).shape == (6, 8, 3)
    with pytest.raises(MediaError, match="base64"):
        r.fetch("data:image/png,rawdata")


def test_local_files_stay_under_the_media_root(settings, tmp_path):
    (settings.media_root / "sub").mkdir()
    (settings.media_root / "sub" / "a.png").write_bytes(png_bytes())
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    r = MediaResolver(settings)
    assert r.load_image("sub/a.png").shape == (30, 40, 3)
    assert r.load_image("/data/local-files/?d=sub/a.png").shape == (30, 40, 3)
    for bad in ("../secret.png", "sub/../../secret.png", str(secret), "/data/local-files/?d=../secret.png",
                "/data/local-files/?d=sub%2F..%2F..%2Fsecret.png"):
        with pytest.raises(MediaError, match="outside"):
            r.fetch(bad)
    (settings.media_root / "link.png").symlink_to(secret)
    with pytest.raises(MediaError, match="outside"):
        r.fetch("link.png")


def test_no_media_root_no_local_files(tmp_path):
    r = MediaResolver(Settings(model_dir=tmp_path))
    with pytest.raises(MediaError, match="TESSERA_MEDIA_ROOT"):
        r.fetch("images/a.png")


def test_unknown_ls_url_and_schemes(tmp_path):
    r = MediaResolver(Settings(model_dir=tmp_path))
    with pytest.raises(MediaError, match="LABEL_STUDIO_URL"):
        r.fetch("/data/upload/1/a.png")
    with pytest.raises(MediaError, match="cloud storage"):
        r.fetch("s3://bucket/a.png")
    with pytest.raises(MediaError, match="scheme"):
        r.fetch("ftp://host/a.png")
    with pytest.raises(MediaError, match="no image"):
        r.fetch("")


def test_errors_never_show_query_strings(settings):
    r = MediaResolver(settings, ls_url="http://label-studio:8080")
    with pytest.raises(MediaError) as e:
        r.fetch("https://bucket.s3.amazonaws.com/a.png?X-Amz-Signature=SECRET")
    assert "SECRET" not in str(e.value)


def test_sixteen_bit_grey_is_stretched(settings):
    arr = (np.arange(64 * 64).reshape(64, 64) * 7).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    img = MediaResolver(settings).load_image(uri)
    assert img.shape == (64, 64, 3) and img.max() == 255 and img.min() == 0


@pytest.mark.parametrize("arr", [
    (np.arange(48 * 64).reshape(48, 64) % 41).astype(np.uint8),              # dark 8-bit fluorescence
    (np.arange(48 * 64).reshape(48, 64) * 7).astype(np.uint16),              # 16-bit grey
    np.dstack([np.arange(48 * 64).reshape(48, 64) % 256] * 3).astype(np.uint8)])   # RGB
def test_served_images_decode_as_training_folders_do(settings, tmp_path, arr):
    """One decoder (model.data.image_to_rgb): an image seen through Label Studio has the same pixels as
    the same file in a folder dataset (the grey stretch differed before)."""
    from model.data import read_image

    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    served = MediaResolver(settings).load_image(uri)
    assert served.shape == (48, 64, 3) and np.array_equal(served, read_image(path))

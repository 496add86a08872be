"""Media resolver: allowed and denied hosts, the token only for LS, caps, corrupt bytes, path traversal, the
bounded disk cache."""
import base64
import io
import os
import time

import numpy as np
import pytest
from PIL import Image

from tessera.backend.media import MediaCache, MediaError, MediaResolver
from tessera.backend.settings import Settings
from tests.standin import ok, start


def png_bytes(w=40, h=30, value=200, mode="RGB"):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).convert(mode).save(buf, "PNG")
    return buf.getvalue()


FILES: dict = {}      # path -> body the stand-in Label Studio serves


def _answer(path: str):
    if path.startswith("/data/redirect"):
        return 302, {"Location": "http://example.com/x.png"}, b""
    body = FILES.get(path, FILES.get(path.split("?")[0]))
    return (404, {}, b"") if body is None else ok(body)


def _serve(files: dict) -> None:
    FILES.clear()
    FILES.update(files)


@pytest.fixture(scope="module")
def server():
    """A real HTTP server on 127.0.0.1 that plays Label Studio's /data/upload."""
    srv = start(_answer)
    yield srv
    srv.shutdown()


@pytest.fixture
def http_server(server):
    server.seen.clear()
    return server.url


@pytest.fixture
def ls(http_server, settings):
    _serve({"/data/upload/1/a.png": png_bytes(), "/big.png": png_bytes(3000, 2000),
            "/data/upload/junk.png": b"\x89PNG this is not an image"})
    return MediaResolver(settings, ls_url=http_server, token="secret-token")


def test_ls_upload_path_uses_the_token(ls, server):
    img = ls.load_image("/data/upload/1/a.png")
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8 and img[0, 0, 0] == 200
    assert server.seen[-1] == ("/data/upload/1/a.png", "Token secret-token")


def test_absolute_url_on_ls_host_is_allowed(ls, http_server):
    assert ls.load_image(http_server + "/data/upload/1/a.png").shape == (30, 40, 3)


def test_other_hosts_are_denied_unless_allowed(settings, http_server, server):
    r = MediaResolver(settings, ls_url="http://label-studio:8080", token="t")
    with pytest.raises(MediaError, match="not allowed"):
        r.fetch(http_server + "/data/upload/1/a.png")
    allowed = Settings(model_dir=settings.model_dir, allowed_hosts=("127.0.0.1",))
    _serve({"/x.png": png_bytes()})
    r = MediaResolver(allowed, ls_url="http://label-studio:8080", token="t")
    assert r.load_image(http_server + "/x.png").shape == (30, 40, 3)
    assert server.seen[-1][1] is None, "the LS token must not be sent to another host"


def test_byte_and_pixel_caps(http_server, settings, tmp_path):
    small = Settings(model_dir=tmp_path, max_image_bytes=1000, max_pixels=10_000)
    _serve({"/data/upload/big.png": png_bytes(3000, 2000)})
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


def test_local_files_come_from_label_studio_without_a_media_root(http_server, server, tmp_path):
    """Without TESSERA_MEDIA_ROOT (Tessera in its own container), a local-files URL's file comes from Label
    Studio, which serves it to the key's user where a project's local storage holds it."""
    _serve({"/data/local-files/?d=scans/a%20b.png": png_bytes(value=9)})
    r = MediaResolver(Settings(model_dir=tmp_path), ls_url=http_server, token="secret-token")
    assert r.load_image("/data/local-files/?d=scans/a%20b.png")[0, 0, 0] == 9
    assert server.seen[-1] == ("/data/local-files/?d=scans/a%20b.png", "Token secret-token")
    with pytest.raises(MediaError, match="LOCAL_FILES_SERVING_ENABLED"):
        r.fetch("/data/local-files/?d=scans/missing.png")
    with pytest.raises(MediaError, match="NUL"):
        r.fetch("/data/local-files/?d=a%00.png")


def test_label_studio_served_at_a_path(http_server, server, tmp_path):
    """Label Studio behind a proxy at /ls (LABEL_STUDIO_HOST=https://host/ls) names its uploads /ls/data/...:
    with LABEL_STUDIO_URL at that path they come from Label Studio with the key; without the path, the error
    names the setting (before: "a local path; set TESSERA_MEDIA_ROOT")."""
    _serve({"/ls/data/upload/1/a.png": png_bytes(value=7), "/ls/data/local-files/?d=s/b.png": png_bytes(value=8)})
    r = MediaResolver(Settings(model_dir=tmp_path), ls_url=http_server + "/ls/", token="secret-token")
    assert r.load_image("/ls/data/upload/1/a.png")[0, 0, 0] == 7
    assert server.seen[-1] == ("/ls/data/upload/1/a.png", "Token secret-token")
    assert r.load_image("/ls/data/local-files/?d=s/b.png")[0, 0, 0] == 8
    assert r.load_image(http_server + "/ls/data/upload/1/a.png")[0, 0, 0] == 7
    direct = MediaResolver(Settings(model_dir=tmp_path), ls_url=http_server, token="secret-token")
    with pytest.raises(MediaError, match=r"served under '/ls': set LABEL_STUDIO_URL .*https://<host>/ls"):
        direct.fetch("/ls/data/upload/1/a.png")


def test_an_unreachable_label_studio_is_named_with_the_setting(tmp_path):
    """Label Studio hands over the address it knows itself by (`http://localhost:8080` in its container); from
    Tessera's container that is nobody: the error says which setting gives the address that works."""
    from tests.conftest import free_port

    port = free_port()                                   # nothing listens there
    r = MediaResolver(Settings(model_dir=tmp_path), ls_url=f"http://127.0.0.1:{port}", token="secret-token")
    with pytest.raises(MediaError, match=f"cannot reach Label Studio at 127.0.0.1:{port}: set LABEL_STUDIO_URL") as e:
        r.fetch("/data/upload/1/a.png")
    assert e.value.retry                                 # /predict stores no prediction for it: asked again later


def test_a_proxy_in_the_way_is_named(tmp_path, monkeypatch):
    """HTTP_PROXY set for the machine (a company proxy) and Label Studio on the internal network: the error says
    NO_PROXY, not just "ProxyError"."""
    from tests.conftest import free_port

    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")          # a proxy that is not there
    r = MediaResolver(Settings(model_dir=tmp_path), ls_url=f"http://127.0.0.1:{free_port()}", token="secret-token")
    with pytest.raises(MediaError, match="ProxyError; the proxy HTTP.S._PROXY names failed .*add it to NO_PROXY"):
        r.fetch("/data/upload/1/a.png")


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
    from tessera.model.data import read_image

    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    served = MediaResolver(settings).load_image(uri)
    assert served.shape == (48, 64, 3) and np.array_equal(served, read_image(path))


# ------------------------------------------------------------------------------------------- the disk cache

def test_the_cache_keeps_what_a_run_used_within_its_byte_limit(tmp_path):
    cache = MediaCache(tmp_path / "c", max_bytes=3500)
    for i in range(10):                                 # 10 x 1000 bytes into 3500: three fit
        cache.put(f"k{i}", bytes([i]) * 1000)
        assert sum(f.stat().st_size for f in (tmp_path / "c").iterdir()) <= 3500
    # this run used k0-k2: k3-k9 would each have evicted one of them, and are not kept
    assert [cache.get(f"k{i}") is not None for i in range(10)] == [True] * 3 + [False] * 7
    assert cache.get("k2") == bytes([2]) * 1000
    run2 = MediaCache(tmp_path / "c", max_bytes=3500)   # the next run: the least recently used it has not used go
    assert run2.get("k1") is not None
    run2.put("k10", b"x" * 1000)                        # k0 is the least recently used (then k2, read last above)
    assert {f.name for f in (tmp_path / "c").iterdir()} == {"k1", "k2", "k10"}
    run2.put("huge", b"x" * 4000)                       # bigger than the whole cache: not kept, nothing evicted
    assert run2.get("huge") is None and {f.name for f in (tmp_path / "c").iterdir()} == {"k1", "k2", "k10"}
    dead, live = tmp_path / "c" / ".k11.1.2.tmp", tmp_path / "c" / ".k12.3.4.tmp"   # writers' tmp files
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    MediaCache(tmp_path / "c", max_bytes=3500).put("k13", b"x")      # a new process lists the cache
    assert not dead.exists() and live.exists()


def test_each_run_over_a_project_larger_than_the_cache_finds_what_it_holds(server, http_server, tmp_path):
    """A training run reads every task's image in the same order each time. Least recently used alone evicted
    each image before the next run read it again (six images, room for three: no hit in any run); now each
    run after the first downloads only the three that the cache cannot hold."""
    files = {f"/data/upload/{i}.png": bytes([i]) * 1000 for i in range(6)}
    _serve(files)
    for run in range(3):
        r = MediaResolver(Settings(model_dir=tmp_path, media_cache_mb=1), ls_url=http_server,
                          cache_dir=tmp_path / "media")
        r.cache.max_bytes = 3500                        # room for three of the six
        before = len(server.seen)
        for path, body in files.items():
            assert r.fetch(path) == body
        assert len(server.seen) - before == (6 if run == 0 else 3), run
        assert len(list((tmp_path / "media").iterdir())) == 3
    off = MediaResolver(Settings(model_dir=tmp_path, media_cache_mb=0), ls_url=http_server,
                        cache_dir=tmp_path / "off")
    assert off.cache is None and off.fetch("/data/upload/1.png") and not (tmp_path / "off").exists()


def test_the_cache_counts_other_processes_writes(tmp_path):
    cache = MediaCache(tmp_path, max_bytes=10_000)
    cache.put("mine", b"x" * 1000)
    for i in range(20):                                 # another process fills the directory meanwhile
        (tmp_path / f"other{i}").write_bytes(b"y" * 1000)
    for i in range(MediaCache.RESCAN_EVERY):
        cache.put(f"k{i}", b"z")
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) <= 10_000


# ------------------------------------------------------------------------------ EXIF orientation (phone photos)

# What a viewer shows for each EXIF orientation, written from the EXIF standard in numpy (not from Pillow's table)
SHOWN = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
         5: lambda a: np.rot90(np.fliplr(a), 1), 6: lambda a: np.rot90(a, -1),
         7: lambda a: np.rot90(np.fliplr(a), -1), 8: lambda a: np.rot90(a, 1)}


def _tagged(stored: np.ndarray, orientation: int, fmt: str, **kw) -> bytes:
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, fmt, exif=exif, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_images_come_upright_as_label_studio_shows_them(settings, tmp_path, orientation):
    """A photo stored sideways with an EXIF orientation is shown turned by the browser, so Label Studio's
    percentages and original_width / height are of the turned image: /predict, training and folder datasets
    must all see that image, pixel for pixel."""
    from tessera.model.data import read_image

    stored = np.random.default_rng(orientation).integers(0, 256, (30, 48, 3), dtype=np.uint8)
    data = _tagged(stored, orientation, "PNG")
    shown = SHOWN[orientation](stored)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    image, size = MediaResolver(settings).load_working(uri)
    assert size == shown.shape[:2] and np.array_equal(image, shown)
    (tmp_path / "x.png").write_bytes(data)
    assert np.array_equal(read_image(tmp_path / "x.png"), shown)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_a_large_sideways_image_is_reduced_and_turned(settings, fmt):
    """The reduced decode (TESSERA_MAX_SIDE: JPEG draft, a resize otherwise) turns the image too, and reports the
    shown size (the orientation is read from the decoded file, whichever way its format keeps it)."""
    stored = np.zeros((600, 800, 3), np.uint8)
    stored[:, :400] = 255                            # left half white: turned clockwise (6), the top half
    uri = "data:image/x;base64," + base64.b64encode(_tagged(stored, 6, fmt)).decode()
    image, size = MediaResolver(settings.replace(max_side=256)).load_working(uri)
    assert size == (800, 600) and image.shape == (256, 192, 3)
    assert image[:120].mean() > 240 and image[136:].mean() < 15

"""Cloud storage images (s3://, gs://, azure-blob://): Label Studio 1.23.2 sends them to ML backends unresolved, so
Tessera asks Label Studio's resolver for the task (/tasks/<id>/resolve/?fileuri=<url-safe base64>) with the token,
and follows the one redirect that resolver makes to a presigned URL, without the token. Two real listeners on
loopback play Label Studio and the bucket."""
import base64
import io
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from tessera.backend.label_config import parse_label_config
from tessera.backend.media import MediaError, MediaResolver
from tessera.backend.predictions import task_image
from tessera.backend.settings import Settings
from tests.standin import ok, start


def png_bytes(w=40, h=30, value=200):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PRESIGNED: dict = {}        # cloud URI -> the Location Label Studio's resolver answers with (None: 404)
PROXIED: dict = {}          # cloud URI -> the bytes Label Studio itself answers with (a storage set to proxy)
BUCKET: dict = {}           # path on the bucket's host -> (status, headers, body)


def _label_studio(path: str):
    parts = urlsplit(path)
    if parts.path.startswith("/tasks/") and parts.path.endswith("/resolve/"):
        uri = base64.urlsafe_b64decode(parse_qs(parts.query)["fileuri"][0]).decode()
        if uri in PROXIED:
            return ok(PROXIED[uri])
        if PRESIGNED.get(uri):
            return 303, {"Location": PRESIGNED[uri]}, b""
        return 404, {}, b""
    if parts.path == "/data/redirect":
        return 302, {"Location": BUCKET_URL + "/bucket/a.png"}, b""
    return 404, {}, b""


def _bucket(path: str):
    return BUCKET.get(urlsplit(path).path, (404, {}, b""))


@pytest.fixture(scope="module")
def hosts():
    global BUCKET_URL
    ls, bucket = start(_label_studio), start(_bucket)
    BUCKET_URL = bucket.url
    yield ls, bucket
    ls.shutdown()
    bucket.shutdown()


@pytest.fixture
def media(hosts, tmp_path):
    ls, bucket = hosts
    for d in (PRESIGNED, PROXIED, BUCKET):
        d.clear()
    ls.seen.clear()
    bucket.seen.clear()
    return MediaResolver(Settings(model_dir=tmp_path), ls_url=ls.url, token="secret-token")


def test_an_s3_image_comes_through_label_studios_resolver_and_its_presigned_url(hosts, media):
    ls, bucket = hosts
    PRESIGNED["s3://photos/cats/a.png"] = bucket.url + "/photos/cats/a.png?X-Amz-Signature=abc&X-Amz-Expires=900"
    BUCKET["/photos/cats/a.png"] = ok(png_bytes(value=77))
    img = media.load_image("s3://photos/cats/a.png", task_id=7)
    assert img.shape == (30, 40, 3) and img[0, 0, 0] == 77
    path, auth = ls.seen[-1]
    assert urlsplit(path).path == "/tasks/7/resolve/" and auth == "Token secret-token"
    assert base64.urlsafe_b64decode(parse_qs(urlsplit(path).query)["fileuri"][0]).decode() == "s3://photos/cats/a.png"
    assert bucket.seen == [("/photos/cats/a.png?X-Amz-Signature=abc&X-Amz-Expires=900", None)], \
        "the presigned URL is fetched as it is, and never with Label Studio's token"


def test_a_task_listed_through_the_api_names_the_resolver_itself(hosts, media):
    """The tasks API (what `tessera predict --project` and training list) shows a cloud URI behind the resolver,
    /tasks/<id>/resolve/?fileuri=...: the same redirect is followed."""
    ls, bucket = hosts
    PRESIGNED["s3://photos/g.png"] = bucket.url + "/photos/g.png?X-Amz-Signature=def"
    BUCKET["/photos/g.png"] = ok(png_bytes(value=9))
    ref = "/tasks/21/resolve/?fileuri=" + base64.urlsafe_b64encode(b"s3://photos/g.png").decode()
    assert media.load_image(ref)[0, 0, 0] == 9
    assert ls.seen[-1][1] == "Token secret-token" and bucket.seen[-1] == ("/photos/g.png?X-Amz-Signature=def", None)


def test_a_storage_that_proxies_answers_with_the_file(media):
    PROXIED["gs://scans/b.png"] = png_bytes(value=5)
    assert media.load_image("gs://scans/b.png", task_id=3)[0, 0, 0] == 5


def test_a_task_of_a_cloud_project_is_predicted_from_its_id(hosts, media):
    """task_image, what /predict and training load task images with, hands the task's id to the resolver."""
    ls, bucket = hosts
    PRESIGNED["azure-blob://box/c.png"] = bucket.url + "/box/c.png?sig=1"
    BUCKET["/box/c.png"] = ok(png_bytes(64, 48))
    img = parse_label_config('<View><Image name="image" value="$image"/><BrushLabels name="m" toName="image">'
                             '<Label value="Cat"/></BrushLabels></View>').images[0]
    image, size = task_image({"id": 12, "data": {"image": "azure-blob://box/c.png"}}, img, media, working=True)
    assert image.shape == (48, 64, 3) and size == (48, 64)
    assert urlsplit(ls.seen[-1][0]).path == "/tasks/12/resolve/"


def test_what_cannot_be_resolved_says_what_to_fix(tmp_path, media):
    with pytest.raises(MediaError, match="connect the bucket as a source storage"):
        media.fetch("s3://not-connected/x.png", task_id=4)              # Label Studio: 404
    with pytest.raises(MediaError, match="no task id"):
        media.fetch("s3://photos/x.png")
    with pytest.raises(MediaError, match="LABEL_STUDIO_URL"):
        MediaResolver(Settings(model_dir=tmp_path)).fetch("s3://photos/x.png", task_id=4)


@pytest.mark.parametrize("location, error", [
    ("file:///etc/passwd", "not accepted"),
    ("http://user:pw@127.0.0.1:9/x.png", "not accepted"),
    ("http://127.0.0.1:9\\@example.com/x.png", "not accepted"),
])
def test_a_resolver_redirect_to_an_odd_url_is_refused(media, location, error):
    PRESIGNED["s3://photos/d.png"] = location
    with pytest.raises(MediaError, match=error):
        media.fetch("s3://photos/d.png", task_id=1)


def test_only_the_resolver_may_redirect_to_a_host_not_allowed(hosts, media, tmp_path):
    """The presigned URL's host is the resolver's to name; any other redirect must stay on the hosts media may
    come from (tests/test_media_redirects.py)."""
    ls, bucket = hosts
    PRESIGNED["s3://photos/e.png"] = bucket.url + "/photos/e.png?sig=2"
    BUCKET["/photos/e.png"] = (302, {"Location": bucket.url + "/elsewhere.png"}, b"")
    BUCKET["/elsewhere.png"] = ok(png_bytes())
    with pytest.raises(MediaError, match="redirect"):
        media.fetch("s3://photos/e.png", task_id=1)                      # a second redirect
    with pytest.raises(MediaError, match="redirect"):
        media.fetch("/data/redirect")                                    # Label Studio, not its resolver
    assert all(path != "/elsewhere.png" for path, _ in bucket.seen)
    # a resolver path on an allowed host that is not Label Studio: its redirect to the bucket is not followed
    other = MediaResolver(Settings(model_dir=tmp_path, allowed_hosts=(f"127.0.0.1:{ls.port}",)),
                          ls_url="http://127.0.0.1:9", token="t")
    PRESIGNED["s3://photos/f.png"] = bucket.url + "/photos/cats/a.png"
    with pytest.raises(MediaError, match="redirect"):
        other.fetch(ls.url + "/tasks/1/resolve/?fileuri=" + base64.urlsafe_b64encode(b"s3://photos/f.png").decode())
    assert all(path != "/photos/cats/a.png" for path, _ in bucket.seen)

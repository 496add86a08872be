"""End to end with a project's images in its storages, as Label Studio 1.23.2 hands them over.

- Cloud storage: an S3 bucket served by moto's S3 server (a real HTTP listener on loopback), connected as the
  project's source storage with pre-signed URLs on (Label Studio's default). Label Studio sends /predict the
  tasks' s3:// URIs unresolved; Tessera gets each image from Label Studio's resolver for its task, which
  answers with a 303 to a presigned URL on the bucket.
- Local storage: a directory under Label Studio's LOCAL_FILES_DOCUMENT_ROOT, Tessera without
  TESSERA_MEDIA_ROOT (its own container, the directory not mounted): the files come from Label Studio.
"""
import base64
import io
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from PIL import Image

from tessera.model import metrics
from tessera.model.data import make_nuclei_mosaic
from tests.conftest import CONFIG_ALL
from tests.conftest_ls import brush_instances, predictions, retrieve_predictions, tessera_for, wait_for

pytestmark = pytest.mark.e2e

KEYS = {"aws_access_key_id": "tessera-test", "aws_secret_access_key": "tessera-test-secret"}


@pytest.fixture
def bucket():
    """moto's S3 server on 127.0.0.1 (its requests' log lines go to stderr)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def tessera(ls_server, trained_model_dir, tmp_path):
    with tessera_for(ls_server, trained_model_dir, tmp_path) as proc:
        yield proc


def test_a_projects_images_in_s3_are_predicted_through_presigned_urls(ls_api, tessera, bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=bucket, region_name="us-east-1", **KEYS)
    s3.create_bucket(Bucket="cells")
    truths = {}
    for i in range(2):
        sample = make_nuclei_mosaic(256, 384, tile=128, seed=60 + i)
        buf = io.BytesIO()
        Image.fromarray(sample.image).save(buf, "PNG")
        s3.put_object(Bucket="cells", Key=f"frames/{i}.png", Body=buf.getvalue())
        truths[f"s3://cells/frames/{i}.png"] = sample.instances
    pid = ls_api.projects.create(title="tessera s3", label_config=CONFIG_ALL).id
    storage = ls_api.import_storage.s3.create(project=pid, bucket="cells", prefix="frames/", use_blob_urls=True,
                                              presign=True, presign_ttl=15, region_name="us-east-1",
                                              s3endpoint=bucket, title="cells", **KEYS)
    ls_api.import_storage.s3.sync(id=storage.id)
    tasks = _synced_tasks(ls_api, pid, 2)
    # the tasks API shows each URI behind the resolver (/tasks/<id>/resolve/?fileuri=...); /predict gets it raw
    uris = {t.id: base64.urlsafe_b64decode(parse_qs(urlsplit(next(iter(t.data.values()))).query)["fileuri"][0]
                                           ).decode() for t in tasks}
    assert sorted(uris.values()) == sorted(truths)
    assert ls_api.ml.create(project=pid, url=tessera.url, title="Tessera").state == "CO"
    retrieve_predictions(ls_api, pid)

    _masks_land_on_the_objects(ls_api, tessera, {tid: truths[uri] for tid, uri in uris.items()})


def test_a_projects_images_in_a_local_storage_come_from_label_studio(ls_server, ls_api, tessera, tmp_path):
    root = ls_server.env_extra["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"]
    folder = Path(root) / "frames"
    folder.mkdir(exist_ok=True)
    truths = {}
    for i in range(2):
        sample = make_nuclei_mosaic(256, 384, tile=128, seed=70 + i)
        Image.fromarray(sample.image).save(folder / f"frame {i}.png")      # a space: the URL is quoted
        truths[f"frame {i}.png"] = sample.instances
    pid = ls_api.projects.create(title="tessera local files", label_config=CONFIG_ALL).id
    storage = ls_api.import_storage.local.create(project=pid, path=str(folder), use_blob_urls=True, title="frames")
    ls_api.import_storage.local.sync(id=storage.id)
    tasks = _synced_tasks(ls_api, pid, 2)
    refs = {t.id: next(iter(t.data.values())) for t in tasks}
    assert all(ref.startswith("/data/local-files/?d=") for ref in refs.values()), refs
    assert ls_api.ml.create(project=pid, url=tessera.url, title="Tessera").state == "CO"
    retrieve_predictions(ls_api, pid)
    _masks_land_on_the_objects(ls_api, tessera, {tid: truths[unquote(ref).rsplit("/", 1)[-1]]
                                                 for tid, ref in refs.items()})


def _synced_tasks(ls_api, pid: int, n: int) -> list:
    """The project's tasks once its storage sync has made all n of them."""
    def listed():
        tasks = list(ls_api.tasks.list(project=pid))
        return tasks if len(tasks) == n else None
    return wait_for(listed, what=f"the storage's {n} tasks")


def _masks_land_on_the_objects(ls_api, tessera, truths: dict) -> None:
    """Each task (id -> its image's instance map) has one prediction whose brush masks cover its objects."""
    for tid, inst in truths.items():
        h, w = inst.shape
        preds = predictions(ls_api, tid)
        assert len(preds) == 1, f"task {tid}: {preds}\n{tessera.log_text()[-3000:]}"
        brushes = [r for r in preds[0]["result"] if r["type"] == "brushlabels"]
        assert brushes and all(r["original_width"] == w and r["original_height"] == h for r in brushes)
        fg_iou = metrics.iou(brush_instances(brushes, h, w) > 0, inst > 0)
        assert fg_iou >= 0.6, f"task {tid}: the brush masks cover the image's objects with IoU {fg_iou:.3f}"

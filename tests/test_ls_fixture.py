"""The real Label Studio fixture works: server up, legacy token accepted, a Tessera-style project made,
a PNG uploaded as a task and served back through /data/upload with the token."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import httpx
import pytest

from tessera.backend import lsclient
from tessera.backend.lsclient import LabelStudioUnavailable, NotFound
from tests.conftest_ls import predictions

pytestmark = pytest.mark.e2e  # fixtures ls_server / ls_api come from tests/conftest_ls.py

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Cat" background="red"/>
    <Label value="Dog" background="blue"/>
  </BrushLabels>
  <RectangleLabels name="bbox" toName="image">
    <Label value="Cat" background="red"/>
    <Label value="Dog" background="blue"/>
  </RectangleLabels>
  <PolygonLabels name="poly" toName="image">
    <Label value="Cat" background="red"/>
    <Label value="Dog" background="blue"/>
  </PolygonLabels>
</View>"""


def write_png(path: Path, width: int = 24, height: int = 16) -> bytes:
    """A small RGB PNG (stdlib only); returns its bytes."""
    raw = bytearray()
    for y in range(height):
        raw.append(0)  # filter: none
        for x in range(width):
            raw += bytes(((x * 10) % 256, (y * 15) % 256, 128))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))
    path.write_bytes(png)
    return png


def test_health_and_legacy_token(ls_server, ls_api):
    assert httpx.get(f"{ls_server.url}/health", timeout=5).json() == {"status": "UP"}
    assert len(ls_server.token) == 40 and int(ls_server.token, 16) >= 0
    assert ls_api.users.whoami().email == ls_server.username
    r = httpx.get(f"{ls_server.url}/api/projects/", headers={"Authorization": "Token " + "0" * 40}, timeout=10)
    assert r.status_code == 401


def test_project_upload_and_media(ls_server, ls_api, tmp_path):
    project = ls_api.projects.create(title="fixture check", label_config=LABEL_CONFIG)
    assert project.id > 0
    assert {"mask", "bbox", "poly"} <= set(project.parsed_label_config)

    png = write_png(tmp_path / "tile.png")
    second = write_png(tmp_path / "tile2.png", 8, 8)
    task_ids = lsclient.upload_images(ls_api, project.id, [("tile.png", png), ("tile2.png", second)])
    assert len(task_ids) == 2  # distinct multipart field names: both files kept

    tasks = list(lsclient.tasks(ls_api, project.id, page_size=1))  # also exercises pagination
    assert sorted(t["id"] for t in tasks) == sorted(task_ids)
    by_id = {t["id"]: t for t in tasks}
    url = by_id[task_ids[0]]["data"]["image"]
    assert url.startswith("/data/upload/"), url
    assert lsclient.download(ls_api, url) == png
    assert lsclient.download(ls_api, by_id[task_ids[1]]["data"]["image"]) == second
    anonymous = httpx.get(ls_server.url + url, timeout=10, follow_redirects=False)
    assert anonymous.status_code == 401, anonymous.status_code

    # JSON import with a prediction attached, read back per task
    result = [{"from_name": "bbox", "to_name": "image", "type": "rectanglelabels", "original_width": 24,
               "original_height": 16, "image_rotation": 0,
               "value": {"x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0, "rotation": 0,
                         "rectanglelabels": ["Cat"]}}]
    imported = ls_api.projects.import_tasks(project.id, request=[{"data": {"image": url},
                                                                  "predictions": [{"result": result, "score": 0.5,
                                                                                   "model_version": "t"}]}],
                                            return_task_ids=True)
    (task_id,) = imported.task_ids
    (pred,) = predictions(ls_api, task_id)
    assert pred["score"] == 0.5 and pred["model_version"] == "t"
    assert ls_api.webhooks.list(project=str(project.id)) == []

    with pytest.raises(LabelStudioUnavailable) as err:
        ls_api.projects.create(title="bad", label_config="<View><Image name=")  # not XML
    assert err.value.status == 400
    with pytest.raises(NotFound) as err:
        ls_api.ml.train(10**6)
    assert err.value.status == 404 and len(str(err.value)) < 500  # LS answers a huge HTML page


def test_task_listing_stops_at_the_last_page(ls_server, ls_api):
    """label-studio-sdk's pager asks for one page past the end, which Label Studio logs as an ERROR with a
    traceback; lsclient.tasks stops at the total the first page reports."""
    pid = ls_api.projects.create(title="paging check", label_config=LABEL_CONFIG).id
    ls_api.projects.import_tasks(pid, request=[{"data": {"image": f"/x/{i}.png"}} for i in range(5)])
    log = ls_server.log_path
    before = log.read_text(errors="replace").count("Invalid page")
    assert len(list(lsclient.tasks(ls_api, pid, page_size=2))) == 5
    assert log.read_text(errors="replace").count("Invalid page") == before
    assert len(list(ls_api.tasks.list(project=pid, page_size=2))) == 5          # the SDK's pager ...
    assert log.read_text(errors="replace").count("Invalid page") > before       # ... costs an ERROR in LS's log


def test_task_listing_pages_hold_a_bounded_number_of_bytes(ls_server, ls_api):
    """A page of the listing is parsed whole, and tasks range from bytes to tens of MB (every version's brush
    predictions): pages are sized by the last page's bytes per task, so heavy tasks come a few at a time and
    light ones many, each task once and in order, and never a page past the end."""
    pid = ls_api.projects.create(title="paging by bytes", label_config=LABEL_CONFIG).id
    heavy = "x" * 200_000                            # ~200 kB of JSON a task, as a few hundred brush regions are
    ls_api.projects.import_tasks(pid, request=[{"data": {"image": f"/x/{i}.png", "note": heavy if 8 <= i < 40 else ""}}
                                               for i in range(120)])
    log = ls_server.log_path
    before = log.read_text(errors="replace").count("Invalid page")
    listing: dict = {}
    tasks = list(lsclient.tasks(ls_api, pid, page_bytes=1_000_000, listing=listing))
    assert [int(t["data"]["image"][3:-4]) for t in tasks] == list(range(120))     # each once, in order
    assert listing["total"] == 120 and sum(listing["sizes"]) >= 120, listing
    sizes = listing["sizes"]
    assert sizes[:4] == [lsclient.FIRST_PAGE, 1, 2, 4] == [1, 1, 2, 4], sizes     # light: growing
    # the first heavy page (8-15) is sized by the light tasks before it; the next ones hold 1 MB / 200 kB
    assert sizes[4] == 8 and max(sizes[5:9]) <= 5, sizes
    assert max(sizes) >= 32, sizes                   # light ones: many a page again
    assert len(sizes) < 40, sizes
    assert log.read_text(errors="replace").count("Invalid page") == before
    fixed: dict = {}
    assert [t["id"] for t in lsclient.tasks(ls_api, pid, page_size=50, page_bytes=0, listing=fixed)] == \
        [t["id"] for t in tasks]
    assert fixed["sizes"] == [50, 50, 50], fixed


def test_listing_annotated_tasks_asks_label_studio_for_those_alone(ls_server, ls_api):
    """Training lists the tasks with a submitted annotation: Label Studio filters them (its total_annotations
    counter), so a project of thousands of predicted tasks does not send them all to each run; annotations made
    in the editor, imported ones and deleted ones are counted right, cancelled ones (skips) are not annotations."""
    pid = ls_api.projects.create(title="annotated only", label_config=LABEL_CONFIG).id
    box = [{"from_name": "bbox", "to_name": "image", "type": "rectanglelabels", "original_width": 24,
            "original_height": 16, "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0,
                                             "rectanglelabels": ["Cat"]}}]
    ids = ls_api.projects.import_tasks(pid, request=[{"data": {"image": f"/x/{i}.png"}} for i in range(6)] + [
        {"data": {"image": "/x/imported.png"}, "annotations": [{"result": box}]}], return_task_ids=True).task_ids
    plain, drawn, skipped, deleted = ids[0], ids[1], ids[2], ids[3]
    ls_api.annotations.create(drawn, result=box)
    ls_api.annotations.create(skipped, result=[], was_cancelled=True)
    ls_api.annotations.delete(ls_api.annotations.create(deleted, result=box).id)
    ls_api.predictions.create(task=plain, result=box, score=0.5, model_version="someone")
    listing: dict = {}
    assert [t["id"] for t in lsclient.tasks(ls_api, pid, only_annotated=True, listing=listing)] == [drawn, ids[6]]
    assert listing["total"] == 2, listing                 # filtered by Label Studio, not after the transfer
    assert len(list(lsclient.tasks(ls_api, pid))) == 7


def test_training_lists_the_annotation_a_reviewer_starred_as_ground_truth(ls_server, ls_api, settings):
    """A task two people labelled: the star on the older annotation (Label Studio's ground truth, set in the editor
    by PATCHing the annotation) makes it the one a training run trains on, and moving the star moves it."""
    from tessera.backend.dataset import annotated_tasks, data_fingerprint
    from tessera.backend.predictions import result_of

    pid = ls_api.projects.create(title="ground truth", label_config=LABEL_CONFIG).id
    (tid,) = ls_api.projects.import_tasks(pid, request=[{"data": {"image": "/x/a.png"}}],
                                          return_task_ids=True).task_ids

    def box(label):
        return [{"id": "r1", "from_name": "bbox", "to_name": "image", "type": "rectanglelabels", "original_width": 24,
                 "original_height": 16, "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0,
                                                  "rectanglelabels": [label]}}]

    first = ls_api.annotations.create(tid, result=box("Cat")).id
    second = ls_api.annotations.create(tid, result=box("Dog")).id

    def trained_on():
        _, tasks = annotated_tasks(settings, ls_api, str(pid))
        (task,) = tasks
        (ann,) = task["annotations"]
        return ann["id"], result_of(ann)[0]["value"]["rectanglelabels"], data_fingerprint(tasks)

    latest = trained_on()
    assert latest[:2] == (second, ["Dog"])
    ls_api.annotations.update(first, ground_truth=True)
    starred = trained_on()
    assert starred[:2] == (first, ["Cat"]) and starred[2] != latest[2]
    ls_api.annotations.update(second, ground_truth=True)    # Label Studio keeps one star a task
    assert trained_on()[:2] == (second, ["Dog"])
    assert [a["ground_truth"] for a in ls_api.tasks.get(tid).annotations] in ([False, True], [True, False])

"""Every route through Flask's test client, with the request shapes Label Studio 1.23.2 sends."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from tessera.backend.app import create_app
from tessera.backend.regions import region_to_mask, results_to_maps
from tessera.backend.predictions import ModelCache, training_annotation
from tessera.backend.settings import Settings
from tests.conftest import CONFIG_ALL, RecordingRunner, register_stub


def blobs_png(h=48, w=64, boxes=((5, 5, 15, 20), (25, 30, 40, 50))):
    arr = np.zeros((h, w, 3), np.uint8)
    for r0, c0, r1, c1 in boxes:
        arr[r0:r1, c0:c1] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def data_uri(png):
    return "data:image/png;base64," + base64.b64encode(png).decode()


def setup_body(project="7.1700000000", schema=CONFIG_ALL):
    return {"project": project, "schema": schema, "hostname": "http://localhost:8080",
            "access_token": "0123456789abcdef0123456789abcdef01234567", "extra_params": None}


def predict_body(tasks, project="7.1700000000", context=None):
    return {"tasks": tasks, "project": project, "label_config": CONFIG_ALL,
            "params": {"login": None, "password": None, "context": context}}


def test_health_answers_fast_with_version(client):
    for path in ("/", "/health"):
        r = client.get(path)
        assert r.status_code == 200 and r.json["status"] == "UP" and r.json["tessera"]


def test_setup_returns_a_string_version_that_predictions_carry(client):
    r = client.post("/setup", json=setup_body())
    assert r.status_code == 200
    version = r.json["model_version"]
    assert isinstance(version, str) and version.startswith("tessera-default-v")
    task = {"id": 1, "data": {"image": data_uri(blobs_png())}}
    p = client.post("/predict", json=predict_body([task]))
    assert p.status_code == 200
    assert [item["model_version"] for item in p.json["results"]] == [version]


def test_setup_rejects_what_it_cannot_serve(client):
    r = client.post("/setup", json=setup_body(schema='<View><Text name="t" value="$t"/>'
                                                     '<Labels name="l" toName="t"><Label value="A"/></Labels></View>'))
    assert r.status_code == 422 and "<Image>" in r.json["error"] and "<Text>" in r.json["error"]
    assert client.post("/setup", json={"project": "1.2"}).status_code == 400
    r = client.post("/setup", data="not json", content_type="text/plain")
    assert r.status_code == 400 and "JSON" in r.json["error"]
    r = client.post("/setup", json={**setup_body(), "project": "../etc"})
    assert r.status_code == 400 and "project" in r.json["error"]


def test_predict_one_valid_item_per_task_in_order(client, stub_predictor):
    client.post("/setup", json=setup_body())
    pngs = [blobs_png(), blobs_png(boxes=((1, 1, 4, 4),)), blobs_png(boxes=())]
    tasks = [{"id": 10 + i, "data": {"image": data_uri(p)}} for i, p in enumerate(pngs)]
    r = client.post("/predict", json=predict_body(tasks))
    assert r.status_code == 200
    results = r.json["results"]
    assert len(results) == 3
    # the first image has 2 blobs -> 2 regions for each of brush, polygon, rectangle
    kinds = sorted(x["type"] for x in results[0]["result"])
    assert kinds == ["brushlabels"] * 2 + ["polygonlabels"] * 2 + ["rectanglelabels"] * 2
    assert len(results[1]["result"]) == 3 and results[2]["result"] == []
    for item in results[0]["result"]:
        assert item["to_name"] == "image" and item["from_name"] in ("mask", "poly", "bbox")
        assert item["original_width"] == 64 and item["original_height"] == 48
        assert 0 <= item["score"] <= 1
        assert region_to_mask(item, 48, 64).sum() == 150 or region_to_mask(item, 48, 64).sum() == 300
    assert all(0 <= x["score"] <= 1 for x in results)


def test_a_bad_task_does_not_fail_the_batch(client):
    good = {"id": 1, "data": {"image": data_uri(blobs_png())}}
    tasks = [good, {"id": 2, "data": {"image": "http://evil.example.com/x.png"}}, {"id": 3, "data": {}},
             {"id": 4, "data": {"image": data_uri(b"garbage")}}, {"id": 5, "data": {"image": "../../etc/passwd"}},
             good]
    r = client.post("/predict", json=predict_body(tasks))
    assert r.status_code == 200
    res = r.json["results"]
    assert len(res) == 6
    assert res[0]["result"] and res[5]["result"]
    assert res[1] == []             # a host not allowed: no prediction now (TESSERA_ALLOWED_HOSTS may allow it)
    assert all(x["result"] == [] and x["score"] == 0 for x in res[2:5])     # nothing there: an empty prediction


def test_large_batches_are_batched(settings, stub_predictor):
    register_stub(settings)
    s = Settings(model_dir=settings.model_dir, predict_batch=8)
    app = create_app(s, runner=RecordingRunner(), cache=ModelCache(s, loader=lambda p, d: stub_predictor))
    c = app.test_client()
    tasks = [{"id": i, "data": {"image": data_uri(blobs_png())}} for i in range(20)]
    res = c.post("/predict", json=predict_body(tasks)).json["results"]
    assert len(res) == 20 and all(len(x["result"]) == 6 for x in res)
    assert sorted(stub_predictor.calls) == [4, 8, 8]


def test_untrained_project_predicts_nothing_with_score_zero(settings):
    app = create_app(settings, runner=RecordingRunner())
    c = app.test_client()
    assert c.post("/setup", json=setup_body()).json["model_version"] == "tessera-untrained"
    res = c.post("/predict", json=predict_body([{"id": 1, "data": {"image": data_uri(blobs_png())}}])).json
    assert res["results"] == [{"result": [], "score": 0.0, "model_version": "tessera-untrained"}]


def test_project_model_wins_over_default_and_labels_must_fit(settings, stub_predictor):
    register_stub(settings, labels=("Cat", "Dog"))     # a default model for other labels does not serve
    app = create_app(settings, runner=RecordingRunner(), cache=ModelCache(settings, loader=lambda p, d: stub_predictor))
    c = app.test_client()
    assert c.post("/setup", json=setup_body()).json["model_version"] == "tessera-untrained"
    register_stub(settings, key="7")
    assert c.post("/setup", json=setup_body()).json["model_version"] == "tessera-p7-v0001"


def test_a_retrieve_past_the_deadline_answers_what_it_did_and_the_next_retrieve_goes_on(settings, stub_predictor):
    """Without LABEL_STUDIO_URL Tessera can't write predictions itself: a /predict past its deadline answers its
    first tasks, gives the rest an empty list (Label Studio stores no prediction for them and sends them with the
    next "Retrieve predictions", which leaves out the tasks that have one), and queues nothing."""
    s = Settings(model_dir=settings.model_dir, media_root=settings.media_root, predict_deadline_s=1e-6,
                 predict_batch=4)
    register_stub(s)
    app = create_app(s, runner=RecordingRunner(), cache=ModelCache(s, loader=lambda path, device: stub_predictor))
    c = app.test_client()
    c.post("/setup", json=setup_body())
    png = data_uri(blobs_png())
    left = [{"id": 100 + i, "data": {"image": png}} for i in range(10)]
    answered = []
    for _ in range(5):
        r = c.post("/predict", json=predict_body(left))
        assert r.status_code == 200 and len(r.json["results"]) == len(left)
        done = [t["id"] for t, item in zip(left, r.json["results"]) if item != []]
        assert done == [t["id"] for t in left[:len(done)]] and done, r.json["results"]   # a prefix, never nothing
        assert all(len(item["result"]) == 6 and item["model_version"] == r.json["model_version"]
                   for item in r.json["results"][:len(done)])
        answered += done
        left = left[len(done):]
        if not left:
            break
    assert answered == list(range(100, 110)) and not left
    assert c.get("/status", query_string={"project": 7}).json["predicting"] is None


def test_the_overflow_writes_to_label_studio_url_only_with_a_token_from_that_host(settings, stub_predictor):
    """Predictions written after the reply go to LABEL_STUDIO_URL alone: with LABEL_STUDIO_API_KEY, else with the
    token a /setup from that same origin handed over; a /setup naming any other host lends no token, and without
    LABEL_STUDIO_URL nothing is written (the tasks wait for the next retrieve)."""
    from tessera.backend.ls_model import TesseraModel

    ls = "http://127.0.0.1:8080"
    token = "0123456789abcdef0123456789abcdef01234567"
    cases = [({}, ls, None),                                                      # no LABEL_STUDIO_URL
             ({"label_studio_url": ls}, "http://127.0.0.2:8080", None),           # another host's token
             ({"label_studio_url": ls}, "http://127.0.0.1:8081", None),           # another port's
             ({"label_studio_url": ls}, ls + "/", (ls, token)),                   # that host's own
             ({"label_studio_url": ls, "label_studio_api_key": "k"}, "http://127.0.0.2:8080", (ls, "k"))]
    for overrides, host, want in cases:
        s = Settings(model_dir=settings.model_dir, media_root=settings.media_root, **overrides)
        app = create_app(s, runner=RecordingRunner(), cache=ModelCache(s, loader=lambda path, device: stub_predictor))
        c = app.test_client()
        assert c.post("/setup", json={**setup_body(), "hostname": host, "access_token": token}).status_code == 200
        with app.app_context():       # a /predict carries no host or token: the /setup pair is what it has
            got = TesseraModel(app.extensions["tessera"], "7", CONFIG_ALL)._writer()
        assert got == want, (overrides, host, got)


def test_predict_input_errors(client):
    assert client.post("/predict", json={"tasks": []}).status_code == 400
    assert client.post("/predict", json={"project": "1.1"}).status_code == 400
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": {}}], "project": "1.1"})
    assert r.status_code == 400 and "label config" in r.json["error"]
    r = client.post("/predict", json={**predict_body([{"id": 1}]), "label_config": "<View><Text name='t' value='$t'/></View>"})
    assert r.status_code == 422


def test_interactive_keypoint_gives_one_region(client):
    png = blobs_png()
    task = {"id": 1, "data": {"image": data_uri(png)}}
    context = {"result": [{"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True,
                           "original_width": 64, "original_height": 48,
                           "value": {"x": 10 / 64 * 100, "y": 10 / 48 * 100, "keypointlabels": ["Nucleus"]}}]}
    res = client.post("/predict", json=predict_body([task], context=context)).json["results"]
    assert len(res) == 1
    brush = [r for r in res[0]["result"] if r["type"] == "brushlabels"]
    assert len(brush) == 1
    m = region_to_mask(brush[0], 48, 64)
    assert m.sum() == 150 and m[10, 10]


def test_annotated_task_gets_mislabeling(client):
    png = blobs_png()
    wrong = [{"from_name": "bbox", "to_name": "image", "type": "rectanglelabels", "original_width": 64,
              "original_height": 48, "value": {"x": 80, "y": 80, "width": 10, "height": 10,
                                               "rectanglelabels": ["Nucleus"]}}]
    task = {"id": 1, "data": {"image": data_uri(png)}, "annotations": [{"id": 3, "result": wrong}]}
    item = client.post("/predict", json=predict_body([task])).json["results"][0]
    assert 0 < item["mislabeling"] <= 1 and item["result"]


def test_predict_scores_the_annotation_that_training_uses(client, stub_predictor):
    """The latest annotation counts even when empty ("no object here"), in /predict as in training."""
    png = blobs_png()
    exact = [{"from_name": "bbox", "to_name": "image", "type": "rectanglelabels", "original_width": 64,
              "original_height": 48, "value": {"x": c0 / 64 * 100, "y": r0 / 48 * 100, "width": (c1 - c0) / 64 * 100,
                                               "height": (r1 - r0) / 48 * 100, "rectanglelabels": ["Nucleus"]}}
             for r0, c0, r1, c1 in ((5, 5, 15, 20), (25, 30, 40, 50))]
    task = {"id": 1, "data": {"image": data_uri(png)}, "annotations": [
        {"id": 1, "result": exact, "updated_at": "2024-01-01T00:00:00"},
        {"id": 3, "result": [], "updated_at": "2024-01-02T00:00:00"}]}
    item = client.post("/predict", json=predict_body([task])).json["results"][0]
    ann = training_annotation(task)                     # the one training trains with
    assert ann["id"] == 3
    classes, instances = results_to_maps(ann["result"], "image", 48, 64, {"Nucleus": 1})
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert item["mislabeling"] == round(stub_predictor.review(image, classes, instances)[1], 4) > 0.1


@pytest.mark.parametrize("action", ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED"])
def test_annotation_webhooks_schedule_training(client, action):
    body = {"action": action, "annotation": {"id": 1, "task": 2, "result": []}, "task": {"id": 2},
            "project": {"id": 7, "label_config": CONFIG_ALL}}
    r = client.post("/webhook", json=body)
    assert r.status_code == 201 and r.json["status"] == "scheduled"
    assert client.runner.submitted == [("7", action)]


def test_start_training_reaches_the_runner(client):
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    assert r.status_code == 201 and client.runner.submitted == [("7", "START_TRAINING")]


def test_webhook_errors_and_unknown_actions(client):
    r = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 7}})
    assert r.status_code == 200 and "TASKS_CREATED" in r.json["message"]
    assert client.post("/webhook", json={"project": {"id": 7}}).status_code == 400
    assert client.post("/webhook", json={"action": "START_TRAINING"}).status_code == 400
    assert client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 7}}).status_code == 400
    assert client.post("/webhook", data=b"\xff\xfe", content_type="application/json").status_code == 400
    assert client.runner.submitted == []


def test_versions_get_and_post(client):
    client.post("/setup", json=setup_body())
    r = client.get("/versions")
    assert r.status_code == 200 and r.json["versions"] == ["tessera-default-v0001"]
    r = client.post("/versions", json={"project": "7.1700000000"})
    assert r.status_code == 200 and "default" in r.json["projects"]


def test_status_route(client):
    r = client.get("/status?project=7")
    assert r.status_code == 200 and r.json["job"]["state"] == "idle"
    assert client.get("/status").status_code == 400


def test_request_size_cap(settings):
    small = Settings(model_dir=settings.model_dir, max_request_bytes=1000)
    c = create_app(small, runner=RecordingRunner()).test_client()
    r = c.post("/predict", json=predict_body([{"id": 1, "data": {"image": "x" * 5000}}]))
    assert r.status_code == 413 and "TESSERA_MAX_REQUEST_BYTES" in r.json["error"]


def test_basic_auth(settings):
    s = Settings(model_dir=settings.model_dir, basic_auth_user="ls", basic_auth_pass="pw")
    c = create_app(s, runner=RecordingRunner()).test_client()
    assert c.get("/health").status_code == 200          # health stays open for container probes
    assert c.post("/setup", json=setup_body()).status_code == 401
    hdr = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    assert c.post("/setup", json=setup_body(), headers=hdr).status_code == 200
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:nope").decode()}
    assert c.post("/setup", json=setup_body(), headers=bad).status_code == 401


def test_unknown_route_and_method(client):
    assert client.get("/nope").status_code == 404
    assert client.get("/predict").status_code == 405


def test_the_routes_go_through_the_hooks(client, monkeypatch):
    """/setup, /predict and /webhook answer what TesseraModel.setup / predict / fit return: the hooks are the flow."""
    from tessera.backend.ls_model import TesseraModel

    calls = []
    for hook in ("setup", "predict", "fit"):
        real = getattr(TesseraModel, hook)
        monkeypatch.setattr(TesseraModel, hook, lambda self, *a, _real=real, _hook=hook, **kw:
                            calls.append(_hook) or _real(self, *a, **kw))
    client.post("/setup", json=setup_body())
    client.post("/predict", json=predict_body([{"id": 1, "data": {"image": data_uri(blobs_png())}}]))
    client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    assert calls == ["setup", "predict", "fit"]


def test_the_hooks_called_directly_answer_as_the_routes_do(client):
    """Called without HTTP, as a reader of upstream backends would: same predictions, same training run."""
    from tessera.backend.ls_model import TesseraModel

    state = client.application.extensions["tessera"]
    task = {"id": 1, "data": {"image": data_uri(blobs_png())}}
    model = TesseraModel(state, "7", CONFIG_ALL)
    assert model.setup() == model.model_version == client.post("/setup", json=setup_body()).json["model_version"]
    assert model.predict([task]) == client.post("/predict", json=predict_body([task])).json["results"]
    reply, scheduled = TesseraModel(state).fit("START_TRAINING", {"project": {"id": 7}})
    assert scheduled and reply["status"] == "scheduled" and client.runner.submitted == [("7", "START_TRAINING")]
    reply, scheduled = TesseraModel(state).fit("TASKS_CREATED", {"project": {"id": 7}})
    assert not scheduled and reply["status"] == "ignored"

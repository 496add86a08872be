"""Tessera's HTTP app: the routes Label Studio 1.23.2 calls, each checking the request's shape and calling one
hook of `TesseraModel` (backend/ls_model.py), where the backend's work is.

One Blueprint per concern, each reading the process's `BackendState` from `app.extensions["tessera"]`:
`serving` (/setup, /predict incl. interactive), `training` (/webhook), `synthetic` (/generate), `status`
(/, /health, /versions, /status). App-wide: JSON bodies only, a request-size cap, optional basic auth, a JSON
error with a fixing hint for every 4xx. Nothing heavy runs in a request but /predict.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, LengthRequired, RequestEntityTooLarge

from tessera import backend
from tessera.backend.ls_model import BackendState, BadRequest, ProjectState, TesseraModel, key_of
from tessera.backend.lsclient import VersionFollower
from tessera.backend.overflow import Overflow
from tessera.backend.regions import region_value
from tessera.backend.predictions import ModelCache
from tessera.backend.store import DEFAULT_KEY, version_string
from tessera.backend.settings import Settings
from tessera.backend.urls import UnsafeURL, parse_http_url

__all__ = ["create_app", "BadRequest", "ProjectState", "BackendState"]

logger = logging.getLogger(__name__)

ROUTES = "/health /setup /predict /webhook /versions /status /generate"


def create_app(settings: Settings | None = None, runner=None, cache: ModelCache | None = None) -> Flask:
    """App factory: `tessera serve` (backend/serving.py) in production, `create_app(...).test_client()` in tests."""
    settings = settings or Settings.from_env()
    if runner is None:
        from tessera.backend.jobs import make_runner
        runner = make_runner(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False
    cache = cache or ModelCache(settings)
    app.extensions["tessera"] = BackendState(settings=settings, cache=cache, runner=runner, projects=ProjectState(),
                                             follower=VersionFollower(settings), overflow=Overflow(settings, cache))
    app.before_request(_size_cap)
    app.before_request(_basic_auth)
    app.register_error_handler(BadRequest, _bad_request)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _crash)
    for blueprint in (serving, training, synthetic, status):
        app.register_blueprint(blueprint)
    return app


def state() -> BackendState:
    return current_app.extensions["tessera"]


# -------------------------------------------------------------------------------- app-wide: limits, auth, errors

def _size_cap():
    # JSON bodies are checked here, before anything reads them; chunked bodies have no length to check
    length = request.content_length
    if length is not None and length > state().settings.max_request_bytes:
        raise RequestEntityTooLarge()
    if length is None and request.method == "POST":
        raise LengthRequired()
    return None


def _basic_auth():
    settings = state().settings
    if not settings.basic_auth or request.path in ("/health", "/"):
        return None
    try:
        auth = request.authorization
    except (ValueError, UnicodeError):
        auth = None
    # bytes, not str: compare_digest raises TypeError on non-ASCII str (a 500 before)
    ok = auth is not None and auth.type == "basic" \
        and hmac.compare_digest(_utf8(auth.username), _utf8(settings.basic_auth_user)) \
        and hmac.compare_digest(_utf8(auth.password), _utf8(settings.basic_auth_pass.get_secret_value()))
    if not ok:
        resp = jsonify({"error": "authentication required: set the basic-auth user and password of this "
                                 "backend in Label Studio (Model > Authentication)"})
        resp.status_code = 401
        resp.headers["WWW-Authenticate"] = 'Basic realm="tessera"'
        return resp
    return None


def _bad_request(e: BadRequest):
    logger.info("%s %s -> %d: %s", request.method, request.path, e.status, e)
    return jsonify({"error": str(e)}), e.status


def _http_error(e: HTTPException):
    hint = {413: f"request body is over the {state().settings.max_request_bytes} byte cap "
                 "(TESSERA_MAX_REQUEST_BYTES)",
            405: f"{request.method} is not allowed on {request.path}",
            411: "send a Content-Length header (chunked request bodies are not accepted)",
            404: f"no route {request.path}; routes: {ROUTES}"}.get(e.code, e.description)
    return jsonify({"error": hint}), e.code


def _crash(e: Exception):
    logger.exception("%s %s failed", request.method, request.path)
    return jsonify({"error": f"internal error ({type(e).__name__}); see the Tessera log"}), 500


# -------------------------------------------------------------------------------- request shapes

def _get_json() -> Any:
    try:
        return request.get_json(silent=True)
    except RecursionError:            # json.loads on very deeply nested arrays
        raise BadRequest("the JSON body is nested too deeply") from None


def _json_body(required: tuple[str, ...] = ()) -> dict:
    data = _get_json()
    if data is None:
        raise BadRequest("the body must be JSON (Content-Type: application/json)")
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(data).__name__}")
    missing = [k for k in required if data.get(k) in (None, "")]
    if missing:
        raise BadRequest(f"missing required field(s): {', '.join(missing)}")
    return data


def _ls_pair(data: dict) -> tuple[str, str] | None:
    """The (Label Studio URL, token) a request carries, checked; None when it names no host. A token that
    comes without a host is dropped: it is bound to no host."""
    hostname, token = data.get("hostname"), data.get("access_token")
    if hostname is not None and not isinstance(hostname, str):
        raise BadRequest(f"hostname must be Label Studio's URL as a string, got {type(hostname).__name__}")
    if token is not None and not isinstance(token, str):
        raise BadRequest(f"access_token must be a string, got {type(token).__name__}")
    if not hostname:
        return None
    if not state().settings.label_studio_url:       # with LABEL_STUDIO_URL set the request's host is not used
        try:
            parse_http_url(hostname)
        except UnsafeURL as e:
            raise BadRequest(f"hostname {hostname[:80]!r} is not a usable Label Studio URL: {e}") from None
    return hostname.rstrip("/"), token or ""


def _context(params: Any) -> dict | None:
    """Interactive hints (params.context): 422 naming the first malformed one."""
    if not isinstance(params, dict):
        raise BadRequest("params must be a JSON object")
    context = params.get("context")
    if context is None:
        return None
    if not isinstance(context, dict):
        raise BadRequest("params.context must be a JSON object")
    hints = context.get("result")
    if hints is None:
        return context
    if not isinstance(hints, list):
        raise BadRequest("params.context.result must be a list of regions", status=422)
    for i, hint in enumerate(hints):
        try:
            region_value(hint)
        except ValueError as e:
            raise BadRequest(f"params.context.result[{i}]: {e}", status=422) from None
    return context


# -------------------------------------------------------------------------------- serving: /setup, /predict

serving = Blueprint("serving", __name__)


@serving.post("/setup")
def setup():
    data = _json_body(("project", "schema"))
    key = key_of(data["project"])
    if not isinstance(data["schema"], str):
        raise BadRequest("schema must be the labeling config XML as a string", status=422)
    model = TesseraModel(state(), key, data["schema"])
    model.config                        # an unsupported config is a 422 before the request's host is checked
    model.ls = _ls_pair(data)
    return jsonify({"model_version": model.setup()})


@serving.post("/predict")
def predict():
    started = time.monotonic()          # Label Studio's clock started a little earlier, with the upload
    data = _json_body(("tasks",))
    tasks = data["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise BadRequest("tasks must be a non-empty list of Label Studio tasks")
    key = key_of(data.get("project") or _task_project(tasks))
    cap = state().settings.max_predict_tasks
    if len(tasks) > cap:
        raise BadRequest(f"{len(tasks)} tasks in one request is over the cap of {cap} (TESSERA_MAX_PREDICT_TASKS); "
                         f"for a whole project run `tessera predict --project {key}`, which writes predictions "
                         "through the API in the background", status=413)
    context = _context(data.get("params") or {})
    t0 = time.perf_counter()
    model = TesseraModel(state(), key, data.get("label_config"), ls=_ls_pair(data))
    items = model.predict(tasks, context=context, as_json=True, started=started)   # JSON texts, made beside passes
    version = next((json.loads(x)["model_version"] for x in items if x != "[]"), None) or model.model_version
    logger.info("predict project %s: %d tasks in %.2fs (%s)", key, len(tasks), time.perf_counter() - t0, version)
    body = '{"results":[' + ",".join(items) + '],"model_version":' + json.dumps(version) + "}"
    return current_app.response_class(body, mimetype="application/json")


def _task_project(tasks: list) -> Any:
    first = tasks[0] if isinstance(tasks[0], dict) else {}
    return first.get("project")


# -------------------------------------------------------------------------------- training: /webhook

training = Blueprint("training", __name__)


@training.post("/webhook")
def webhook():
    data = _json_body()
    action = data.get("action")
    if not isinstance(action, str) or not action:
        raise BadRequest("webhook body needs an 'action' (e.g. ANNOTATION_CREATED, START_TRAINING)")
    reply, scheduled = TesseraModel(state()).fit(action, data)
    return jsonify(reply), (201 if scheduled else 200)


# -------------------------------------------------------------------------------- synthetic: /generate

synthetic = Blueprint("synthetic", __name__)


@synthetic.post("/generate")
def generate():
    """Synthetic, pre-annotated tasks into a project (see backend/synthetic_tasks.py)."""
    from tessera.backend.synthetic_tasks import KINDS, generate_into_project

    data = _json_body(("project",))
    key = key_of(data["project"])
    try:
        count = int(data.get("count", 8))
        seed = int(data.get("seed", 0))
        share = float(data.get("share", 0.3))
    except (TypeError, ValueError):
        raise BadRequest("count and seed must be integers, share a number") from None
    if not 1 <= count <= 200:
        raise BadRequest("count must be between 1 and 200 per request")
    if not 0.0 <= share <= 1.0:
        raise BadRequest("share must be between 0 and 1")
    label = data.get("label")
    if label is not None and not isinstance(label, str):
        raise BadRequest("label must be a label name of the project's config")
    kind = data.get("kind", "edited")
    if kind not in KINDS:
        raise BadRequest(f"kind must be one of {list(KINDS)}")
    try:
        result = generate_into_project(state().settings, key, count=count, label=label, share=share, seed=seed,
                                       kind=kind)
    except ValueError as e:
        raise BadRequest(str(e), status=422) from None
    return jsonify(result), (200 if not result.get("failed") else 207)


# -------------------------------------------------------------------------------- status: /health, /versions, /status

status = Blueprint("status", __name__)


@status.get("/")
@status.get("/health")
def health():
    return jsonify({"status": "UP", "model_class": "TesseraModel", "tessera": backend.__version__,
                    "training": "redis" if state().settings.redis_url else "in-process"})


@status.route("/versions", methods=["GET", "POST"])
def versions():
    body = _get_json() if request.method == "POST" else None
    if body is not None and not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    project = request.args.get("project") or (body or {}).get("project")
    keys = [key_of(project)] if project else state().projects.keys()
    out: dict[str, list] = {}
    for key in keys + [DEFAULT_KEY]:
        listed = [{"version": version_string(key, v.version, v.kind), "status": v.status, "kind": v.kind,
                   "created": v.created, "metrics": v.metrics, "reason": v.reason}
                  for v in state().cache.registry(key).versions()]
        if listed:
            out[key] = listed
    flat = [v["version"] for vs in out.values() for v in vs if v["kind"] == "label"]
    return jsonify({"versions": flat, "projects": out})


@status.get("/status")
def project_status():
    project = request.args.get("project")
    if not project:
        raise BadRequest("give ?project=<id>")
    key = key_of(project)
    cache = state().cache
    return jsonify({"project": key, "model_version": cache.version(key), "job": state().runner.status(key),
                    "served": served_figures(cache, key), "predicting": state().overflow.status(key)})


def _utf8(value: str | None) -> bytes:
    return (value or "").encode("utf-8", "surrogateescape")


SERVED_FIGURES = ("val_iou", "val_score", "mask_iou", "metric", "box_ap50", "precision", "recall", "f1", "class_recall",
                  "class_ap50", "missed_classes", "regions_per_image", "true_per_image", "region_cut", "n_val",
                  "n_held_back_tasks", "edit_confident",
                  "follow_edges", "box_scales", "rectangles", "head_box_ap50", "head_precision", "head_recall",
                  "head_f1", "head_class_recall", "head_class_ap50", "head_missed_classes", "head_regions_per_image",
                  "head_region_cut")


def served_figures(cache: ModelCache, key: str) -> dict | None:
    """The served label version's held-back figures: IoU beside precision / recall after its region
    cut, per-class recall, and the classes it finds no object of (said plainly, not buried)."""
    src = cache.source(key, None)
    if src is None:
        return None
    reg_key, _, info = src
    out = {k: info.metrics[k] for k in SERVED_FIGURES if k in info.metrics}
    out["version"] = version_string(reg_key, info.version)
    if out.get("missed_classes"):
        out["warning"] = (f"this version finds no object of class {', '.join(out['missed_classes'])} on its "
                          f"held-back tasks; annotate more of it or train longer")
    if "edit_confident" in out and out["edit_confident"] is None:     # (model/train_vqvae.choose_edit_confident)
        out["label_edits"] = ("off: the pixels this version is sure of are wrong too often on its held-back tasks, "
                              "so an annotated task's prediction is its annotation as drawn")
    return out

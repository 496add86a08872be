"""Tessera's HTTP app: the routes Label Studio 1.23.2 calls, written where label-studio-ml 1.0.9 is wrong.

JSON bodies only, a request-size cap, optional basic auth, a JSON error with a fixing hint for every 4xx.
Nothing heavy runs in a request but /predict: /setup and /webhook answer in milliseconds.
"""
from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, LengthRequired, RequestEntityTooLarge

import backend
from backend.label_config import LabelConfigError, parse_label_config
from backend.lsclient import VersionFollower
from backend.ls_model import TRAIN_EVENTS, TesseraModel
from backend.service import ModelCache
from backend.store import DEFAULT_KEY, project_key, version_string
from backend.regions import region_value
from backend.settings import Settings
from backend.urls import UnsafeURL, parse_http_url

logger = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request the client must fix: answered 400 (or `status`) with the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ProjectState:
    """What /setup told this process about each project: schema, and Label Studio's URL with the token that
    came WITH it (kept as one pair, so a host never inherits another host's token). Memory only, bounded:
    the least recently used projects are forgotten past `max_projects` or `max_bytes` of schemas."""

    def __init__(self, max_projects: int = 1000, max_bytes: int = 64 * 1024 * 1024):
        self._lock = threading.Lock()
        self._data: OrderedDict[str, dict] = OrderedDict()
        self.max_projects, self.max_bytes = max_projects, max_bytes

    def remember(self, key: str, schema: str = "", ls: tuple[str, str] | None = None) -> None:
        with self._lock:
            entry = self._data.pop(key, {})
            if schema:
                entry["schema"] = schema
            if ls is not None:
                entry["hostname"], entry["access_token"] = ls
            self._data[key] = entry
            total = sum(len(e.get("schema", "")) for e in self._data.values())
            while len(self._data) > 1 and (len(self._data) > self.max_projects or total > self.max_bytes):
                _, old = self._data.popitem(last=False)
                total -= len(old.get("schema", ""))

    def get(self, key: str) -> dict:
        with self._lock:
            return dict(self._data.get(key, {}))

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._data)


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


def _ls_pair(data: dict, settings: Settings) -> tuple[str, str] | None:
    """The (Label Studio URL, token) a request carries, checked; None when it names no host. A token that
    comes without a host is dropped: it is bound to no host."""
    hostname, token = data.get("hostname"), data.get("access_token")
    if hostname is not None and not isinstance(hostname, str):
        raise BadRequest(f"hostname must be Label Studio's URL as a string, got {type(hostname).__name__}")
    if token is not None and not isinstance(token, str):
        raise BadRequest(f"access_token must be a string, got {type(token).__name__}")
    if not hostname:
        return None
    if not settings.label_studio_url:       # with LABEL_STUDIO_URL set the request's host is not used
        try:
            parse_http_url(hostname)
        except UnsafeURL as e:
            raise BadRequest(f"hostname {hostname[:80]!r} is not a usable Label Studio URL: {e}") from None
    return hostname.rstrip("/"), token or ""


def _token_for_configured_ls(pair: tuple[str, str] | None, settings: Settings) -> str:
    """The /setup token, only when it came with LABEL_STUDIO_URL's own origin: a token is bound to the host
    it arrived with, and the version follower talks to LABEL_STUDIO_URL only."""
    if pair is None or not pair[1] or not settings.label_studio_url:
        return ""
    try:
        same = parse_http_url(pair[0])[0] == parse_http_url(settings.label_studio_url)[0]
    except UnsafeURL:
        return ""
    return pair[1] if same else ""


def _check_context(context: Any) -> None:
    """Interactive hints: 422 naming the first malformed one."""
    if context is None:
        return
    if not isinstance(context, dict):
        raise BadRequest("params.context must be a JSON object")
    hints = context.get("result")
    if hints is None:
        return
    if not isinstance(hints, list):
        raise BadRequest("params.context.result must be a list of regions", status=422)
    for i, hint in enumerate(hints):
        try:
            region_value(hint)
        except ValueError as e:
            raise BadRequest(f"params.context.result[{i}]: {e}", status=422) from None


def create_app(settings: Settings | None = None, runner=None, cache: ModelCache | None = None) -> Flask:
    """App factory: `tessera serve` (backend/serving.py) in production, `create_app(...).test_client()` in tests."""
    settings = settings or Settings.from_env()
    cache = cache or ModelCache(settings)
    if runner is None:
        from backend.jobs import make_runner
        runner = make_runner(settings)
    app = Flask("tessera")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["tessera"] = {"settings": settings, "cache": cache, "runner": runner}
    projects = ProjectState()
    follower = VersionFollower(settings)

    def model_for(data: dict, key: str, schema: Any) -> TesseraModel:
        state = projects.get(key)
        if schema is not None and not isinstance(schema, str):
            raise BadRequest(f"label_config must be the labeling config XML as a string, got "
                             f"{type(schema).__name__}", status=422)
        schema = schema or state.get("schema")
        if not schema:
            raise BadRequest("no label config for this project: send label_config (or call /setup first)")
        # the request's own (host, token) pair, else the pair /setup stored: never a mix of the two
        hostname, token = _ls_pair(data, settings) or (state.get("hostname", ""), state.get("access_token", ""))
        try:
            parse_label_config(schema)      # defusedxml first: the base class parses it again with lxml
            return TesseraModel(schema, settings=settings, cache=cache, project=key,
                                hostname=hostname, access_token=token)
        except LabelConfigError as e:
            raise BadRequest(f"unsupported label config: {e}", status=422) from None
        except (ValueError, SyntaxError) as e:      # lxml's XMLSyntaxError is a SyntaxError
            raise BadRequest(f"the label config is not valid XML: {str(e)[:200]}", status=422) from None

    def key_of(value: Any) -> str:
        try:
            return project_key(value)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    @app.before_request
    def _size_cap():
        # Flask 1.1 enforces MAX_CONTENT_LENGTH only for form parsing; JSON bodies are checked here
        length = request.content_length
        if length is not None and length > settings.max_request_bytes:
            raise RequestEntityTooLarge()
        if length is None and request.method == "POST":
            raise LengthRequired()
        return None

    @app.before_request
    def _auth():
        if not settings.basic_auth or request.path in ("/health", "/"):
            return None
        try:
            auth = request.authorization
        except (ValueError, UnicodeError):
            auth = None
        # bytes, not str: compare_digest raises TypeError on non-ASCII str (a 500 before)
        ok = auth is not None and hmac.compare_digest(_utf8(auth.username), _utf8(settings.basic_auth_user)) \
            and hmac.compare_digest(_utf8(auth.password), _utf8(settings.basic_auth_pass))
        if not ok:
            resp = jsonify({"error": "authentication required: set the basic-auth user and password of this "
                                     "backend in Label Studio (Model > Authentication)"})
            resp.status_code = 401
            resp.headers["WWW-Authenticate"] = 'Basic realm="tessera"'
            return resp
        return None

    @app.errorhandler(BadRequest)
    def _bad(e: BadRequest):
        logger.info("%s %s -> %d: %s", request.method, request.path, e.status, e)
        return jsonify({"error": str(e)}), e.status

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        hint = {413: f"request body is over the {settings.max_request_bytes} byte cap (TESSERA_MAX_REQUEST_BYTES)",
                405: f"{request.method} is not allowed on {request.path}",
                411: "send a Content-Length header (chunked request bodies are not accepted)",
                404: f"no route {request.path}; routes: /health /setup /predict /webhook /versions /status "
                     "/generate"}.get(e.code, e.description)
        return jsonify({"error": hint}), e.code

    @app.errorhandler(Exception)
    def _crash(e: Exception):
        logger.exception("%s %s failed", request.method, request.path)
        return jsonify({"error": f"internal error ({type(e).__name__}); see the Tessera log"}), 500

    @app.route("/", methods=["GET"])
    @app.route("/health", methods=["GET"])
    def health():
        return jsonify({"status": "UP", "model_class": "TesseraModel", "tessera": backend.__version__,
                        "training": "redis" if settings.redis_url else "in-process"})

    @app.route("/setup", methods=["POST"])
    def setup():
        data = _json_body(("project", "schema"))
        key = key_of(data["project"])
        if not isinstance(data["schema"], str):
            raise BadRequest("schema must be the labeling config XML as a string", status=422)
        try:
            config = parse_label_config(data["schema"])
        except LabelConfigError as e:
            raise BadRequest(f"unsupported label config: {e}", status=422) from None
        pair = _ls_pair(data, settings)
        projects.remember(key, schema=data["schema"], ls=pair)
        version = cache.version(key, config)
        follower.notice(key, version, _token_for_configured_ls(pair, settings))
        return jsonify({"model_version": version})

    @app.route("/predict", methods=["POST"])
    def predict():
        data = _json_body(("tasks",))
        tasks = data["tasks"]
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("tasks must be a non-empty list of Label Studio tasks")
        key = key_of(data.get("project") or _task_project(tasks))
        if len(tasks) > settings.max_predict_tasks:
            raise BadRequest(f"{len(tasks)} tasks in one request is over the cap of {settings.max_predict_tasks} "
                             f"(TESSERA_MAX_PREDICT_TASKS); for a whole project run `tessera predict --project "
                             f"{key}`, which writes predictions through the API in the background", status=413)
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise BadRequest("params must be a JSON object")
        context = params.get("context")
        _check_context(context)
        t0 = time.perf_counter()
        model = model_for(data, key, data.get("label_config"))
        results = model.predict(tasks, context=context)
        logger.info("predict project %s: %d tasks in %.2fs (%s)", key, len(tasks), time.perf_counter() - t0,
                    results[0]["model_version"] if results else "-")
        return jsonify({"results": results, "model_version": results[0]["model_version"]})

    @app.route("/webhook", methods=["POST"])
    def webhook():
        data = _json_body()
        action = data.get("action")
        if not isinstance(action, str) or not action:
            raise BadRequest("webhook body needs an 'action' (e.g. ANNOTATION_CREATED, START_TRAINING)")
        if action not in TRAIN_EVENTS:
            return jsonify({"status": "ignored", "message": f"Tessera does not act on {action}"}), 200
        project = data.get("project")
        if not isinstance(project, dict) or project.get("id") is None:
            raise BadRequest(f"{action} webhook needs the project object (send_payload=true in LS)")
        key = key_of(project["id"])
        if action.startswith("ANNOTATION") and not isinstance(data.get("annotation"), dict):
            raise BadRequest(f"{action} webhook needs the annotation object")
        if isinstance(project.get("label_config"), str) and project["label_config"]:
            projects.remember(key, schema=project["label_config"])
        if action.startswith("ANNOTATION") and not _trains_on_annotations(project):
            return jsonify({"status": "ignored", "project": key, "action": action,
                            "message": "\"Start model training on annotation submission\" is off for this project "
                                       "(Settings > Model): annotations train when it is on, or with Start "
                                       "training"}), 200
        run = runner.submit(key, action)
        logger.info("webhook %s for project %s: run %s", action, key, run.get("state"))
        # LS 1.23 stores "job" of a START_TRAINING reply in a 128-character column: an id, not the status
        return jsonify({"status": "scheduled", "project": key, "action": action,
                        "job": f"tessera-{key}-{run.get('events', 0)}", "run": run}), 201

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        body = _get_json() if request.method == "POST" else None
        if body is not None and not isinstance(body, dict):
            raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
        project = request.args.get("project") or (body or {}).get("project")
        keys = [key_of(project)] if project else projects.keys()
        out: dict[str, list] = {}
        for key in keys + [DEFAULT_KEY]:
            reg = cache.registry(key)
            listed = [{"version": version_string(key, v.version, v.kind), "status": v.status, "kind": v.kind,
                       "created": v.created, "metrics": v.metrics, "reason": v.reason} for v in reg.versions()]
            if listed:
                out[key] = listed
        flat = [v["version"] for vs in out.values() for v in vs if v["kind"] == "label"]
        return jsonify({"versions": flat, "projects": out})

    @app.route("/generate", methods=["POST"])
    def generate():
        """Synthetic, pre-annotated tasks into a project (see backend/synthetic.py)."""
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
        from backend.synthetic import KINDS, generate_into_project

        kind = data.get("kind", "edited")
        if kind not in KINDS:
            raise BadRequest(f"kind must be one of {list(KINDS)}")

        try:
            result = generate_into_project(settings, key, count=count, label=label, share=share, seed=seed,
                                           kind=kind)
        except ValueError as e:
            raise BadRequest(str(e), status=422) from None
        return jsonify(result), (200 if not result.get("failed") else 207)

    @app.route("/status", methods=["GET"])
    def status():
        project = request.args.get("project")
        if not project:
            raise BadRequest("give ?project=<id>")
        key = key_of(project)
        return jsonify({"project": key, "model_version": cache.version(key), "job": runner.status(key),
                        "served": served_figures(cache, key)})

    return app


def _trains_on_annotations(project: dict) -> bool:
    """LS's "Start model training on annotation submission" (Settings > Model). The webhook payload carries
    the model field behind it, `min_annotations_to_start_training` (0 = off; the API calls it
    `start_training_on_annotation_update`). A payload with neither (another sender) trains."""
    if "start_training_on_annotation_update" in project:
        return bool(project["start_training_on_annotation_update"])
    if "min_annotations_to_start_training" in project:
        return bool(project["min_annotations_to_start_training"])
    return True


def _utf8(value: str | None) -> bytes:
    return (value or "").encode("utf-8", "surrogateescape")


SERVED_FIGURES = ("val_iou", "val_score", "mask_iou", "metric", "box_ap50", "precision", "recall", "f1", "class_recall",
                  "class_ap50", "missed_classes", "regions_per_image", "true_per_image", "region_cut", "n_val")


def served_figures(cache, key: str) -> dict | None:
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
    return out


def _task_project(tasks: list) -> Any:
    first = tasks[0] if isinstance(tasks[0], dict) else {}
    return first.get("project")

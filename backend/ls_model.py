"""The Label Studio ML backend hooks, named as upstream backends name them: setup, predict, fit, model_version.

The HTTP routes (backend/app.py) check the request's shape, build a `TesseraModel` for the project and call
one hook; everything a backend does for Label Studio happens here:
- `setup()`        LS connects or opens a project: remember its label config, answer the served version;
- `predict(tasks)` pre-annotations, one item per task; with `context` (a smart-tool hint) one refined region;
- `fit(event, data)` annotation webhooks and "Start training": schedule one debounced training run.
There is no LabelStudioMLBase: see the README ("Why there is no LabelStudioMLBase").
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from tessera.backend.label_config import LabelConfig, LabelConfigError, parse_label_config
from tessera.backend.lsclient import VersionFollower
from tessera.backend.media import MediaResolver
from tessera.backend.overflow import Overflow
from tessera.backend.predictions import LATER, ModelCache, predict_tasks
from tessera.backend.store import project_key
from tessera.backend.settings import Settings
from tessera.backend.urls import UnsafeURL, parse_http_url

logger = logging.getLogger(__name__)

# upstream's TRAIN_EVENTS plus START_TRAINING, which label-studio-ml 1.0.9 left out ("Start training" never
# reached fit() there)
TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")


class BadRequest(ValueError):
    """A request the client must fix: answered 400 (or `status`) with the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Runner(Protocol):
    """tessera.backend.jobs' ThreadJobRunner / RQJobRunner: one debounced training run per project."""

    def submit(self, project_key: str, reason: str) -> dict: ...
    def status(self, project_key: str) -> dict: ...


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


@dataclass(frozen=True)
class BackendState:
    """One process's serving state, `app.extensions["tessera"]`: what every TesseraModel works with."""
    settings: Settings
    cache: ModelCache           # loaded weights per project, reloaded when the registry's current version moves
    runner: Runner              # training runs
    projects: ProjectState      # label configs and LS connections from /setup
    follower: VersionFollower   # names LS's connection after the served version
    overflow: Overflow          # the tasks of a /predict past its deadline, written to LS after the reply


class TesseraModel:
    """One request's view of one project. Cheap to build: weights live in the per-process ModelCache."""

    def __init__(self, state: BackendState, project: str = "", label_config: Any = None,
                 ls: tuple[str, str] | None = None):
        self.state, self.project = state, project
        remembered = state.projects.get(project) if project else {}
        if label_config is not None and not isinstance(label_config, str):
            raise BadRequest(f"label_config must be the labeling config XML as a string, got "
                             f"{type(label_config).__name__}", status=422)
        self.label_config: str = label_config or remembered.get("schema", "")
        self.ls = ls                    # the (Label Studio URL, token) pair the request came with, checked
        self._remembered = remembered
        self._config: LabelConfig | None = None

    @property
    def hostname(self) -> str:
        # the request's own (host, token) pair, else the pair /setup stored: never a mix of the two
        return self.ls[0] if self.ls else self._remembered.get("hostname", "")

    @property
    def access_token(self) -> str:
        return self.ls[1] if self.ls else self._remembered.get("access_token", "")

    @property
    def config(self) -> LabelConfig:
        """The parsed label config (defusedxml); 422 naming the unsupported tag."""
        if self._config is None:
            if not self.label_config:
                raise BadRequest("no label config for this project: send label_config (or call /setup first)")
            try:
                self._config = parse_label_config(self.label_config)
            except LabelConfigError as e:
                raise BadRequest(f"unsupported label config: {e}", status=422) from None
        return self._config

    @property
    def model_version(self) -> str:
        """The version predictions carry and /setup reports (they must agree, or LS stores duplicates)."""
        return self.state.cache.version(self.project, self.config)

    def setup(self) -> str:
        """LS connects or opens the project: remember its config and LS connection, name LS's connection after
        the served version; returns that version. Cheap: LS gives /setup 3 s."""
        config = self.config
        self.state.projects.remember(self.project, schema=self.label_config, ls=self.ls)
        version = self.state.cache.version(self.project, config)
        self.state.follower.notice(self.project, version, self._token_for_configured_ls())
        return version

    def predict(self, tasks: list[dict], context: dict | None = None, as_json: bool = False,
                started: float | None = None, **kwargs) -> list:
        """LS tasks -> one prediction item per task, same order; items carry the served model_version. With
        `context` (a smart tool's hint) the first task gets one refined region (interactive mode). `as_json`:
        each item as its JSON text.

        Within Label Studio's time limit (backend/overflow.py): the tasks not answered TESSERA_PREDICT_DEADLINE_S
        after `started` (time.monotonic(); default now), or past TESSERA_PREDICT_REPLY_MB, get LATER items and,
        where Tessera may write to Label Studio, are predicted after the reply and written through the API; tasks already queued that way get
        LATER items at once, but a single task (opened in the editor) is taken from the queue and answered."""
        settings, overflow = self.state.settings, self.state.overflow
        served = self.state.cache.served(self.project, self.config)
        media = MediaResolver(settings, ls_url=self.hostname, token=self.access_token)
        if context and context.get("result"):
            return predict_tasks(tasks, self.config, served, media, settings, context=context, as_json=as_json)
        ids = [_task_key(t) for t in tasks]
        if len(tasks) == 1:
            overflow.take(self.project, ids[0])
        held = overflow.held(self.project, ids)
        if held:
            logger.info("project %s: %d of %d tasks answered with no prediction: Tessera writes theirs through the "
                        "API", self.project, len(held), len(tasks))
        todo = [t for t, i in zip(tasks, ids) if i is None or i not in held]
        start = time.monotonic() if started is None else started
        deadline = start + settings.predict_deadline_s if settings.predict_deadline_s > 0 else None
        answered: dict = {}
        cap = int(settings.predict_reply_mb * 2**20) if settings.predict_reply_mb > 0 else None
        items = iter(predict_tasks(todo, self.config, served, media, settings, as_json=as_json, deadline=deadline,
                                   max_bytes=cap, answered=answered)) if todo else iter(())
        left = todo[answered.get("n", len(todo)):]
        if left:
            where = self._writer()
            if where is not None and served.predictor is not None:
                last = todo[answered["n"] - 1].get("id") if answered.get("n") else None
                overflow.submit(self.project, left, self.config, served.version, media, where, after_task=last)
            else:
                logger.warning("project %s: %d of %d tasks left unanswered past TESSERA_PREDICT_DEADLINE_S (%.0f s); "
                               "\"Retrieve predictions\" again predicts them, or set LABEL_STUDIO_URL and "
                               "LABEL_STUDIO_API_KEY so Tessera writes them itself", self.project, len(left),
                               len(tasks), settings.predict_deadline_s)
        return [next(items) if i is None or i not in held else ("[]" if as_json else list(LATER)) for i in ids]

    def _writer(self) -> tuple[str, str] | None:
        """(LABEL_STUDIO_URL, key) for writing predictions, None when Tessera may not write: LABEL_STUDIO_API_KEY,
        else the token a /setup from LABEL_STUDIO_URL's own origin handed over."""
        url = self.state.settings.label_studio_url
        key = self.state.settings.label_studio_api_key or self._token_for_configured_ls()
        return (url, key) if url and key else None

    def fit(self, event: str, data: dict, **kwargs) -> tuple[dict, bool]:
        """A webhook: annotation events (when the project trains on them) and START_TRAINING schedule one
        debounced training run; returns (reply, scheduled). Never trains in the request: LS waits for it."""
        if event not in TRAIN_EVENTS:
            return {"status": "ignored", "message": f"Tessera does not act on {event}"}, False
        project = data.get("project")
        if not isinstance(project, dict) or project.get("id") is None:
            raise BadRequest(f"{event} webhook needs the project object (send_payload=true in LS)")
        self.project = key = key_of(project["id"])
        if event.startswith("ANNOTATION") and not isinstance(data.get("annotation"), dict):
            raise BadRequest(f"{event} webhook needs the annotation object")
        if isinstance(project.get("label_config"), str) and project["label_config"]:
            self.state.projects.remember(key, schema=project["label_config"])
        if event.startswith("ANNOTATION") and not _trains_on_annotations(project):
            return {"status": "ignored", "project": key, "action": event,
                    "message": "\"Start model training on annotation submission\" is off for this project "
                               "(Settings > Model): annotations train when it is on, or with Start training"}, False
        run = self.state.runner.submit(key, event)
        logger.info("webhook %s for project %s: run %s", event, key, run.get("state"))
        # LS 1.23 stores "job" of a START_TRAINING reply in a 128-character column: an id, not the status
        return {"status": "scheduled", "project": key, "action": event,
                "job": f"tessera-{key}-{run.get('events', 0)}", "run": run}, True

    def _token_for_configured_ls(self) -> str:
        """The /setup token (this request's, else the one /setup left for the project), only when it came with
        LABEL_STUDIO_URL's own origin: a token is bound to the host it arrived with, and the version follower and
        the overflow's writes talk to LABEL_STUDIO_URL only."""
        url = self.state.settings.label_studio_url
        host, token = self.hostname, self.access_token           # the request's pair, else the one /setup left
        if not host or not token or not url:
            return ""
        try:
            same = parse_http_url(host)[0] == parse_http_url(url)[0]
        except UnsafeURL:
            return ""
        return token if same else ""


def _task_key(task: Any) -> int | str | None:
    """A task's id as the overflow keys it; None for a task without a usable one (it is predicted, never held)."""
    i = task.get("id") if isinstance(task, dict) else None
    return i if isinstance(i, (int, str)) and not isinstance(i, bool) else None


def key_of(value: Any) -> str:
    """project_key, a 400 when the client sent something that is not a project id."""
    try:
        return project_key(value)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def _trains_on_annotations(project: dict) -> bool:
    """LS's "Start model training on annotation submission" (Settings > Model). The webhook payload carries
    the model field behind it, `min_annotations_to_start_training` (0 = off; the API calls it
    `start_training_on_annotation_update`). A payload with neither (another sender) trains."""
    if "start_training_on_annotation_update" in project:
        return bool(project["start_training_on_annotation_update"])
    if "min_annotations_to_start_training" in project:
        return bool(project["min_annotations_to_start_training"])
    return True

"""Label Studio REST client for training runs, `tessera predict`, `tessera generate` and the connection's name.

Plain requests with the legacy token: label-studio-sdk 2.1.2's task pager asks for one page past the
end (Label Studio logs an ERROR with a traceback for each listing) and its httpx client logs every
request at INFO, so the few calls Tessera makes are written here.
"""
from __future__ import annotations

import io
import logging
import math
import threading
import time
from typing import Any, Iterator

import requests

from backend.settings import Settings
from backend.store import VERSION_PREFIX

logger = logging.getLogger(__name__)


class LabelStudioUnavailable(RuntimeError):
    """Label Studio cannot be reached or refuses the token; the message says which and what to set."""


class NotFound(LabelStudioUnavailable):
    """Label Studio answered 404: the project (or task) does not exist, or the token can't see it."""


class LSClient:
    """A project-level view of Label Studio's API with the legacy token (LABEL_STUDIO_API_KEY)."""

    def __init__(self, settings: Settings, url: str = "", api_key: str = "", timeout: float = 60.0):
        self.url = (url or settings.label_studio_url).rstrip("/")
        self.api_key = api_key or settings.label_studio_api_key
        if not self.url or not self.api_key:
            raise LabelStudioUnavailable("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (the legacy token from "
                                         "Account & Settings) so Tessera can read the project")
        self.timeout = timeout
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Token {self.api_key}"

    def request(self, method: str, path: str, **kwargs) -> Any:
        try:
            r = self.http.request(method, f"{self.url}/{path.lstrip('/')}", timeout=self.timeout, **kwargs)
        except requests.RequestException as e:
            raise LabelStudioUnavailable(f"Label Studio at {self.url} is unreachable: {type(e).__name__}") from e
        if r.status_code == 404:
            raise NotFound(f"{method} {path.split('?', 1)[0]} -> HTTP 404 from Label Studio at {self.url}")
        if r.status_code >= 400:
            raise LabelStudioUnavailable(f"{method} {path} -> HTTP {r.status_code}: {r.text[:300]}")
        return r.json() if r.content else None

    # ------------------------------------------------------------------------------------------ reads
    def project(self, project: int | str) -> dict:
        try:
            return self.request("GET", f"/api/projects/{int(project)}/")
        except NotFound:
            raise NotFound(f"project {project} not found in Label Studio at {self.url} (or the token "
                           "LABEL_STUDIO_API_KEY can't see it)") from None

    def tasks(self, project: int | str, only_annotated: bool = False, page_size: int = 100) -> Iterator[dict]:
        """Every task of the project with annotations and predictions, page by page.

        Hand-written rather than label-studio-sdk's pager: that one asks for one page past the end, and
        Label Studio logs an ERROR with a traceback ("Invalid page") for each listing. This loop stops
        at the `total` the first page reports."""
        seen, page, total = 0, 1, None
        while total is None or seen < total:
            out = self.request("GET", "/api/tasks/", params={"project": int(project), "page": page,
                                                               "page_size": page_size, "fields": "all"})
            batch = (out or {}).get("tasks") or []
            total = int((out or {}).get("total") or 0)
            for task in batch:
                if not only_annotated or task.get("annotations"):
                    yield task
            seen += len(batch)
            page += 1
            if not batch:
                break

    def ml_backends(self, project: int | str) -> list[dict]:
        return self.request("GET", "/api/ml/", params={"project": int(project)}) or []

    def follow_version(self, project: int | str, version: str) -> list[int]:
        """Name the project's Tessera connections (ML backends whose title or model version is a Tessera
        version) after `version`, and point project.model_version at it; returns the ids of the
        connections that carry that name now (empty: Tessera is not connected to the project).

        Label Studio 1.23 sorts by "Prediction score" (and samples by uncertainty) over the predictions
        whose model_version equals project.model_version, which it sets to the connection's TITLE when a
        model is connected and moves along when that title changes (ml/models.py MLBackend.save). Tessera's
        predictions carry the served version, so the title must be that version too: then the score column
        is filled, the project stays in "live model" mode (a task opened without a prediction of that
        version gets one) and superseded versions' predictions drop out of the score. A project whose
        model_version a user pointed at other predictions (Settings > Annotation) is left alone."""
        ours, old_titles = [], set()
        for ml in self.ml_backends(project):
            if not any(str(ml.get(k) or "").startswith(VERSION_PREFIX) for k in ("title", "model_version")):
                continue
            ours.append(int(ml["id"]))
            if ml.get("title") == version:
                continue
            old_titles.add(ml.get("title") or "")
            body = {"url": ml["url"], "project": int(project), "title": version}
            if ml.get("auth_method") == "BASIC_AUTH":        # an empty password keeps the stored one
                body.update(auth_method="BASIC_AUTH", basic_auth_user=ml.get("basic_auth_user") or "",
                            basic_auth_pass="")
            self.request("PATCH", f"/api/ml/{int(ml['id'])}", json=body)
        if not ours:
            return []
        current = self.project(project).get("model_version") or ""
        if current != version and (not current or current in old_titles or current.startswith(VERSION_PREFIX)):
            # LS moves it with the title, except when the title changed before LS first set it (a race
            # with the connection being created)
            self.request("PATCH", f"/api/projects/{int(project)}/", json={"model_version": version})
        if old_titles:
            logger.info("project %s: Label Studio connection(s) %s now named %s", project, ours, version)
        return ours

    # ----------------------------------------------------------------------------------------- writes
    def create_prediction(self, task: int, result: list[dict], score: float, model_version: str,
                          mislabeling: float | None = None) -> dict:
        body = {"task": int(task), "result": result, "score": float(score), "model_version": model_version}
        if mislabeling is not None:
            body["mislabeling"] = float(mislabeling)
        return self.request("POST", "/api/predictions/", json=body)

    def update_task_meta(self, task: int, meta: dict) -> dict:
        return self.request("PATCH", f"/api/tasks/{int(task)}/", json={"meta": meta})

    def upload_images(self, project: int | str, images: list[tuple[str, bytes]]) -> list[int]:
        """PNG files -> new tasks; returns their ids in upload order. Each file gets its own field name
        (LS keeps only the last of same-named parts)."""
        files = {f"file{i}": (name, io.BytesIO(data), "image/png") for i, (name, data) in enumerate(images)}
        out = self.request("POST", f"/api/projects/{int(project)}/import", files=files,
                           params={"return_task_ids": "true"})
        ids = (out or {}).get("task_ids") or []
        if len(ids) != len(images):
            raise LabelStudioUnavailable(f"uploaded {len(images)} images, Label Studio reported {len(ids)} tasks")
        return ids


class VersionFollower:
    """Keeps each project's Tessera connection in Label Studio named after the served version
    (LSClient.follow_version), driven by /setup: LS calls /setup before nearly every action, so a new
    connection, a promotion or a rollback done elsewhere is followed within a call or two.

    Works on a background thread after a short delay: LS's /setup timeout is 3 s, the connection being
    created is saved only after /setup answers, and a rename makes LS call /setup again. A project and
    version is followed once per process; a failure or a project without a Tessera connection yet is
    retried after RETRY_S."""

    DELAY_S = 2.0
    RETRY_S = 30.0

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._state: dict[str, tuple[str, float]] = {}     # project -> (version, retry after; inf = done)

    def notice(self, project: str, version: str, token: str = "") -> bool:
        """Called by /setup; returns whether a follow was started. Only towards LABEL_STUDIO_URL: the
        `hostname` a /setup body names is not trusted with requests (the token LS hands over in /setup is
        used when LABEL_STUDIO_API_KEY is not set)."""
        if not version.startswith(VERSION_PREFIX) or version.endswith("-untrained"):
            return False
        url = self.settings.label_studio_url
        api_key = self.settings.label_studio_api_key or token
        if not url or not api_key:
            return False
        now = time.monotonic()
        with self._lock:
            seen, retry_at = self._state.get(project, ("", 0.0))
            if seen == version and now < retry_at:
                return False
            self._state[project] = (version, now + self.RETRY_S)
        threading.Thread(target=self._follow, args=(project, version, url, api_key), daemon=True,
                         name=f"tessera-follow-{project}").start()
        return True

    def _follow(self, project: str, version: str, url: str, api_key: str) -> None:
        time.sleep(self.DELAY_S)
        try:
            ours = LSClient(self.settings, url=url, api_key=api_key, timeout=10).follow_version(project, version)
        except Exception as e:          # LS unreachable or refusing: log, retry after RETRY_S
            logger.warning("project %s: could not name the Label Studio connection %s: %s", project, version, e)
            return
        if ours:
            with self._lock:
                if self._state.get(project, ("",))[0] == version:
                    self._state[project] = (version, math.inf)

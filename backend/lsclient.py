"""Label Studio's REST API: label-studio-sdk's `LabelStudio` client, and the few calls it lacks or gets wrong.

Every Tessera part that talks to Label Studio (training runs, `tessera predict` and `generate`, the demo, the
tests and the benchmarks) uses the SDK client made by `connect`. Written here, measured against Label Studio
1.23.2 with label-studio-sdk 2.1.2:
- `connect`: errors come out as `LabelStudioUnavailable` / `NotFound` naming the call and status; no retries
  (a retried POST /api/predictions writes the prediction twice); redirects are not followed, so the key is
  only ever sent to the URL given; httpx's one INFO line per request is turned down to WARNING.
- `tasks`: the SDK's pager asks for one page past the end, and Label Studio logs an ERROR with a traceback
  ("Invalid page") for every listing; this one stops at the `total` the first page reports, and yields the
  tasks as Label Studio sent them (dicts with annotations and predictions), in pages sized by their bytes.
- `upload_images` / `upload_files`: the multipart import, absent from the SDK.
- `interactive`: the SDK's `ml.predict_interactive` drops the reply (`{"data": ...}`).
- `import_tasks` / `create_prediction`: the SDK encodes request bodies with its `jsonable_encoder`, ~10x slower
  than `json.dumps` on brush RLE (40 synthetic tasks: 1.35 s against 0.14 s on a loaded 2-core machine), and
  writing predictions runs on threads that share the GIL; these send the body as `json.dumps` made it.
- `download`: bytes of a `/data/upload/...` file (needs the key).
"""
from __future__ import annotations

import json
import logging
import math
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from tessera.backend.settings import Settings
from tessera.backend.store import VERSION_PREFIX
from tessera.backend.urls import path_prefix

logger = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)    # else one INFO line per request in every log


class LabelStudioUnavailable(ApiError, RuntimeError):
    """Label Studio cannot be reached or refuses a call; the message says which and what to set. An SDK
    ApiError too, so the SDK's own handling (its pager ends on a 404) still works."""

    def __init__(self, message: str, status: int = 0, body: str = ""):
        RuntimeError.__init__(self, message)
        ApiError.__init__(self, status_code=status or None, body=body)
        self.message, self.status = message, status

    def __str__(self) -> str:
        return self.message


class NotFound(LabelStudioUnavailable):
    """Label Studio answered 404: the project (or task) does not exist, or the key can't see it."""


class _Transport(httpx.HTTPTransport):
    """Connection failures -> LabelStudioUnavailable naming Label Studio's URL. `prefix`: the path Label Studio
    is served at ("/ls" behind a proxy); label-studio-sdk 2.1.2 posts a personal token's exchange to
    urljoin(base_url, "api/token/refresh/"), which drops that path, so the request is put back under it here."""

    def __init__(self, prefix: str = "", **kwargs: Any):
        super().__init__(**kwargs)
        self.prefix = prefix

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.prefix and request.url.path == "/api/token/refresh/":
            request.url = request.url.copy_with(path=self.prefix + request.url.path)
        try:
            return super().handle_request(request)
        except httpx.TransportError as e:
            origin = f"{request.url.scheme}://{request.url.netloc.decode()}"
            why = type(e).__name__
            if "CERTIFICATE_VERIFY_FAILED" in str(e):
                why = "its TLS certificate is not trusted; give your CA as TESSERA_CA_BUNDLE (or SSL_CERT_FILE)"
            raise LabelStudioUnavailable(f"Label Studio at {origin} is unreachable: {why}") from e


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    response.read()
    req = response.request
    where = f"{req.method} {req.url.path}"
    if response.status_code == 404:
        raise NotFound(f"{where} -> HTTP 404 from Label Studio at {req.url.scheme}://{req.url.netloc.decode()}",
                       404, response.text)
    body = response.text
    if body.lstrip()[:15].lower().startswith(("<!doctype", "<html")):   # LS's 170 KB HTML error page
        body = f"<HTML page, {len(body)} bytes>"
    raise LabelStudioUnavailable(f"{where} -> HTTP {response.status_code}: {body[:300]}", response.status_code,
                                 response.text)


def connect(url: str, api_key: str, timeout: float = 60.0, ca_bundle: Path | None = None) -> LabelStudio:
    """The SDK client for Label Studio at `url` with `api_key` (a legacy token, or a personal access token,
    which the SDK exchanges for access tokens at `url`); HTTPS trusts `ca_bundle` (Settings.ca_bundle)."""
    if not url or not api_key:
        raise LabelStudioUnavailable("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (the access token from "
                                     "Account & Settings) so Tessera can read the project")
    verify = ssl.create_default_context(cafile=str(ca_bundle)) if ca_bundle else True
    transport = _Transport(prefix=path_prefix(url), verify=verify)
    http = httpx.Client(timeout=timeout, follow_redirects=False, transport=transport,
                        event_hooks={"response": [_raise_for_status]})
    return LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=timeout, max_retries=0,
                       httpx_client=http)


def from_settings(settings: Settings, timeout: float = 60.0) -> LabelStudio:
    """`connect` to LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY."""
    return connect(settings.label_studio_url, settings.label_studio_api_key, timeout, settings.ca_bundle)


def _request(ls: LabelStudio, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """A request through the SDK's own HTTP client (its base URL, auth headers and error hooks)."""
    return ls._client_wrapper.httpx_client.request(path.lstrip("/"), method=method, **kwargs)


def _json(response: httpx.Response) -> Any:
    return response.json() if response.content else None


# ------------------------------------------------------------------------------------------------- reads
# the Data Manager's filter for tasks with a submitted (not cancelled) annotation: Label Studio's own counter,
# kept by its annotation signals and by its imports (1.23.2); the tasks listed are still checked one by one
ANNOTATED = {"conjunction": "and", "items": [{"filter": "filter:tasks:total_annotations", "operator": "greater",
                                              "type": "Number", "value": 0}]}
PAGE_BYTES = 16 * 2**20     # JSON a task listing's page holds, about: parsed, a page is ~2-3x this in memory
FIRST_PAGE = 1              # tasks in a listing's first page, before their size is known


def tasks(ls: LabelStudio, project: int | str, only_annotated: bool = False, page_size: int = 100,
          query: str | None = None, page_bytes: int | None = None, listing: dict | None = None,
          fields: str = "all") -> Iterator[dict]:
    """Every task of the project with annotations and predictions, as Label Studio sent them, page by page,
    stopping at the `total` the first page reports (see the module docstring). `query`: the Data Manager's
    JSON query (filters, ordering), as the SDK's `tasks.list` takes it. `only_annotated`: Label Studio is asked
    for the tasks with an annotation alone (ANNOTATED, unless `query` has filters of its own): "Start
    training" on a project of thousands of predicted tasks and a few hundred annotated ones lists those.

    Pages hold about `page_bytes` of JSON (PAGE_BYTES if None; 0: `page_size` tasks each): a page is parsed whole,
    and a task's size ranges from a few hundred bytes to tens of MB (a 2048 px task with three versions'
    brush, polygon and box predictions of 374 objects is ~6.5 MB of JSON, ~20 MB parsed): a page of 100 held 2 GB.
    The first page holds FIRST_PAGE task; each next one as many as the last page's bytes per task allow, at
    most `page_size`, and a divisor of the tasks read so far (Label Studio's pages are numbered, so a page of
    k tasks starts at a multiple of k): pages of light tasks double up to `page_size` (1,000 tasks in 22
    requests instead of 10), and a run of heavy tasks after light ones costs one large page before they shrink.
    `listing`, a dict, is filled with the "total" and the page "sizes". `fields="task_only"`: the tasks without
    their annotations, predictions and drafts (their counters, e.g. total_predictions, stay)."""
    seen, total = 0, None
    page_bytes = PAGE_BYTES if page_bytes is None else page_bytes
    size = min(page_size, FIRST_PAGE) if page_bytes else page_size
    listing = {} if listing is None else listing
    listing["sizes"] = []
    if only_annotated:
        q = json.loads(query) if query else {}
        query = json.dumps({"filters": ANNOTATED, **q})
    params = {"project": int(project), "fields": fields, **({"query": query} if query else {})}
    while total is None or seen < total:
        response = _request(ls, "GET", "api/tasks/", params={**params, "page_size": size, "page": seen // size + 1})
        n_bytes, out = len(response.content), _json(response) or {}
        del response
        batch = out.pop("tasks", None) or []
        total = listing["total"] = int(out.get("total") or 0)
        listing["sizes"].append(size)
        seen += len(batch)
        if not batch:
            break
        want = page_bytes * len(batch) // max(n_bytes, 1) if page_bytes else page_size
        want = max(1, min(page_size, want))
        size = next(k for k in range(want, 0, -1) if seen % k == 0)      # the next page starts at task `seen`
        batch.reverse()                     # handed out one by one: the page shrinks as its tasks are taken
        while batch:
            task = batch.pop()
            if not only_annotated or task.get("annotations"):
                yield task
            del task


def health(ls: LabelStudio) -> dict:
    """Label Studio's /health ({"status": "UP"}), no key needed."""
    return _json(_request(ls, "GET", "health")) or {}


def whoami(ls: LabelStudio) -> dict:
    """The user the key belongs to; LabelStudioUnavailable (401) when Label Studio refuses the key."""
    return _json(_request(ls, "GET", "api/current-user/whoami")) or {}


def project(ls: LabelStudio, project_id: int | str) -> Any:
    """The project (the SDK's model), with a NotFound that says which project and what to check."""
    try:
        return ls.projects.get(int(project_id))
    except NotFound as e:
        raise NotFound(f"project {project_id} not found in Label Studio (or the key LABEL_STUDIO_API_KEY "
                       f"can't see it): {e}", 404) from None


def download(ls: LabelStudio, path: str) -> bytes:
    """Bytes of a file Label Studio serves, e.g. `/data/upload/1/abc.png` (the key is needed)."""
    return _request(ls, "GET", path).content


def interactive(ls: LabelStudio, ml_id: int, task: int, context: dict | None, timeout: float = 150.0) -> Any:
    """Interactive pre-annotation: LS calls the backend's /predict for one task with params.context and
    stores nothing; returns LS's reply `{"data": <first result>}`."""
    return _json(_request(ls, "POST", f"api/ml/{int(ml_id)}/interactive-annotating",
                          json={"task": int(task), "context": context}, request_options={"timeout_in_seconds": timeout}))


def _post_json(ls: LabelStudio, path: str, body: Any, **kwargs: Any) -> Any:
    return _json(_request(ls, "POST", path, content=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json"}, **kwargs))


# ------------------------------------------------------------------------------------------------ writes
def import_tasks(ls: LabelStudio, project_id: int | str, tasks: list[dict]) -> list[int]:
    """Tasks (data, meta, predictions) created in one JSON import (one transaction) -> their ids, in order."""
    out = _post_json(ls, f"api/projects/{int(project_id)}/import", tasks, params={"return_task_ids": "true"},
                     request_options={"timeout_in_seconds": 120}) or {}
    ids = out.get("task_ids") or []
    if len(ids) != len(tasks):
        raise LabelStudioUnavailable(f"imported {len(tasks)} tasks, Label Studio reported {len(ids)}")
    return ids


def task_predictions(ls: LabelStudio, task: int) -> list[dict]:
    """The task's predictions (GET /api/predictions/?task=): unlike GET /api/tasks/{id}, which asks the project's
    ML backend for a prediction when the task has none of its version."""
    return _json(_request(ls, "GET", "api/predictions/", params={"task": int(task)})) or []


def create_prediction(ls: LabelStudio, task: int, result: list[dict], score: float, model_version: str,
                      mislabeling: float | None = None) -> dict:
    """POST /api/predictions/ (what `ls.predictions.create` does, with the body encoded by json.dumps)."""
    body = {"task": int(task), "result": result, "score": float(score), "model_version": model_version}
    if mislabeling is not None:
        body["mislabeling"] = float(mislabeling)
    return _post_json(ls, "api/predictions/", body)


# ------------------------------------------------------------------------------------------------ uploads
def _multipart(images: list[tuple[str, bytes]]) -> dict:
    # each file gets its own field name: Label Studio keeps only the last of same-named parts
    return {f"file{i}": (name, data, "image/png" if name.endswith(".png") else "application/octet-stream")
            for i, (name, data) in enumerate(images)}


def upload_images(ls: LabelStudio, project_id: int | str, images: list[tuple[str, bytes]]) -> list[int]:
    """Image files -> one new task each (one multipart request); returns the task ids in upload order."""
    if not images:
        raise ValueError("upload_images: no files")
    out = _json(_request(ls, "POST", f"api/projects/{int(project_id)}/import", files=_multipart(images),
                         params={"return_task_ids": "true"},
                         request_options={"timeout_in_seconds": 120})) or {}
    ids = out.get("task_ids") or []
    if len(ids) != len(images):
        raise LabelStudioUnavailable(f"uploaded {len(images)} images, Label Studio reported {len(ids)} tasks")
    return ids


def upload_files(ls: LabelStudio, project_id: int | str, images: list[tuple[str, bytes]]) -> list[str]:
    """Image files uploaded without creating tasks (one multipart request) -> their /data/upload/... URLs,
    in order, for a JSON import of tasks with predictions (`ls.projects.import_tasks`)."""
    pid = int(project_id)
    out = _json(_request(ls, "POST", f"api/projects/{pid}/import", files=_multipart(images),
                         params={"commit_to_project": "false"},
                         request_options={"timeout_in_seconds": 120})) or {}
    ids = out.get("file_upload_ids") or []
    uploads = _json(_request(ls, "GET", f"api/projects/{pid}/file-uploads", params={"ids": json.dumps(ids)})) or []
    by_name = {}
    at = path_prefix(ls._client_wrapper.get_base_url())     # "/ls/data/upload/...", as LS names its own there
    for u in uploads:  # LS stores "upload/<project>/<random>-<name>": match on the (unique) name we sent
        path = str(u.get("file", ""))
        by_name[path.rsplit("/", 1)[-1].split("-", 1)[-1]] = f"{at}/data/" + path.lstrip("/")
    urls = [by_name.get(name) for name, _ in images]
    if len(ids) != len(images) or None in urls:
        raise LabelStudioUnavailable(f"uploaded {len(images)} images, Label Studio listed {len(by_name)} of them")
    return urls


# --------------------------------------------------------------------------------- the connection's name
def follow_version(ls: LabelStudio, project_id: int | str, version: str) -> list[int]:
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
    pid = int(project_id)
    ours, old_titles = [], set()
    for ml in ls.ml.list(project=pid):
        if not any(str(v or "").startswith(VERSION_PREFIX) for v in (ml.title, ml.model_version)):
            continue
        ours.append(int(ml.id))
        if ml.title == version:
            continue
        old_titles.add(ml.title or "")
        extra = {}
        if ml.auth_method == "BASIC_AUTH":        # an empty password keeps the stored one
            extra = {"auth_method": "BASIC_AUTH", "basic_auth_user": ml.basic_auth_user or "", "basic_auth_pass": ""}
        ls.ml.update(int(ml.id), url=ml.url, project=pid, title=version, **extra)   # LS needs url and project
    if not ours:
        return []
    current = project(ls, pid).model_version or ""
    if current != version and (not current or current in old_titles or current.startswith(VERSION_PREFIX)):
        # LS moves it with the title, except when the title changed before LS first set it (a race
        # with the connection being created)
        ls.projects.update(pid, model_version=version)
    if old_titles:
        logger.info("project %s: Label Studio connection(s) %s now named %s", project_id, ours, version)
    return ours


class VersionFollower:
    """Keeps each project's Tessera connection in Label Studio named after the served version
    (`follow_version`), driven by /setup: LS calls /setup before nearly every action, so a new
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
            ours = follow_version(connect(url, api_key, 10, self.settings.ca_bundle), project, version)
        except Exception as e:          # LS unreachable or refusing: log, retry after RETRY_S
            logger.warning("project %s: could not name the Label Studio connection %s: %s", project, version, e)
            return
        if ours:
            with self._lock:
                if self._state.get(project, ("",))[0] == version:
                    self._state[project] = (version, math.inf)

"""Label Studio REST client for training runs, `tessera predict` and `tessera generate`.

Reads go through label-studio-sdk (paginated task lists); the multipart upload of generated images uses
the same token over requests, because the SDK's import call takes JSON only.
"""
from __future__ import annotations

import io
import logging
from typing import Any, Iterator

import requests

from backend.settings import Settings

logger = logging.getLogger(__name__)


class LabelStudioUnavailable(RuntimeError):
    """Label Studio cannot be reached or refuses the token; the message says which and what to set."""


def _plain(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "dict"):
        return obj.dict()
    return obj


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
        self._sdk = None

    @property
    def sdk(self):
        if self._sdk is None:
            from label_studio_sdk.client import LabelStudio
            self._sdk = LabelStudio(base_url=self.url, api_key=self.api_key, timeout=self.timeout)
        return self._sdk

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:           # the SDK raises httpx/ApiError types; all mean "LS said no"
            status = getattr(e, "status_code", None)
            raise LabelStudioUnavailable(f"Label Studio at {self.url} failed to {what}"
                                         f"{f' (HTTP {status})' if status else ''}: {type(e).__name__}") from e

    def request(self, method: str, path: str, **kwargs) -> Any:
        try:
            r = self.http.request(method, f"{self.url}/{path.lstrip('/')}", timeout=self.timeout, **kwargs)
        except requests.RequestException as e:
            raise LabelStudioUnavailable(f"Label Studio at {self.url} is unreachable: {type(e).__name__}") from e
        if r.status_code >= 400:
            raise LabelStudioUnavailable(f"{method} {path} -> HTTP {r.status_code}: {r.text[:300]}")
        return r.json() if r.content else None

    # ------------------------------------------------------------------------------------------ reads
    def project(self, project: int | str) -> dict:
        return _plain(self._call("read the project", self.sdk.projects.get, id=int(project)))

    def tasks(self, project: int | str, only_annotated: bool = False) -> Iterator[dict]:
        pager = self._call("list tasks", self.sdk.tasks.list, project=int(project), fields="all",
                           only_annotated=only_annotated or None, page_size=100)
        try:
            for task in pager:
                yield _plain(task)
        except Exception as e:
            raise LabelStudioUnavailable(f"Label Studio at {self.url} failed while listing tasks: "
                                         f"{type(e).__name__}") from e

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

"""`tessera check --project N`: every step between Tessera and a project's images tried once, in order, each
with what to fix when it fails. Label Studio's own UI shows none of these failures (a task just has no
prediction), and each has its line in Tessera's log only after a "Retrieve predictions".

Steps: the Label Studio URL answers (TLS, proxy), the key is accepted (personal access token or legacy), the
project is visible, its label config is one Tessera serves, the first tasks' images load as /predict loads them
(uploads, local files, cloud storage through Label Studio's resolver), a model version serves it, and the
project is connected to a Tessera backend."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

from tessera.backend.label_config import LabelConfigError, parse_label_config
from tessera.backend.media import MediaError, MediaResolver, personal_token
from tessera.backend.settings import Settings

N_IMAGES = 3            # tasks whose images are fetched: the first ones Label Studio lists


@dataclass
class Step:
    name: str
    ok: bool
    detail: str


def check_project(settings: Settings, project: int, say: Callable[[Step], None] = lambda s: None) -> list[Step]:
    """The steps tried, in order, each passed to `say` as it is known; stops at the first step the rest need."""
    from tessera.backend import lsclient
    from tessera.backend.predictions import ModelCache
    from tessera.backend.store import version_string

    steps: list[Step] = []

    def step(name: str, ok: bool, detail: str) -> bool:
        steps.append(Step(name, ok, detail))
        say(steps[-1])
        return ok

    url, key = settings.label_studio_url, settings.label_studio_api_key
    if not step("Label Studio URL", bool(url), url or "not set: set LABEL_STUDIO_URL to Label Studio's address as "
                                                      "Tessera reaches it (in Docker, http://label-studio:8080)"):
        return steps
    if not step("key", bool(key), ("a personal access token" if personal_token(key) else "a legacy token") if key
                else "not set: set LABEL_STUDIO_API_KEY to an access token (Account & Settings)"):
        return steps
    ls = lsclient.connect(url, key, timeout=30, ca_bundle=settings.ca_bundle)
    try:
        health = lsclient.health(ls)
        reached = step("Label Studio answers", health.get("status") == "UP", f"{url}/health: {health.get('status')}")
    except lsclient.LabelStudioUnavailable as e:
        reached = step("Label Studio answers", False, str(e))
    if not reached:
        return steps
    try:
        user = lsclient.whoami(ls)
        step("key accepted", True, f"as {user.get('email') or user.get('username') or 'user ' + str(user.get('id'))}")
    except lsclient.LabelStudioUnavailable as e:
        hint = ("revoked or expired, or personal access tokens are off for the organization" if personal_token(key)
                else "legacy tokens are off for the organization (Label Studio 1.23's default): use a personal "
                     "access token, or turn legacy tokens on (Organization > Access token settings)")
        step("key accepted", False, f"{e}: {hint}")
        return steps
    try:
        proj = lsclient.project(ls, project)
    except lsclient.LabelStudioUnavailable as e:
        step("project", False, str(e))
        return steps
    step("project", True, f"{project}: {proj.title!r}, {proj.task_number or 0} tasks, "
                          f"{proj.num_tasks_with_annotations or 0} annotated")
    try:
        config = parse_label_config(proj.label_config or "")
    except LabelConfigError as e:
        step("label config", False, str(e))
        return steps
    step("label config", True, ", ".join(
        f"{c.type} {c.from_name!r}{f' (labels of {c.labels_from!r})' if c.labels_from else ''} -> {c.to_name!r}"
        for c in config.controls))

    from tessera.backend.predictions import task_image

    media = MediaResolver(settings)
    first = list(itertools.islice(lsclient.tasks(ls, project, fields="task_only", page_bytes=0,
                                                 page_size=N_IMAGES), N_IMAGES))
    if not first:
        step("images", True, "the project has no task yet")
    for task in first:
        for img in config.images:
            got = task_image(task, img, media, working=True)
            if isinstance(got, MediaError):
                step("images", False, f"task {task.get('id')} <Image name={img.name!r}>: {got}")
            else:
                h, w = got[1]
                step("images", True, f"task {task.get('id')} <Image name={img.name!r}>: {w}x{h}")

    src = ModelCache(settings).source(str(project), config)
    if src is None:
        step("model", True, f"none serves it yet: the first version trains after {settings.min_annotations} "
                            "annotated tasks (\"Start training\", or tessera train --project), or give every "
                            "project a default one with tessera train --data")
    else:
        step("model", True, f"{version_string(src[0], src[2].version)} serves it")
    backends = [b for b in ls.ml.list(project=project)]
    step("connected", bool(backends), "; ".join(f"{b.url} ({b.state})" for b in backends) or
         "no model is connected: project > Settings > Model > Connect model, URL http://<tessera host>:9090")
    return steps

"""The label-studio-ml model class: parse the request, call the served predictor, convert, reply."""
from __future__ import annotations

import logging

from label_studio_ml.model import LabelStudioMLBase

from backend.label_config import LabelConfig, parse_label_config
from backend.media import MediaResolver
from backend.service import ModelCache, predict_tasks
from backend.store import project_key
from backend.settings import Settings

logger = logging.getLogger(__name__)

# label-studio-ml 1.0.9 leaves START_TRAINING out, so LS's "Start training" button never reaches fit()
TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")


class TesseraModel(LabelStudioMLBase):
    """One request's view of a project: cheap to build (weights live in the per-process ModelCache)."""

    def __init__(self, label_config: str | None = None, train_output: dict | None = None, *,
                 settings: Settings, cache: ModelCache, project: str = "", **kwargs):
        super().__init__(label_config=label_config, train_output=train_output, **kwargs)
        self.settings = settings
        self.cache = cache
        self.project = project_key(project) if project else ""
        self.config: LabelConfig | None = parse_label_config(label_config) if label_config else None

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict]:
        """LS tasks -> one prediction item per task, same order; items carry the served model_version."""
        if self.config is None:
            raise ValueError("no label config: send label_config with /predict or call /setup first")
        served = self.cache.served(self.project, self.config)
        media = MediaResolver(self.settings, ls_url=self.hostname, token=self.access_token)
        return predict_tasks(tasks, self.config, served, media, self.settings, context=context)

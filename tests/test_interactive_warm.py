"""Smart-tool latency as a labeller lives it: Label Studio asks /predict for one task when the task is opened;
Tessera then warms refine()'s passes for that task's image in the background, so the first hint finds them."""
import base64
import io

import numpy as np
import torch
from PIL import Image

from tessera.backend.label_config import parse_label_config
from tessera.backend.media import MediaResolver
from tessera.backend.predictions import _WARMER, Served, interactive, predict_tasks
from tessera.backend.settings import Settings
from tessera.model.inference import Predictor
from tessera.model.vqvae import VQVAE, VQVAEConfig
from tests.conftest import CONFIG_ALL


def _image_uri(seed: int) -> str:
    rng = np.random.default_rng(seed)
    arr = np.full((96, 128, 3), 20, np.uint8)
    for _ in range(6):
        y, x = rng.integers(15, 80), rng.integers(15, 110)
        arr[y - 8:y + 8, x - 8:x + 8] = 220
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _served(monkeypatch) -> tuple[Served, list]:
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(resolution=128, n_labels=3, widths=(8, 8, 8, 8), codebook_size=16, embed_dim=8))
    predictor = Predictor(model, ["Nucleus"], version="v1", device="cpu", bf16=False, scale=1.0)
    calls, forward = [], predictor._forward
    monkeypatch.setattr(predictor, "_forward", lambda x: calls.append(tuple(x.shape)) or forward(x))
    return Served("tessera-test-v1", predictor), calls


def _click(uri: str) -> dict:
    return {"result": [{"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True,
                        "original_width": 128, "original_height": 96,
                        "value": {"x": 50.0, "y": 50.0, "keypointlabels": ["Nucleus"]}}]}


def test_opening_a_task_warms_its_first_hint(tmp_path, monkeypatch):
    settings = Settings(model_dir=tmp_path)
    config = parse_label_config(CONFIG_ALL)
    served, calls = _served(monkeypatch)
    media = MediaResolver(settings)
    task = {"id": 1, "data": {"image": _image_uri(0)}}
    items = predict_tasks([task], config, served, media, settings)     # the task-open /predict
    assert len(items) == 1 and items[0]["model_version"] == served.version
    assert _WARMER.wait(60)
    n = len(calls)
    reply = interactive(task, config, served, media, _click(task["data"]["image"]))
    assert len(calls) == n, "the first hint after the task's /predict ran a network pass"
    cold, cold_calls = _served(monkeypatch)                            # the same answer as a cold first hint
    assert interactive(task, config, cold, media, _click(task["data"]["image"])) == reply and cold_calls


def test_bulk_predictions_do_not_warm_and_a_failing_warm_never_breaks_predict(tmp_path, monkeypatch):
    settings = Settings(model_dir=tmp_path)
    config = parse_label_config(CONFIG_ALL)
    served, calls = _served(monkeypatch)
    media = MediaResolver(settings)
    tasks = [{"id": i, "data": {"image": _image_uri(i)}} for i in range(3)]
    predict_tasks(tasks, config, served, media, settings)               # "Retrieve predictions": no warm-up
    assert _WARMER.wait(60) and len(served.predictor._views) == 0

    def broken(image):
        raise RuntimeError("warm-up failed")

    monkeypatch.setattr(served.predictor, "warm", broken)
    items = predict_tasks(tasks[:1], config, served, media, settings)
    assert _WARMER.wait(60) and len(items) == 1 and items[0]["model_version"] == served.version

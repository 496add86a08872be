"""/predict streams: chunks of predict_batch tasks, downloads a bounded distance ahead of inference."""
import threading

import numpy as np

from tessera.backend.label_config import parse_label_config
from tessera.backend.media import MediaError
from tessera.backend.predictions import Served, predict_tasks
from tessera.backend.settings import Settings
from tests.conftest import CONFIG_ALL, ThresholdPredictor


class CountingMedia:
    """Decodes 'blob:<n>' into an image with a bright square; counts decodes; 'bad' raises."""

    def __init__(self):
        self.loaded = 0
        self.lock = threading.Lock()

    def load_image(self, ref, task_id=None):
        if ref == "bad":
            raise MediaError("bad image reference")
        img = np.zeros((40, 50, 3), np.uint8)
        img[5:20, 10:30] = 255
        with self.lock:
            self.loaded += 1
        return img

    def load_working(self, ref, task_id=None):
        img = self.load_image(ref)
        return img, img.shape[:2]


class RecordingPredictor(ThresholdPredictor):
    def __init__(self, media):
        super().__init__()
        self.media, self.loaded_at_call = media, []

    def predict(self, images):
        self.loaded_at_call.append(self.media.loaded)
        return super().predict(images)


def test_predict_streams_in_bounded_chunks(tmp_path):
    media = CountingMedia()
    pred = RecordingPredictor(media)
    settings = Settings(model_dir=tmp_path, predict_batch=4, fetch_threads=4)
    tasks = [{"id": i, "data": {"image": "bad" if i == 13 else f"blob:{i}"}} for i in range(40)]
    out = predict_tasks(tasks, parse_label_config(CONFIG_ALL), Served("v1", pred), media, settings)
    assert len(out) == 40
    assert out[13]["result"] == [] and out[13]["score"] == 0.0          # a bad task never fails its chunk
    assert all(o["result"] for i, o in enumerate(out) if i != 13)
    assert sorted(pred.calls) == [3] + [4] * 9                         # one inference batch per chunk
    # inference n starts when at most chunks 0 .. n+3 were fetched (n+1 .. n+3 ahead): memory is bounded
    for n, loaded in enumerate(pred.loaded_at_call):
        assert loaded <= 4 * (n + 4), (n, loaded)
    assert pred.loaded_at_call[0] < 39                                 # first inference did not wait for all

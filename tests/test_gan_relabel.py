"""model.data.relabel's counting path (what edits and layout augmentation call per image) renumbers exactly as
the np.unique definition does."""
import numpy as np
import pytest

from tessera.model.data import relabel


def _by_unique(instances, min_area=1):
    ids, inverse, counts = np.unique(instances, return_inverse=True, return_counts=True)
    keep = (ids > 0) & (counts >= min_area)
    new = np.zeros(len(ids), np.int32)
    new[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new[inverse].reshape(instances.shape)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.uint8])
@pytest.mark.parametrize("min_area", [1, 30])
def test_relabel_renumbers_as_unique_does(dtype, min_area):
    rng = np.random.default_rng(0)
    ids = rng.choice(np.arange(0, 250, 7), 12, replace=False)  # sparse ids, some small fragments
    instances = ids[rng.integers(0, 12, (64, 80))].astype(dtype)
    instances[:3, :3] = ids[0] + 1                              # a 9-pixel fragment
    got = relabel(instances, min_area)
    assert got.dtype == np.int32 and np.array_equal(got, _by_unique(instances, min_area))
    assert got.max() == len(np.unique(got)) - (0 in got)


def test_relabel_of_empty_negative_and_huge_ids():
    for instances in (np.zeros((0, 5), np.int32), np.array([[-3, 0, 5], [5, 2, -3]]),
                      np.array([[0, 2 ** 40, 7]], np.int64), np.zeros((4, 4), np.int32)):
        assert np.array_equal(relabel(instances), _by_unique(instances))

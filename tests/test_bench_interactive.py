"""bench.interactive's failure causes: why a smart-tool answer missed its object."""
import numpy as np

from bench.interactive import by_cause, failure


def test_failure_causes():
    inst = np.zeros((40, 60), np.int32)
    inst[10:20, 10:20], inst[10:20, 20:30], inst[25:35, 40:50] = 1, 2, 3   # 1 and 2 touch; 3 alone
    merged = (inst == 1) | (inst == 2)
    assert failure(merged, inst, 1)["cause"] == "merged" and failure(merged, inst, 1)["objects_in_mask"] == 2
    bleed = np.zeros_like(merged)
    bleed[5:25, 30:55] = True
    bleed |= inst == 3
    assert failure(bleed, inst, 3)["cause"] == "bleed"
    assert failure((inst == 2) | (np.arange(60) == 12)[None] & (inst == 1), inst, 1)["cause"] == "wrong_object"
    piece = np.zeros_like(merged)
    piece[10:13, 10:20] = True
    assert failure(piece, inst, 1) == {"cause": "fragment", "object_px": 100, "mask_px": 30, "objects_in_mask": 1}
    assert failure(np.zeros_like(merged), inst, 1)["cause"] == "empty"
    counts = by_cause([failure(merged, inst, 1), failure(merged, inst, 2), failure(piece, inst, 1)])
    assert counts["merged"]["n"] == 2 and counts["merged"]["mask_px_median"] == 200
    assert counts["fragment"]["n"] == 1 and "bleed" not in counts

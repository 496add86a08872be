"""The progress-dict protocol of training runs, and its bridge to tqdm bars (CLI, demo).

A run reports `{"phase": str, "iter": int, "max_iters": int, "loss": float | None, "eta_s": float | None}`
to a `Progress` callable; the job runner stores the latest dict for /status.
"""
from __future__ import annotations

from typing import Callable

from tqdm import tqdm

Progress = Callable[[dict], None]


def noop(info: dict) -> None:
    pass


def phase(progress: Progress, name: str, done: int = 0, total: int = 0) -> None:
    """Report a step of a run without a loss (fetching, comparing, registering...)."""
    progress({"phase": name, "iter": done, "max_iters": total, "loss": None, "eta_s": None})


class TqdmProgress:
    """A Progress that draws one tqdm bar per phase (a new phase closes the previous bar)."""

    def __init__(self, desc: str = "", **tqdm_kwargs):
        self.desc, self.kwargs = desc, tqdm_kwargs
        self.bar: tqdm | None = None
        self.phase = None

    def __call__(self, info: dict) -> None:
        name = info.get("phase") or ""
        total = int(info.get("max_iters") or 0) or None
        if self.bar is None or name != self.phase:
            self.close()
            self.phase = name
            self.bar = tqdm(total=total, desc=f"{self.desc} {name}".strip(), **self.kwargs)
        if total and self.bar.total != total:
            self.bar.total = total
        if info.get("loss") is not None:
            self.bar.set_postfix(loss=f"{info['loss']:.4f}", refresh=False)
        n = int(info.get("iter") or 0)
        if n >= self.bar.n:
            self.bar.update(n - self.bar.n)      # redraws no more often than mininterval
        else:
            self.bar.n = n
        if name == "done":
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

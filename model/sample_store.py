"""Training samples past a memory budget, kept in memory-mapped scratch files.

A training run holds every sample (image + class and instance maps, 11 bytes a pixel: ~46 MB for a 2048 x 2048
image) for its whole length and draws random crops from all of them. A project of thousands of annotated
tasks at native size does not fit in a CPU box's memory, and a run that takes it all is killed by the kernel
with the server it runs in. Past `budget_bytes`, a sample's arrays are written to a file under `scratch` and
read back through a private memory map (mmap, ACCESS_COPY): the kernel's page cache holds what the run
touches and takes it back under memory pressure (re-reading a crop's rows from disk when it is drawn again),
instead of the run holding it as its own memory.

Each file is unlinked as soon as it is mapped: it takes disk space while a run holds its samples and none
after, however the run ends (kill -9 included). It is written with write(), not through the map, so a full
disk is an OSError here rather than a SIGBUS later. The map is copy-on-write: code that writes into a sample
changes its own copy, never the file.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np

from tessera.model.data import Sample

logger = logging.getLogger(__name__)

ALIGN = 64                      # each array starts at a multiple of this in its file (int32 views stay aligned)


def sample_bytes(sample: Sample) -> int:
    return sum(a.nbytes for a in (sample.image, sample.classes, sample.instances))


class SampleStore:
    """keep(sample) -> the sample as it is while the samples kept so far fit in `budget_bytes`, else the same
    sample with its arrays mapped from a scratch file. `budget_bytes` None: every sample stays in memory."""

    def __init__(self, scratch: Path, budget_bytes: int | None):
        self.scratch, self.budget = Path(scratch), budget_bytes
        self.held = self.mapped = 0             # bytes kept in memory / in mapped files
        self.n_mapped = 0

    def keep(self, sample: Sample) -> Sample:
        n = sample_bytes(sample)
        if self.budget is None or self.held + n <= self.budget:
            self.held += n
            return sample
        return self._mapped(sample)

    def _mapped(self, sample: Sample) -> Sample:
        arrays = [np.ascontiguousarray(a) for a in (sample.image, sample.classes, sample.instances)]
        self.scratch.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.scratch, prefix="sample-", suffix=".bin")
        try:
            offsets = []
            with os.fdopen(fd, "wb") as f:
                for a in arrays:
                    offsets.append(f.tell())
                    f.write(a.data)
                    f.write(b"\0" * (-f.tell() % ALIGN))
            try:
                with open(name, "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except OSError as e:    # no mapping for this file system: the sample stays in memory
                logger.warning("training samples can't be memory-mapped under %s (%s); kept in memory",
                               self.scratch, e)
                return sample
            # Tried: madvise(MADV_RANDOM). A crop's rows lie in one span of each array (~2.6 MB of a 2048 px
            # image's), which the kernel's read-around fetches in a few reads; page by page, a 3 GB memory
            # cgroup's batches from 4.2 GB of samples took 238 against 137 ms (bench/train_memory.py)
            views = [np.frombuffer(mapped, a.dtype, a.size, o).reshape(a.shape) for a, o in zip(arrays, offsets)]
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OSError(e.errno, f"no disk space left for training samples beyond TESSERA_TRAIN_MEMORY_MB "
                                       f"under {self.scratch} ({self.mapped / 2**30:.1f} GiB so far): free disk "
                                       "space there or raise TESSERA_TRAIN_MEMORY_MB") from e
            raise
        finally:
            os.unlink(name)
        self.mapped += sample_bytes(sample)
        self.n_mapped += 1
        image, classes, instances = views
        return dataclasses.replace(sample, image=image, classes=classes, instances=instances)

    def summary(self) -> dict:
        return {"samples_mapped": self.n_mapped, "mapped_mb": round(self.mapped / 2**20, 1),
                "in_memory_mb": round(self.held / 2**20, 1)}

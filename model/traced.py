"""A network pass as one TorchScript call per input shape, so that a pass takes the GIL once, not once per op.

The server encodes one chunk's regions (numpy, OpenCV, Python) on one thread while the next chunk's network
pass runs on another. An eager pass gives the GIL back at every torch op and must win it back after each
one: with the encoder thread busy in Python, CPython makes it wait up to the switch interval (5 ms) per op,
and a pass of a few hundred ops waits longer than it computes (issue 10: 1,000 Label Studio tasks took 241 s
against 121 s on one thread, stop 19). A traced and frozen module (torch.jit.trace, torch.jit.freeze) runs
its whole graph in C++ after one call. Its numbers are the eager pass's: the same ops on the same inputs,
recorded under the same autocast (tests/test_model_traced.py compares them bit for bit).

A trace is only valid for the shape it saw: branches on shapes in Python (the decoder's upsampling to its
skip's size) are recorded as taken. So a trace is kept per exact input shape, made the second time a shape
is seen (tracing costs about a second; a one-off shape, a lone image of odd size, stays eager), at most
`size` of them (least recently used dropped, ~10-20 MB each). A shape whose trace was dropped or failed stays
eager: a project whose images come in more recurring shapes than that would otherwise trace the same shapes
over and over.
"""
from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict

import torch
from torch import nn

logger = logging.getLogger(__name__)


class TracedPasses:
    """fn(x) for (B, C, H, W) tensors, through a traced copy of `module` once x's shape recurs."""

    def __init__(self, module: nn.Module, after: int = 2, size: int = 4):
        self.module = module.eval()
        self.after, self.size = after, size
        self._traces: OrderedDict = OrderedDict()       # shape -> traced module, or None when tracing failed
        self._seen: dict = {}                           # shape -> passes so far (bounded, see _count)
        self._dropped: set = set()                      # shapes whose trace was dropped: eager from now on
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor):
        key = (tuple(x.shape), x.dtype, x.device.type)
        with self._lock:
            if key in self._traces:
                self._traces.move_to_end(key)
                fn = self._traces[key]
                trace = False
            else:
                fn, trace = None, self._count(key) >= self.after and key not in self._dropped
        if trace:                                       # (two threads at once may both trace it: the last is kept)
            fn = self._trace(key, x)
        return fn(x) if fn is not None else self.module(x)

    def _count(self, key) -> int:
        if len(self._seen) > 1024:                      # a project of a thousand shapes: start counting again
            self._seen.clear()
        self._seen[key] = self._seen.get(key, 0) + 1
        return self._seen[key]

    def _trace(self, key, x: torch.Tensor):
        try:
            # tracing records a graph: outside inference mode, on a plain copy of the input
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                # "might not generalize to other inputs": shape branches, which is why a trace serves one shape
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                fn = torch.jit.freeze(torch.jit.trace(self.module, x.clone(), check_trace=False))
        except Exception:                               # eager still answers: the trace is only a speed-up
            logger.exception("tracing the network pass for input %s failed; it stays eager", key[0])
            fn = None
        with self._lock:
            self._traces[key] = fn
            self._traces.move_to_end(key)
            while len(self._traces) > self.size:
                self._dropped.add(self._traces.popitem(last=False)[0])
        return fn

    def __len__(self) -> int:
        return sum(1 for fn in self._traces.values() if fn is not None)

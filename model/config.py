"""`--key=value` command-line overrides of the frozen config dataclasses (TrainConfig, GANTrainConfig).

minGPT's configurator without `exec`: only existing fields, each value parsed as the type of its default.
"""
from __future__ import annotations

import dataclasses
from typing import TypeVar

T = TypeVar("T")
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def from_args(cls: type[T], argv: list[str]) -> T:
    """cls with the fields named in `argv` ("--max_iters=7", "--flips=false", "--widths=8,16") overridden."""
    names = [f.name for f in dataclasses.fields(cls)]
    kw = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"expected --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        if key not in names:
            raise ValueError(f"unknown {cls.__name__} field {key!r}; valid: {', '.join(names)}")
        kw[key] = _parse(value, getattr(cls, key), key)
    return cls(**kw)


def _parse(value: str, default, key: str):
    try:
        if isinstance(default, bool):
            if value.lower() not in TRUE + FALSE:
                raise ValueError(value)
            return value.lower() in TRUE
        if isinstance(default, tuple):
            return tuple(type(default[0])(v) for v in value.split(","))
        return type(default)(value)
    except ValueError:
        raise ValueError(f"--{key}={value!r}: expected a value like {default!r}"
                         f"{' (true/false/1/0/yes/no)' if isinstance(default, bool) else ''}") from None

"""Editing methods, registered by name.

A method is one module: a frozen config dataclass and a function

    compute(model, tok, facts, config, *, objective="insert", progress=True, history=None)
        -> MethodOutput

that returns the weight update *without* changing the model. ``history`` maps a module name
to the keys (m, d_in) of the edits already applied there (see ``Workspace.history``);
methods that protect earlier edits (AlphaEdit) use it. Register it where it is
defined with :func:`register`; look it up with :func:`get`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edit.errors import EditError
from edit.update import Update


@dataclass
class MethodOutput:
    update: Update
    layers: list[int]
    info: dict[str, Any] = field(default_factory=dict)  # losses, steps, timings


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type
    compute: Callable[..., MethodOutput]
    # edits many facts in one call, spread over several layers (a config may also take a
    # batch: ``takes_batches``, ROME's neuron write)
    batch: bool = False


_REGISTRY: dict[str, Method] = {}


def register(name: str, config_class: type, *, batch: bool = False):
    def wrap(fn: Callable[..., MethodOutput]) -> Callable[..., MethodOutput]:
        _REGISTRY[name] = Method(name, config_class, fn, batch)
        return fn

    return wrap


def get(name: str) -> Method:
    _import_builtin()
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise EditError(f"unknown method {name!r}: choose one of {known}") from None


def names() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def _import_builtin() -> None:
    from edit.methods import alphaedit, memit, rome  # noqa: F401  (register on import)

"""Method hyper-parameters: YAML files in ``configs/<method>/``, then explicit overrides.

Lookup order for a model: ``<method>/<model name>.yaml`` (the name lower-cased, e.g.
``smollm2-135m-instruct.yaml``; a GGUF file's name up to its first dot), then
``<method>/<model_type>.yaml``, then the config dataclass defaults. Keyword overrides
(``layer=6``) win over the file.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import types
import typing
from importlib.resources import files
from pathlib import Path

import yaml
from torch import nn

from edit import arch as arch_table
from edit.errors import EditError, InvalidRequest

log = logging.getLogger(__name__)


def config_file(method: str, model: nn.Module) -> tuple[str, dict] | None:
    """The (file name, values) of the tuned config that applies to ``model``, if any."""
    source = str(getattr(model, "edit_source", "") or getattr(model, "name_or_path", ""))
    return _tuned(method, source, model.config.model_type)


def source_config_file(method: str, source: str) -> tuple[str, dict] | None:
    """:func:`config_file` for the model ``source`` names, before it is loaded: by its name,
    then by its model type where its config is on this machine."""
    from edit.models import model_type

    return _tuned(method, source, None) or _tuned(method, source, model_type(source))


def _tuned(method: str, source: str, model_type: str | None) -> tuple[str, dict] | None:
    root = files("edit.configs") / method
    name = Path(source.rstrip("/")).name.lower()
    # "SmolLM2-135M-Instruct.Q4_1.gguf" is tuned like "smollm2-135m-instruct"
    for stem in (name, name.split(".")[0], model_type):
        f = root / f"{stem}.yaml"
        if stem and f.is_file():
            return f"{method}/{stem}.yaml", yaml.safe_load(f.read_text()) or {}
    return None


@functools.cache
def _announce(name: str) -> None:
    """Say once per process which tuned config is in use (edits in a loop resolve it often)."""
    log.info("using tuned config %s", name)


def resolve(method: str, config_class: type, model: nn.Module, /, **overrides):
    """A config instance: class defaults < tuned YAML for this model < ``overrides``. Every
    value is checked against the field's type, and the layers against the model, before the
    tuned config in use is announced."""
    values: dict = {}
    found = config_file(method, model)
    if found is not None:
        values.update(found[1])
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidRequest(
            f"unknown {method} setting(s) {', '.join(unknown)}: "
            f"known are {', '.join(sorted(known))}"
        )
    hints = typing.get_type_hints(config_class)
    values = {k: _typed(method, k, v, hints[k]) for k, v in values.items()}
    config = config_class(**values)
    _check_layers(config, model)
    if found is not None:
        _announce(found[0])
    return config


def check_settings(method: str, config_class: type, settings: dict) -> None:
    """Check explicit settings alone (types, then the config's own ranges) before a model is
    loaded; what needs the model (the tuned file, the layer count) :func:`resolve` checks."""
    hints = typing.get_type_hints(config_class)
    given = {k: v for k, v in settings.items() if k in hints and v is not None}
    config_class(**{k: _typed(method, k, v, hints[k]) for k, v in given.items()})


def _check_layers(config, model: nn.Module) -> None:
    layers = [getattr(config, "layer", None), *(getattr(config, "layers", None) or ())]
    layers = [x for x in layers if x is not None]
    if not layers:
        return
    try:
        n = arch_table.num_layers(model)
    except (EditError, AttributeError):  # not in the table: the method says so itself
        return
    bad = [x for x in layers if not 0 <= x < n]
    if bad:
        name = "layer" if getattr(config, "layer", None) is not None else "layers"
        raise InvalidRequest(f"{name} must be in 0..{n - 1} for this model, got {bad[0]}")


def _typed(method: str, key: str, value, hint):
    """``value`` as the field's type (YAML lists become tuples, ints floats), or a one-line
    error naming the setting and what it takes."""
    try:
        return _as_type(value, hint)
    except (TypeError, ValueError):
        raise InvalidRequest(
            f"{method} setting {key}={value!r}: expected {_describe(hint)}"
        ) from None


def _as_type(value, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _as_type(value, option)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if hint is typing.Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError
            return float(value)
        raise TypeError
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_as_type(v, args[0]) for v in value)
        if len(args) != len(value):
            raise ValueError
        return tuple(_as_type(v, a) for v, a in zip(value, args, strict=True))
    return value


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list [{', '.join(_describe(a) for a in args)}]"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def parse_settings(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` options as a dict, each value read as YAML (5, 1e-3, [q_proj])."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise EditError(f"--set {pair!r}: write KEY=VALUE, e.g. --set kl_weight=5")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise EditError(f"--set {pair!r}: the value does not parse") from None
        if isinstance(parsed, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out

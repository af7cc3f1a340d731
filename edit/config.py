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
from importlib.resources import files
from pathlib import Path

import yaml
from torch import nn

from edit.errors import InvalidRequest

log = logging.getLogger(__name__)


def config_file(method: str, model: nn.Module) -> tuple[str, dict] | None:
    """The (file name, values) of the tuned config that applies to ``model``, if any."""
    root = files("edit.configs") / method
    source = str(getattr(model, "edit_source", "") or getattr(model, "name_or_path", ""))
    name = Path(source.rstrip("/")).name.lower()
    # "SmolLM2-135M-Instruct.Q4_1.gguf" is tuned like "smollm2-135m-instruct"
    candidates = [name, name.split(".")[0], model.config.model_type]
    for stem in candidates:
        f = root / f"{stem}.yaml"
        if stem and f.is_file():
            return f"{method}/{stem}.yaml", yaml.safe_load(f.read_text()) or {}
    return None


@functools.cache
def _announce(name: str) -> None:
    """Say once per process which tuned config is in use (edits in a loop resolve it often)."""
    log.info("using tuned config %s", name)


def resolve(method: str, config_class: type, model: nn.Module, /, **overrides):
    """A config instance: class defaults < tuned YAML for this model < ``overrides``."""
    values: dict = {}
    found = config_file(method, model)
    if found is not None:
        values.update(found[1])
        _announce(found[0])
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidRequest(
            f"unknown {method} setting(s) {', '.join(unknown)}: "
            f"known are {', '.join(sorted(known))}"
        )
    for f in dataclasses.fields(config_class):  # YAML gives lists where the dataclass has tuples
        if isinstance(values.get(f.name), list):
            values[f.name] = tuple(tuple(v) if isinstance(v, list) else v for v in values[f.name])
    return config_class(**values)

"""Which layer(s) to edit in a model, answered in one place for every method.

In order: the layer(s) a tuned config or the user gives; else the suggestion of this model's
cached causal trace (``edit trace --data known.json`` writes it, see
``edit.methods.locate``); else a fallback rule, with a warning that says how to get a
measured layer:

* ROME (one layer): n_layers // 6;
* MEMIT-style methods (several layers): five consecutive blocks from n_layers // 6.

This module only reads the trace cache; it imports nothing of the tracing code, so editing a
model never loads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from edit import arch as arch_table
from edit import cache
from edit.errors import InvalidRequest

log = logging.getLogger(__name__)

MEMIT_BLOCKS = 5  # layers edited by the fallback rule of the MEMIT-style methods


def trace_cache_path(model_hash: str | None) -> Path | None:
    """Where the averaged causal trace of a model (by weights hash) is kept; None without
    a hash."""
    return cache.path("traces", model_hash, "trace", ext="json")


def cached_layer(model: nn.Module) -> tuple[int, list[int], Path] | None:
    """(suggested layer, layer range, file) from this model's cached trace, if any."""
    model_hash = getattr(model, "edit_hash", None)
    path = trace_cache_path(model_hash)
    if path is None:
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    layer = d.get("peak_layer")
    if d.get("model_hash") != model_hash or not isinstance(layer, int):
        return None
    if not 0 <= layer < arch_table.num_layers(model):
        return None
    return layer, d.get("layer_range") or [layer, layer], path


def rome_layer(model: nn.Module, layer: int | None) -> int:
    """The one layer ROME edits: ``layer`` if given (no tuned config, no ``--layer``: None),
    else the peak layer of the cached trace, else n_layers // 6."""
    n_layers = arch_table.num_layers(model)
    traced = cached_layer(model) if layer is None else None
    if traced is not None:
        layer = traced[0]
        log.warning(
            "no tuned config: using layer %d from the causal trace of this model (cached at %s)",
            layer,
            traced[2],
        )
    elif layer is None:
        layer = n_layers // 6
        log.warning(
            "no tuned ROME config for this model: editing layer %d of %d (n_layers // 6); "
            "pass --layer, or run 'edit trace --data known.json' once to use a measured layer",
            layer,
            n_layers,
        )
    if layer >= n_layers:
        raise InvalidRequest(f"layer must be in 0..{n_layers - 1}, got {layer}")
    return layer


def memit_layers(model: nn.Module, layers: tuple[int, ...] | None, method: str) -> list[int]:
    """The layers a MEMIT-style ``method`` edits: the configured ones; without any, the
    range of this model's cached causal trace, else five blocks from n_layers // 6."""
    n = arch_table.num_layers(model)
    if layers is None:
        traced = cached_layer(model)
        if traced is not None:
            lo, hi = traced[1][0], traced[1][-1]
            layers = tuple(range(lo, hi + 1))
            log.warning(
                "no tuned %s config: editing layers %s from the causal trace of this model "
                "(cached at %s)",
                method,
                list(layers),
                traced[2],
            )
        else:
            start = n // 6
            layers = tuple(range(start, min(start + MEMIT_BLOCKS, n)))
            log.warning(
                "no tuned %s config for this model: editing layers %s; pass --layers, or run "
                "'edit trace --data known.json' once to use a measured range",
                method,
                list(layers),
            )
    if max(layers) >= n:
        raise InvalidRequest(f"layers must be in 0..{n - 1} for this model, got {list(layers)}")
    return [int(x) for x in layers]

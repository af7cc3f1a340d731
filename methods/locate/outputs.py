"""Where a causal trace goes: its numbers (JSON) and plots (PNG) in an output folder, and an
averaged trace into the model's trace cache, from which ``edit.layers`` picks the layers to
edit."""

from __future__ import annotations

import os
from pathlib import Path

from edit.atomic import write_json
from edit.layers import trace_cache_path
from edit.methods.locate.average import AverageTrace
from edit.methods.locate.plots import PlotsUnavailable, plot_average, plot_fact
from edit.methods.locate.single import FactTrace


def write_outputs(
    result: FactTrace | AverageTrace, out_dir: str | os.PathLike
) -> tuple[list[Path], str | None]:
    """The numbers (JSON) and plots (PNG) of a trace in ``out_dir``: the paths written, and
    why the plots are missing, if they are."""
    out = Path(out_dir)
    if isinstance(result, FactTrace):
        paths = [write_json(out / "trace.json", result.to_dict())]
        try:
            return paths + plot_fact(result, out), None
        except PlotsUnavailable as e:
            return paths, str(e)
    paths = [write_json(out / "average_trace.json", result.to_dict())]
    try:
        return paths + [plot_average(result, out / "average_trace.png")], None
    except PlotsUnavailable as e:
        return paths, str(e)


def save_cached(avg: AverageTrace) -> Path | None:
    """Keep ``avg`` as this model's trace (for layer choice); None when it cannot be keyed
    (a model not loaded by ``edit.load``) or suggests no layer."""
    if not avg.model_hash or avg.peak_layer is None:
        return None
    path = trace_cache_path(avg.model_hash)
    write_json(path, avg.to_dict())
    return path

"""Plots of a causal trace (matplotlib, optional): heat maps of one prompt's restorations,
and the average curves with the suggested layer range."""

from __future__ import annotations

import io
import os
from pathlib import Path

from edit.atomic import write_bytes
from edit.errors import EditError
from edit.methods.locate.average import AverageTrace
from edit.methods.locate.single import FactTrace


class PlotsUnavailable(EditError):
    """matplotlib is not installed."""


def _figure(**kw):
    try:
        from matplotlib.figure import Figure  # the Agg canvas: no display, no global state
    except ImportError:
        raise PlotsUnavailable(
            "plots need matplotlib: pip install 'edit[plots]' (the numbers are in the JSON)"
        ) from None
    return Figure(**kw)


def _save_figure(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes(path, buf.getvalue())
    return path


_TITLES = {"resid": "hidden state (block output)", "mlp": "MLP output", "attn": "attention output"}
_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}


def plot_fact(t: FactTrace, out_dir: str | os.PathLike) -> list[Path]:
    """One heat map per kind (tokens × layers, as in ROME's figures): ``trace_<kind>.png``."""
    paths = []
    labels = [
        repr(t.tokens[p]) + (" *" if t.subject_first <= p < t.subject_stop else "")
        for p in t.positions
    ]
    for kind in t.scores:
        eff = t.effect(kind).T.numpy()  # (positions, layers)
        fig = _figure(figsize=(1.2 + 0.22 * eff.shape[1], 1.2 + 0.3 * len(labels)))
        ax = fig.add_subplot()
        im = ax.imshow(eff, cmap=_CMAPS[kind], aspect="auto", vmin=min(0.0, float(eff.min())))
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("layer" + (f" (window {t.window} centred here)" if kind != "resid" else ""))
        ax.set_title(
            f"restoring the {_TITLES[kind]}\n{t.prompt!r} -> {t.target!r}; * = subject",
            fontsize=9,
        )
        fig.colorbar(im, ax=ax, label=f"P({t.target.strip()}) - P corrupted")
        paths.append(_save_figure(fig, Path(out_dir) / f"trace_{kind}.png"))
    return paths


def plot_average(avg: AverageTrace, path: str | os.PathLike) -> Path:
    """Average indirect effect per layer, one panel per kind, one line per token category;
    the suggested layer range shaded on the MLP panel."""
    fig = _figure(figsize=(4.2 * len(avg.kinds), 3.6), layout="constrained")
    for i, kind in enumerate(avg.kinds):
        ax = fig.add_subplot(1, len(avg.kinds), i + 1)
        for category in avg.categories:
            ax.plot(avg.curve(kind, category), marker=".", label=f"{category} token")
        if kind == "mlp" and avg.layer_range:
            ax.axvspan(avg.layer_range[0] - 0.4, avg.layer_range[1] + 0.4, alpha=0.15)
            ax.axvline(avg.peak_layer, ls=":", c="k")
        title = f"restoring the {_TITLES[kind]}"
        if kind == "mlp" and avg.layer_range:
            lo, hi = avg.layer_range
            title += f"\npeak layer {avg.peak_layer}, suggested {lo}-{hi} (shaded)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer" + (f" (window of {avg.window})" if kind != "resid" else ""))
        ax.axhline(0, c="0.7", lw=0.5)
        if i == 0:
            ax.set_ylabel("average indirect effect")
            ax.legend(fontsize=8)
    fig.suptitle(f"{avg.model}: {avg.n_facts} known facts, {avg.samples} noise samples each")
    return _save_figure(fig, Path(path))

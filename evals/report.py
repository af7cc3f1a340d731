"""What ``edit eval`` writes: the summary table, the result files and the plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from edit.atomic import new_folder
from edit.evals.metrics import DEFINITIONS

log = logging.getLogger(__name__)

SHARES = ("ES", "PS", "NS", "QS", "CS", "CG", "RS", "RN", "RO", "RL", "RE", "RU", "MHS",
          "zsRE_acc", "zsRE_gen", "zsRE_loc")  # fmt: skip
MARGINS = ("EM", "PM", "NM")


def summary_table(summary: dict) -> str:
    """A Markdown table: unedited and edited side by side (shares and margins in percent)."""
    keys = [
        k
        for k in (*SHARES, *MARGINS, "KL", "GE", "PPL")
        if k in summary["unedited"] or k in summary["edited"]
    ]
    head = "| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    lines = []
    for name in ("unedited", "edited"):
        vals = []
        for k in keys:
            v = summary[name].get(k)
            if v is None:
                vals.append("–")
            elif k in SHARES or k in MARGINS:
                vals.append(f"{100 * v:.1f}")
            elif k == "KL":
                vals.append(f"{v:.4f}")
            else:
                vals.append(f"{v:.2f}")
        label = "unedited" if name == "unedited" else f"{summary['method']} ({summary['mode']})"
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return head + "\n".join(lines) + "\n"


def write(out: Path, summary: dict, rows: list[dict]) -> None:
    """All files go to a temporary folder that is renamed into place at the end."""
    with new_folder(out) as tmp:
        with open(tmp / "records.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=_json_default) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
        cost = summary["cost"]
        spe = cost["seconds_per_edit"]
        md = [
            f"# {summary['method']} on {summary['data']} ({summary['records']} records, "
            f"mode {summary['mode']})",
            "",
            summary_table(summary),
            f"Edits refused: {summary['refused']}. "
            + _retried_line(summary.get("retried"))
            + _layer_round_line(summary.get("layer_round"))
            + "Seconds per edit: median "
            f"{_fmt(spe['median'])}, p90 {_fmt(spe['p90'])}. Key statistics: "
            f"{cost['statistics_seconds']} s. Peak memory: {cost['peak_memory_mb']} MB.",
            "",
            "Shares and margins in percent. Definitions:",
            "",
        ]
        md += [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
        md += ["", f"Fluency: {summary['protocol']['fluency']}."]
        (tmp / "summary.md").write_text("\n".join(md) + "\n")
        _plots(tmp, summary, rows)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.1f} s"


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _plots(folder: Path, summary: dict, rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    keys = [k for k in SHARES if k in summary["edited"]]
    fig, ax = plt.subplots(figsize=(1.2 * len(keys) + 2, 3.2))
    x = np.arange(len(keys))
    for off, name, color in ((-0.2, "unedited", "#999999"), (0.2, "edited", "#2b6cb0")):
        ax.bar(x + off, [100 * summary[name].get(k, 0) for k in keys], 0.4, label=name, color=color)
    ax.set_xticks(x, keys)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"{summary['method']} ({summary['mode']}), {summary['records']} records")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "scores.png", dpi=120)
    plt.close(fig)

    em_b = [r["before"].get("EM") for r in rows if r["after"] and r["before"].get("EM") is not None]
    em_a = [r["after"].get("EM") for r in rows if r["after"] and r["after"].get("EM") is not None]
    if em_a:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        bins = np.linspace(-1, 1, 41)
        ax.hist(em_b, bins=bins, alpha=0.6, label="unedited", color="#999999")
        ax.hist(em_a, bins=bins, alpha=0.6, label="edited", color="#2b6cb0")
        ax.set_xlabel("p(new) - p(true) on the edit prompt")
        ax.set_ylabel("records")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "margins.png", dpi=120)
        plt.close(fig)


def _layer_round_line(r: dict | None) -> str:
    if not r:
        return ""
    return (
        f"Layer round: {r['remade']} of {r['facts']} facts made again at the retry block, "
        f"{r['kept']} kept there; replies to the facts' own questions that state the edit: "
        f"{r['stating']} of {r['replies']}, {r['stating_kept']} after the round. "
    )


def _retried_line(r: dict | None) -> str:
    if not r or not r["rounds"]:
        return ""
    return (
        f"Facts that did not take, edited again: {r['facts']} in {r['rounds']} "
        f"round{'s' if r['rounds'] > 1 else ''}, "
        f"{r['took']} of them took. "
    )

"""Why an edit changes the chat reply to an unrelated question, and what a gated write does
about it: each MQuAKE case's first rewrite edited with ROME, then the same value δ written
four other ways, and the greedy chat replies read after each.

    .venv/bin/python benchmarks/chat_locality.py --start 0 --limit 20    # dev cases
    .venv/bin/python benchmarks/chat_locality.py --start 20 --limit 20 --out \
        benchmarks/results/chat_locality_20

Variants (the δ is ROME's, from ``edit.apply`` with the default config and ``write:
rank_one``, in every row):

* ``rome``: the rank-one update as ROME writes it, W' = W + δbᵀ; every token's key k adds
  δ·(bᵀk), a small share of δ on every unrelated token;
* ``rome x0.5``: the same update at half its size;
* ``neuron``: δ written into one existing neuron of the edited MLP, the least used on
  generic text (E[h²]·‖w_down‖²), gated on the subject: gate row s·r, up row r, down column
  δ/h̄, with r the least-rᵀΣr direction (Σ the MLP inputs' second moment) that reads 1 at
  the subject's rows (their weighted mean and the bare prompt, as ROME's ``prompt_key``).
  The neuron's output silu(s·r·x)·(r·x) is quadratic in r·x: a token with r·x = 0.05
  gets 0.1 % of δ where the rank-one update gives it 5 %. The neuron's old function is lost
  (its output at the subject is added back into δ);
* ``added``: the same gated neuron added beside the layer's neurons, nothing removed
  (``edit.neurons``, as ROME's ``write: neuron`` adds it);
* ``removed``: the least-used neuron's down column set to zero and nothing written: the cost
  of repurposing it.

Figures (share of edits, %): CS (teacher-forced chat score), and for the greedy chat reply
(48 tokens) to the case's MQuAKE question RS, RN, RL, RE (``edit.evals.metrics``), RU: the
reply to the next case's question (in a cycle) is unchanged. ``s`` is 3, set before the run,
not tuned. Writes ``benchmarks/results/chat_locality.*`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mquake" / "mquake_hard_429.json"
VARIANTS = ("rome", "rome x0.5", "neuron", "added", "removed")
FIGURES = ("CS", "RS", "RN", "RL", "RE", "RU")
GATE = 3.0  # s: the gate row's scale (silu(3) ≈ 2.86 at the subject)


class Layer:
    """The edited MLP: its input's second moment, the least-used neuron, and the inputs x
    it reads at given prompt rows."""

    def __init__(self, model, tok, module: str):
        import torch

        from edit.stats import second_moment

        self.model, self.tok = model, tok
        prefix = module.rsplit(".", 1)[0]  # "model.layers.4.mlp"
        self.mlp = model.get_submodule(prefix)
        self.gate_name, self.up_name, self.down_name = (
            f"{prefix}.{p}" for p in ("gate_proj", "up_proj", "down_proj")
        )
        self.cov_x = second_moment(model, tok, self.gate_name, progress=False)
        cov_k = second_moment(model, tok, self.down_name, progress=False)
        usage = cov_k.diagonal() * self.mlp.down_proj.weight.detach().norm(dim=0) ** 2
        self.unit = int(torch.argmin(usage))

    def inputs(self, rows):
        """(n, d) the MLP's input at each row's subject token."""
        import torch

        seen = {}
        hook = self.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        try:
            xs = []
            with torch.no_grad():
                for r in rows:
                    self.model(torch.tensor([r.ids]))
                    xs.append(seen["x"][0, r.lookup].float())
        finally:
            hook.remove()
        return torch.stack(xs)


def gated_neuron(layer: Layer, fact, res) -> dict:
    """δ of ``res`` as a neuron gated on the subject's rows (module docstring): r, the down
    column with nothing removed (``added``) and with the least-used neuron's old output at
    the subject added back (``neuron``), and r·x at each row."""
    import torch
    import torch.nn.functional as F

    from edit.methods.algebra import Contexts, rank_one_direction

    rows = Contexts.of(res.info["context_templates"], res.config).rows(layer.tok, fact)
    x = layer.inputs(rows)
    w = torch.tensor([r.weight for r in rows])
    x_mean = (w[:, None] * x).sum(0) / w.sum()
    x_prompt = layer.inputs(Contexts(("{}",)).rows(layer.tok, fact))[0]
    r = rank_one_direction(layer.cov_x, torch.stack([x_mean, x_prompt]))
    rho = x @ r
    h_bar = float((w * F.silu(GATE * rho) * rho).sum() / w.sum())
    mlp, n = layer.mlp, layer.unit
    g_old, u_old = mlp.gate_proj.weight[n].detach(), mlp.up_proj.weight[n].detach()
    h_old = float((w * F.silu(x @ g_old) * (x @ u_old)).sum() / w.sum())
    d_old = mlp.down_proj.weight[:, n].detach()
    delta = res.update.factors[layer.down_name][0][:, 0].float()
    return {
        "r": r,
        "added": delta / h_bar,
        "neuron": (delta + d_old * h_old) / h_bar,
        "rho": [round(float(v), 3) for v in rho],
    }


def repurposed(layer: Layer, r, down):
    """The update that turns the least-used neuron into the gated one: three rank-one
    changes (its gate row, up row and down column)."""
    import torch

    from edit.update import Update

    mlp, n = layer.mlp, layer.unit
    e = torch.zeros(mlp.gate_proj.weight.shape[0], 1)
    e[n] = 1
    return Update({
        layer.gate_name: (e, (GATE * r - mlp.gate_proj.weight[n].detach())[None]),
        layer.up_name: (e, (r - mlp.up_proj.weight[n].detach())[None]),
        layer.down_name: ((down - mlp.down_proj.weight[:, n].detach())[:, None], e.T),
    })  # fmt: skip


def removed(layer: Layer):
    """The least-used neuron's down column set to zero."""
    import torch

    from edit.update import Update

    e = torch.zeros(layer.mlp.gate_proj.weight.shape[0], 1)
    e[layer.unit] = 1
    return Update({layer.down_name: (-layer.mlp.down_proj.weight[:, layer.unit:layer.unit + 1]
                                     .detach().clone(), e.T)})  # fmt: skip


def added(layer: Layer, r, down):
    """The gated neuron added beside the layer's own (``edit.neurons``, as ROME's ``write:
    neuron`` adds it), with the benchmark's own down column."""
    from edit.update import Update

    mlp = layer.gate_name.rsplit(".", 1)[0]
    return Update(neurons={mlp: ((GATE * r)[None], r[None], down[:, None])})


def _figures(model, tok, case: dict, unrelated: str, unrelated_before: str | None) -> dict:
    """CS and the reply figures of the case's question; RU against ``unrelated_before`` (the
    unedited reply to ``unrelated``; None: not scored)."""
    from edit.evals import metrics as M
    from edit.evals.forms import asked_scores, chat_replies
    from edit.readers.records import mquake_names

    rw = case["requested_rewrite"][0]
    new, old = mquake_names(case)
    out = asked_scores(model, tok, [rw["question"]], rw["target_new"]["str"],
                       rw["target_true"]["str"], new[1:], forms=("CS",))  # fmt: skip
    reply, other = chat_replies(model, tok, [rw["question"], unrelated])
    out.update(M.reply_figures(reply, rw["subject"], new, old))
    if unrelated_before is not None:
        out["RU"] = float(other == unrelated_before)
    out["reply"], out["unrelated_reply"] = reply, other
    return out


def _case(model, tok, layer: Layer, case: dict, unrelated: str) -> dict:
    import edit
    from benchmarks.mquake_forms import rewrite_fact

    fact = rewrite_fact(case["requested_rewrite"][0])
    before = _figures(model, tok, case, unrelated, None)
    u0 = before["unrelated_reply"]
    out = {"fact": fact.statement, "unedited": before}
    res = edit.apply(model, tok, fact, method="rome", describe=False, progress=False,
                     write="rank_one")  # fmt: skip
    res.undo()
    gated = gated_neuron(layer, fact, res)
    out["rho"] = gated["rho"]
    writes = {
        "rome": lambda: res.update.apply(model),
        "rome x0.5": lambda: type(res.update)(
            {n: (a * 0.5, b) for n, (a, b) in res.update.factors.items()}
        ).apply(model),
        "neuron": lambda: repurposed(layer, gated["r"], gated["neuron"]).apply(model),
        "added": lambda: added(layer, gated["r"], gated["added"]).apply(model),
        "removed": lambda: removed(layer).apply(model),
    }
    for name in VARIANTS:
        handle = writes[name]()
        out[name] = _figures(model, tok, case, unrelated, u0)
        handle.undo()
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import edit
    from benchmarks.recording import write_results
    from edit import arch as arch_table
    from edit.config import resolve
    from edit.layers import rome_layer
    from edit.methods.rome import ROMEConfig

    model, tok = edit.load()
    config = resolve("rome", ROMEConfig, model)
    module = arch_table.lookup(model).mlp_out_name(rome_layer(model, config.layer))
    layer = Layer(model, tok, module)
    cases = json.loads(Path(args.data).read_text())[args.start : args.start + args.limit]
    rows = []
    for i, case in enumerate(cases):
        unrelated = cases[(i + 1) % len(cases)]["requested_rewrite"][0]["question"]
        rows.append(_case(model, tok, layer, case, unrelated))
        print(f"[{i + 1}/{len(cases)}] {rows[-1]['fact']!r}: " + " | ".join(
            f"{v} RE {rows[-1][v]['RE']:.0f} RU {rows[-1][v]['RU']:.0f}" for v in VARIANTS),
            flush=True)  # fmt: skip
    summary = {
        "records": len(rows),
        "start": args.start,
        "module": module,
        "unit": layer.unit,
        "gate": GATE,
        **{
            v: {k: 100 * float(np.mean([r[v][k] for r in rows])) for k in FIGURES} for v in VARIANTS
        },  # fmt: skip
        "unedited": {
            k: 100 * float(np.mean([r["unedited"][k] for r in rows])) for k in FIGURES if k != "RU"
        },  # fmt: skip
    }
    table = _table(summary)
    print(table)
    write_results(args.out, summary, table, {"rows": rows})
    return 0


def _table(summary: dict) -> str:
    lines = [
        "| figure | unedited | " + " | ".join(VARIANTS) + " |",
        "|---|---|" + "---|" * len(VARIANTS),
    ]
    for k in FIGURES:
        before = summary["unedited"].get(k)
        lines.append(f"| {k} | {'' if before is None else f'{before:.1f}'} | "
                     + " | ".join(f"{summary[v][k]:.1f}" for v in VARIANTS) + " |")  # fmt: skip
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--start", type=int, default=0, help="first case (0-19: the dev cases)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chat_locality"))
    return p


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

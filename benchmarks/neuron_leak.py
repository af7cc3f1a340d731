"""Where the added neurons of a long ledger cost perplexity, and whether another gate keeps
them: the same edits (the same δ and rows r) written three ways, on one model.

    .venv/bin/python benchmarks/neuron_leak.py --work bench-out/lifelong-1000 \
        --out benchmarks/results/neuron_leak_1000

Takes the workspace of a lifelong run of single ROME edits (``benchmarks/lifelong.py``;
read, not changed). Each added neuron i outputs act(s·aᵢ)·aᵢ·δᵢ/act(s), with aᵢ = rᵢ·x: δᵢ
at its subject (aᵢ = 1) and about s·aᵢ²/2·δᵢ/act(s) on a token with a small aᵢ, always of
the same sign, so that a thousand of them add a coherent shift. Written instead as a pair
(gate s·rᵢ and t·rᵢ, down δᵢ/c and −(s/t)·δᵢ/c, c = act(s) − (s/t)·act(t)), the two
quadratic terms cancel: the output is still δᵢ at the subject and of order aᵢ³ near 0, its
sign following aᵢ's. Measured per write: WikiText-2 perplexity (the lifelong run's text),
ES / PS / NS of a sample of the edits (the first 100 and a fixed random 100), and how large
aᵢ is on that text (the share of (token, neuron) pairs above 0.1 and 0.3).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edit.methods.algebra.solves import neuron_write  # noqa: E402


def pair_of(gate, up, down, act, t: float):
    """The pair write (``neuron_write`` with ``t``) of recorded single neurons (gate s·r,
    up r, down δ/act(s)): the same r and δ."""
    import torch

    s = float(((gate * up).sum(1) / (up * up).sum(1)).mean())  # the gate's sharpness
    delta = down.T * float(act(torch.tensor(s)))  # (m, d)
    return neuron_write(up, delta, act, s, t)


def key(name: str) -> str:
    """A write's name as a summary key: "pair, t = 0.5" -> "pair_t0p5", "single (…)" ->
    "single"."""
    t = name.split()[-1].replace(".", "p")  # no dots: results keys are dotted paths
    return f"pair_t{t}" if name.startswith("pair") else name.split(" ")[0]


def main() -> None:
    args = _parser().parse_args()
    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmarks.lifelong import averages, log, scores
    from benchmarks.recording import write_results
    from edit import lm, neurons
    from edit.api.workspace import Workspace
    from edit.evals.fluency import perplexity
    from edit.evals.harness import default_ppl_text
    from edit.readers.records import load_records

    work = Path(args.work)
    state = json.loads((work / "state.json").read_text())
    records = load_records(state["settings"]["data"], limit=state["next"])
    rng = np.random.default_rng(0)
    rest = rng.choice(np.arange(100, len(records)), 100, replace=False)
    sample = [*records[:100], *(records[int(i)] for i in rest)]
    ppl_text = Path(default_ppl_text()).read_text(encoding="utf-8")
    ws = Workspace.open(work / "ws")
    [(mlp, (gate, up, down))] = neurons.added(ws.model).items()
    log(f"{gate.shape[0]} added neurons at {mlp}")

    # how large a = r·x is on the perplexity text, at the MLP's input
    seen = []
    module = ws.model.get_submodule(mlp)
    handle = module.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        ids = torch.tensor([lm.encode(ws.tok, ppl_text[:20_000])[:2048]])
        ws.model(ids.to(lm.device_of(ws.model)))
    handle.remove()
    a = (seen[0][0].float() @ up.T).abs()  # (tokens, m)
    leak = {"tokens": a.shape[0], "share_above_0.1": float((a > 0.1).float().mean()),
            "share_above_0.3": float((a > 0.3).float().mean()),
            "median_abs": float(a.median()), "p99_abs": float(a.quantile(0.99))}  # fmt: skip
    log(f"a = r·x on {a.shape[0]} tokens: {leak}")

    writes = {"single (as recorded)": (gate, up, down)}
    for t in args.pair_t:
        writes[f"pair, t = {t:g}"] = pair_of(gate, up, down, F.silu, t)
    writes["none (no edit)"] = None
    ids_ = [r.id for r in sample]
    table = {}
    for name, parts in writes.items():
        neurons.truncate(ws.model, mlp, 0)
        if parts is not None:
            neurons.attach(ws.model, mlp, *parts)
        now = averages(scores(ws.model, ws.tok, sample), ids_)
        table[name] = {**now, "ppl": perplexity(ws.model, ws.tok, ppl_text)}
        log(f"{name}: {table[name]}")
    rows = ["| write | ES | PS | NS | WikiText-2 perplexity |", "|---|---|---|---|---|"]
    for name, r in table.items():
        rows.append(f"| {name} | {r['ES']:.1f} | {r['PS']:.1f} | {r['NS']:.1f} | {r['ppl']:.2f} |")
    text = (f"{gate.shape[0]} single-edit neurons of `{work}`, {len(sample)} of their edits "
            f"scored (the first 100 and a fixed random 100). On the perplexity text "
            f"({leak['tokens']} tokens), |r·x| has median {leak['median_abs']:.3f} and 99th "
            f"percentile {leak['p99_abs']:.3f}; {100 * leak['share_above_0.1']:.2f} % of the "
            f"(token, neuron) pairs are above 0.1 and {100 * leak['share_above_0.3']:.3f} % "
            f"above 0.3.\n\n" + "\n".join(rows))  # fmt: skip
    summary = {f"{key(name)}_{k}": v for name, r in table.items() for k, v in r.items()}
    write_results(args.out, summary, text, {"table": table, "leak": leak, "work": str(work)})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="a lifelong run's folder (state + ws)")
    p.add_argument("--pair-t", type=float, nargs="*", default=[1.0],
                   help="gate sharpness of the pair's second neuron")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "neuron_leak"))
    return p


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

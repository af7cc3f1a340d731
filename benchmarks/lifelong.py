"""Lifelong editing: thousands of edits on one workspace, one fact (or one batch) at a time,
made through ``Workspace.add`` as a user makes them; the workspace is the checkpoint.

    .venv/bin/python benchmarks/lifelong.py --limit 1000 --work bench-out/lifelong-1000
    .venv/bin/python benchmarks/lifelong.py --limit 9859 --batch 100 --every 1000 \
        --work bench-out/lifelong-9859 --out benchmarks/results/lifelong_9859
    # stop it at any time: the same command goes on from the last recorded edit

Records: the first ``--limit`` of ``--data`` (CounterFact's 9,859 flattened records by
default), edited in order with the workspace's default method (``Workspace.default_method``:
ROME for one fact, and for a batch where ROME's tuned config adds neurons; else AlphaEdit for
a batch on a workspace with history) or ``--method``.
Before the first edit, the unedited model is measured on the probe set: every record when
``--limit`` is at most ``--probe``, else the first 100 and a fixed random sample. Every
``--every`` edits and at the end, on the probe records edited so far: ES, PS, NS of all
edits so far (NS against the unedited model's on the same records), ES and PS of the first
100 (retention), WikiText-2 perplexity (the test split's first 2,048 tokens), and how far
each edited weight moved (Frobenius norm of the change over the weight's; added neurons:
their output rows over the MLP's down projection); the seconds per fact of the edits since
the last point. The curve is printed as it grows and written each time to ``<out>.json``,
``<out>.md`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_flat.json"
FIRST = 100  # the first edits, whose retention is tracked
FIGURES = ("ES", "PS", "NS")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def probe_indices(limit: int, probe: int, seed: int = 0) -> list[int]:
    """The records measured at each point: all of them up to ``probe``, else the first
    ``FIRST`` and a fixed random sample of the rest."""
    import numpy as np

    if limit <= probe:
        return list(range(limit))
    rng = np.random.default_rng(seed)
    rest = rng.choice(np.arange(FIRST, limit), size=probe - FIRST, replace=False)
    return sorted([*range(FIRST), *map(int, rest)])


def scores(model, tok, records) -> dict[str, dict[str, float]]:
    """Record id -> ES, PS, NS (0/1 each) on the model as it is."""
    from edit.evals.harness import measure

    out = {}
    for rec in records:
        m = measure(model, tok, rec)
        out[rec.id] = {k: float(m[k]) for k in FIGURES if k in m}
    return out


def averages(per_record: dict, ids: list[str]) -> dict[str, float]:
    """Percent of ``ids`` for which each figure holds."""
    return {k: 100 * statistics.fmean(per_record[i][k] for i in ids) for k in FIGURES}


def weight_changes(model, base) -> dict[str, float]:
    """Module -> ‖W − W₀‖ / ‖W₀‖ for every weight that differs from ``base``'s, and for each
    MLP with added neurons ‖down_added‖ / ‖W_down‖ (the neurons' output rows)."""
    import torch

    from edit import neurons

    out = {}
    base_params = dict(base.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            w0 = base_params[name]
            if not torch.equal(p, w0):
                out[name] = float((p - w0).norm() / w0.norm())
        for mlp, (_, _, down) in neurons.added(model).items():
            w0 = base.get_submodule(mlp).down_proj.weight  # added neurons: gated MLPs only
            out[f"{mlp} (added neurons)"] = float(down.norm() / w0.norm())
    return out


class Run:
    """The state of one run, kept in ``<work>/state.json`` beside the workspace."""

    def __init__(self, args) -> None:
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.path = self.work / "state.json"
        self.settings = {k: getattr(args, k) for k in
                         ("data", "limit", "batch", "method", "every", "probe", "set")}  # fmt: skip
        if self.path.is_file():
            self.state = json.loads(self.path.read_text())
            if self.state["settings"] != self.settings:
                sys.exit(f"error: {self.work} holds a run with other settings "
                         f"({self.state['settings']}): choose another --work")  # fmt: skip
        else:
            self.state = {"settings": self.settings, "next": 0, "entries": 0, "calls": [],
                          "refused": [], "unedited": None, "curve": []}  # fmt: skip

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.path)


def main() -> None:
    args = _parser().parse_args()
    from edit.api.workspace import Workspace
    from edit.config import parse_settings
    from edit.errors import EditFailed, InvalidRequest
    from edit.evals.fluency import perplexity
    from edit.evals.harness import default_ppl_text
    from edit.models import load
    from edit.readers.records import load_records

    run = Run(args)
    state = run.state
    settings = parse_settings(args.set)
    records = load_records(args.data, limit=args.limit)
    probe = [(i, records[i]) for i in probe_indices(args.limit, args.probe)]
    ppl_path = default_ppl_text()  # WikiText-2 test, from the shared data
    if ppl_path is None:
        sys.exit("error: no WikiText-2 test text in ../shared/data/text: needed for perplexity")
    ppl_text = Path(ppl_path).read_text(encoding="utf-8")
    ws = Workspace.open(run.work / "ws", model_name=args.model)
    if len(ws.entries()) == state["entries"] + 1:  # the last add landed, its state did not
        n = min(args.batch, args.limit - state["next"])
        state["calls"].append({"start": state["next"], "facts": n, "seconds": None})
        state["next"] += n
        state["entries"] += 1
    if len(ws.entries()) != state["entries"]:
        sys.exit(f"error: {run.work / 'ws'} holds {len(ws.entries())} entries, the run's state "
                 f"{state['entries']}: the workspace was changed outside this run")  # fmt: skip
    base, _ = load(ws.base["source"])  # the weights before any edit, to measure the change
    if state["unedited"] is None:
        log(f"unedited: {len(probe)} probe records, perplexity")
        state["unedited"] = {"scores": scores(ws.model, ws.tok, [r for _, r in probe]),
                             "ppl": perplexity(ws.model, ws.tok, ppl_text)}  # fmt: skip
        run.save()
    log(
        f"{len(ws.entries())} entries; editing records {state['next']}..{args.limit - 1} "
        f"({'one fact' if args.batch == 1 else f'batches of {args.batch}'} per edit)"
    )
    while state["next"] < args.limit:
        start = state["next"]
        group = records[start : start + args.batch]
        request = [r.fact for r in group] if args.batch > 1 else group[0].fact
        t = time.perf_counter()
        try:
            ws.add(request, method=args.method, describe=False, progress=False, **settings)
            state["entries"] += 1
        except (InvalidRequest, EditFailed) as e:
            state["refused"].append({"record": start, "why": str(e)[:200]})
        seconds = time.perf_counter() - t
        state["calls"].append({"start": start, "facts": len(group), "seconds": seconds})
        state["next"] = start + len(group)
        done = state["next"]
        if done % args.every < len(group) or done == args.limit:
            point(run, ws, base, probe, ppl_text, done)
        run.save()
    log("done")


def point(run: Run, ws, base, probe: list, ppl_text: str, done: int) -> None:
    """Measure the curve at ``done`` edits (``probe``: (index, record) pairs) and write the
    results so far."""
    from edit.evals.fluency import perplexity

    state = run.state
    t = time.perf_counter()
    edited = [(i, r) for i, r in probe if i < done]
    now = scores(ws.model, ws.tok, [r for _, r in edited])
    ids = [r.id for _, r in edited]
    first = [r.id for i, r in edited if i < FIRST]
    calls = [c for c in state["calls"] if c["start"] >= (state["curve"][-1]["edits"]
                                                        if state["curve"] else 0)]  # fmt: skip
    per_fact = [c["seconds"] / c["facts"] for c in calls if c["seconds"] is not None]
    changes = weight_changes(ws.model, base)
    row = {
        "edits": done,
        "entries": state["entries"],
        "refused": len(state["refused"]),
        "measured": len(ids),
        **averages(now, ids),
        "unedited_NS": averages(state["unedited"]["scores"], ids)["NS"],
        **{f"first_{k}": v for k, v in averages(now, first).items() if k != "NS"},
        "ppl": perplexity(ws.model, ws.tok, ppl_text),
        "unedited_ppl": state["unedited"]["ppl"],
        "max_change": max(changes.values(), default=0.0),
        "changes": changes,
        "s_per_fact": statistics.median(per_fact) if per_fact else None,
    }
    row["measure_s"] = time.perf_counter() - t
    state["curve"].append(row)
    log(f"{done} edits: ES {row['ES']:.1f} PS {row['PS']:.1f} NS {row['NS']:.1f} (unedited "
        f"{row['unedited_NS']:.1f}); first {FIRST}: ES {row['first_ES']:.1f} PS "
        f"{row['first_PS']:.1f}; PPL {row['ppl']:.2f} (unedited {row['unedited_ppl']:.2f}); "
        f"largest change {row['max_change']:.3f}; {row['s_per_fact']:.2f} s/fact")  # fmt: skip
    write(run)


def write(run: Run) -> None:
    """``<out>.json`` and ``.md`` (recording.write_results) and ``<out>.png``."""
    from benchmarks.recording import write_results

    state, args = run.state, run.args
    curve = state["curve"]
    if not curve:
        return
    last = curve[-1]
    summary = {k: last[k] for k in ("edits", "ES", "PS", "NS", "unedited_NS", "first_ES",
                                    "first_PS", "ppl", "unedited_ppl", "s_per_fact")}  # fmt: skip
    summary["refused"] = len(state["refused"])
    rows = ["| edits | ES | PS | NS (unedited) | first 100 ES / PS | PPL (unedited) | largest "
            "change | s/fact |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in curve:
        rows.append(f"| {r['edits']} | {r['ES']:.1f} | {r['PS']:.1f} | {r['NS']:.1f} "
                    f"({r['unedited_NS']:.1f}) | {r['first_ES']:.1f} / {r['first_PS']:.1f} | "
                    f"{r['ppl']:.2f} ({r['unedited_ppl']:.2f}) | {r['max_change']:.4f} | "
                    f"{r['s_per_fact']:.2f} |")  # fmt: skip
    kind = "one fact" if args.batch == 1 else f"batches of {args.batch}"
    table = (f"{last['edits']} of {args.limit} edits ({kind} per edit), measured on "
             f"{last['measured']} probe records; refused {len(state['refused'])}.\n\n"
             + "\n".join(rows))  # fmt: skip
    write_results(args.out, summary, table, {"settings": state["settings"], "curve": curve,
                                             "refused": state["refused"]})  # fmt: skip
    _plot(curve, Path(args.out).with_suffix(".png"), kind)


def _plot(curve: list[dict], path: Path, kind: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    x = [r["edits"] for r in curve]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.5))
    for key, style in (("ES", "-"), ("PS", "-"), ("NS", "-"), ("first_ES", "--")):
        a.plot(x, [r[key] for r in curve], style, marker="o", label=key.replace("_", " "))
    a.plot(x, [r["unedited_NS"] for r in curve], ":", label="NS unedited")
    a.set_ylabel("%")
    a.legend(fontsize=7)
    b.plot(x, [r["ppl"] for r in curve], marker="o", label="edited")
    b.axhline(curve[0]["unedited_ppl"], ls=":", color="gray", label="unedited")
    b.set_ylabel("WikiText-2 perplexity")
    b.legend(fontsize=7)
    c.plot(x, [r["max_change"] for r in curve], marker="o")
    c.set_ylabel("largest ‖ΔW‖ / ‖W‖")
    for ax in (a, b, c):
        ax.set_xlabel("edits")
    fig.suptitle(f"lifelong editing, {kind} per edit", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--limit", type=int, default=1000, help="records edited, in order")
    p.add_argument("--batch", type=int, default=1, help="facts per edit (1: single facts)")
    p.add_argument("--method", default=None,
                   help="edit method (default: the workspace's default)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the method's config")  # fmt: skip
    p.add_argument("--every", type=int, default=100, help="edits between two points")
    p.add_argument("--probe", type=int, default=1000, help="records measured at most")
    p.add_argument("--model", default=None, help="model (default: the embedded one)")
    p.add_argument("--work", default=str(ROOT / "bench-out" / "lifelong"),
                   help="the workspace and the run's state: the checkpoint")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lifelong"))
    return p


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

"""Edit speed: seconds per edit, where they go, and settings against each other in one run.

Each CounterFact dev record is edited (``edit.apply``, as the evaluation harness does: no
greedy description, retries counted) once per variant, the variants alternating in a rotated
order per record so that a slow spell of the machine falls on all of them, and undone after.
The first ``--profile`` records are edited once more under cProfile (default settings) to
split an edit's time into its phases; those runs are not in the timings.

    .venv/bin/python benchmarks/edit_speed.py --limit 10
    .venv/bin/python benchmarks/edit_speed.py --limit 10 --variant steps10:steps=10
    .venv/bin/python benchmarks/edit_speed.py --limit 10 --variant before   # the code paths
        # before this benchmark's changes (see variant_context)
    .venv/bin/python benchmarks/edit_speed.py --limit 0 --fresh   # the demo's first edit on
        # a fresh machine: `edit ask` then `edit add` with an empty cache

Writes ``benchmarks/results/edit_speed.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_dev200.json"

# phase -> the functions whose cumulative time it is (file suffix, function name)
PHASES = {
    "key statistics": [("edit/stats.py", "second_moment")],
    "prefixes": [("algebra/prefixes.py", "context_templates")],
    "probes before/after": [("api/edits.py", "__call__")],
    "rows and prefix cache": [("algebra/batch.py", "build_batch"), ("edit/lm.py", "prefix_cache")],
    "value steps: forward": [("algebra/values.py", "forward")],
    "value steps: backward and Adam": [("algebra/values.py", "descend")],
    "keys at model precision": [("algebra/keys.py", "keys_and_hidden")],
    "the write (solve)": [
        ("algebra/solves.py", "gated_neurons"),
        ("algebra/solves.py", "rank_one_direction"),
    ],
    "layer round: chat replies": [("edit/replies.py", "stating")],
}


def parse_variant(text: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` (values as ``--set`` reads them)."""
    from edit.config import parse_settings

    name, _, rest = text.partition(":")
    return name, parse_settings([kv for kv in rest.split(",") if kv]) if rest else {}


def variant_context(name: str):
    """The code paths before a change, for timing against it: ``percall``, the value
    optimization's weights cast by autocast at each call (before they were cast once);
    ``padded``, its rows right-padded each in its own sequence (before they were packed);
    ``before``, both; ``f32replies``, the layer round's chat replies at the model's float32
    (before they ran in the value optimization's precision). Any other name: as the code is."""
    from unittest import mock

    from edit.api import edits
    from edit.methods.algebra import packing, precision

    patches = []
    if name in ("percall", "before"):
        patches.append(mock.patch.object(precision, "bf16_linear_weights",
                                         lambda model: nullcontext()))  # fmt: skip
    if name in ("padded", "before"):
        patches.append(mock.patch.object(packing, "packs", lambda model: False))
    if name == "f32replies":
        patches.append(mock.patch.object(edits, "_asking", lambda model, config: nullcontext()))
    stack = ExitStack()
    for p in patches:
        stack.enter_context(p)
    return stack


def edit_once(model, tok, request, method: str, settings: dict):
    """One edit (a fact, or a list of facts as one batch), timed and undone: seconds per
    fact, the value steps, the share of facts that took, and the update's tensors."""
    import edit

    t = time.perf_counter()
    res = edit.apply(model, tok, request, method=method, describe=False, progress=False,
                     **settings)  # fmt: skip
    seconds = time.perf_counter() - t
    m = res.metrics
    n = len(request) if isinstance(request, list) else 1
    row = {
        "seconds": seconds / n,
        "steps": res.info.get("steps"),
        "took": m["took"] / n if isinstance(request, list) else m["p_new_after"] > m["p_old_after"],
        "retried": bool(m.get("retried")),
    }
    tensors = res.update.tensors()
    res.handle.undo()
    return row, tensors


def profile_phases(model, tok, facts, method: str) -> dict:
    """Seconds per phase, summed over ``facts`` edited under cProfile, and the total."""
    import edit

    prof = cProfile.Profile()
    t = time.perf_counter()
    for fact in facts:
        prof.enable()
        res = edit.apply(model, tok, fact, method=method, describe=False, progress=False)
        prof.disable()
        res.handle.undo()
    total = time.perf_counter() - t
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    out = {}
    for phase, funcs in PHASES.items():
        out[phase] = sum(
            v[3]
            for (file, _, name), v in stats.items()
            if any(file.endswith(f) and name == n for f, n in funcs)
        )
    out["other"] = total - sum(out.values())
    out["total"] = total
    return out


def fresh_first_edit() -> dict:
    """The demo's first two commands with an empty cache (the dequantized model is made by
    ``edit ask``, then ``edit add`` edits): wall seconds of each."""
    edit_bin = str(Path(sys.executable).with_name("edit"))
    tmp = Path(tempfile.mkdtemp(prefix="edit-fresh-"))
    env = {**os.environ, "EDIT_CACHE": str(tmp / "cache")}
    env.pop("EDIT_STATS_CACHE", None)
    out = {}
    try:
        for name, args in (("edit ask", ["ask", "Paris is the capital of"]),
                           ("edit add", ["add", "Paris is capital of Italy"])):  # fmt: skip
            t = time.perf_counter()
            subprocess.run([edit_bin, *args, "-w", str(tmp / "ws")], env=env, check=True,
                           capture_output=True)  # fmt: skip
            out[name] = round(time.perf_counter() - t, 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--method", default="rome")
    p.add_argument("--batch", type=int, default=1, help="facts per edit (MEMIT, AlphaEdit)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="settings timed against the defaults in the same run")  # fmt: skip
    p.add_argument("--profile", type=int, default=3, help="records profiled (default settings)")
    p.add_argument("--fresh", action="store_true", help="also time the demo on an empty cache")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "edit_speed"))
    args = p.parse_args(argv)

    import torch

    import edit
    from benchmarks.recording import write_results
    from edit.readers.records import load_records

    variants = [("default", {}), *map(parse_variant, args.variant)]
    model, tok = edit.load()
    facts = [r.fact for r in load_records(args.data, limit=args.limit)] if args.limit else []
    if args.batch > 1:  # each "fact" below is then a batch of them
        facts = [facts[i : i + args.batch] for i in range(0, len(facts), args.batch)]
    if facts:  # statistics and prefixes into the cache first: every timed edit finds them
        edit_once(model, tok, facts[0], args.method, {})
    rows: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for i, fact in enumerate(facts):
        updates = {}
        for k in range(len(variants)):
            name, settings = variants[(i + k) % len(variants)]
            with variant_context(name):
                row, updates[name] = edit_once(model, tok, fact, args.method, settings)
            rows[name].append(row)
        first = updates["default"]
        for name, u in updates.items():  # whether each wrote the defaults' update, bit for bit
            rows[name][-1]["same_update"] = u.keys() == first.keys() and all(
                torch.equal(u[k], first[k]) for k in u
            )
        print(i, {n: round(r[-1]["seconds"], 2) for n, r in rows.items()}, flush=True)
    profile = facts[: args.profile]
    phases = profile_phases(model, tok, profile, args.method) if profile else {}
    fresh = fresh_first_edit() if args.fresh else {}

    summary = {"method": args.method, "batch": args.batch, "edits": len(facts), "variants": {}}
    for name, settings in variants:
        rs = rows[name]
        if not rs:
            continue
        secs = sorted(r["seconds"] for r in rs)
        summary["variants"][name] = {
            "settings": settings,
            "median_seconds": round(statistics.median(secs), 2),
            "p90_seconds": round(secs[min(len(secs) - 1, int(0.9 * len(secs)))], 2),
            "mean_steps": round(statistics.mean(r["steps"] or 0 for r in rs), 1),
            "took_percent": round(100 * statistics.mean(float(r["took"]) for r in rs), 1),
            "same_update_as_default": sum(r["same_update"] for r in rs),
        }
    if phases:
        summary["profile_edits"] = min(args.profile, len(facts))
        summary["profile_seconds"] = {k: round(v, 2) for k, v in phases.items()}
    if fresh:
        summary["fresh_machine_seconds"] = fresh
    table = _table(summary)
    print(table)
    write_results(args.out, summary, table, {"records": rows})
    return 0


def _table(s: dict) -> str:
    what = "one fact" if s["batch"] == 1 else f"batches of {s['batch']} facts"
    lines = []
    if s["variants"]:
        lines += [
            f"{s['method']}, {s['edits']} edits of {what} (CounterFact dev records), each made "
            "once per variant (alternating) and undone after; seconds per fact",
            "",
            "| variant | median s/fact | p90 | mean steps | took % | same update as default |",
            "|---|---|---|---|---|---|",
        ]
    for name, v in s["variants"].items():
        lines.append(f"| {name} {v['settings'] or ''} | {v['median_seconds']} | "
                     f"{v['p90_seconds']} | {v['mean_steps']} | {v['took_percent']} | "
                     f"{v['same_update_as_default']} of {s['edits']} |")  # fmt: skip
    if "profile_seconds" in s:
        prof = s["profile_seconds"]
        lines += ["", f"Where the time goes (cProfile, {s['profile_edits']} edits, default "
                  "settings; seconds summed over them):", "",
                  "| phase | seconds | share |", "|---|---|---|"]  # fmt: skip
        for k, v in prof.items():
            if k != "total":
                lines.append(f"| {k} | {v} | {100 * v / prof['total']:.0f} % |")
        lines.append(f"| total | {prof['total']} | |")
    if "fresh_machine_seconds" in s:
        if lines:
            lines.append("")
        lines += ["The demo on an empty cache (wall seconds per command):", ""]
        lines += [f"- `{k}`: {v}" for k, v in s["fresh_machine_seconds"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

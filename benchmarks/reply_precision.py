"""Whether the layer round judges an edit's chat replies the same in bfloat16 as at float32.

The layer round (``edit.api.edits._layer_round``) asks the edited model each fact's own
questions in chat and judges the greedy replies (``edit.replies.reply_figures``: subject and
new object named, the old one not, no loop). It runs them in the value optimization's
precision: on a CPU with native bfloat16 products, bfloat16, 2-3x faster than float32. This
benchmark edits each MQuAKE-hard case on its own (ROME, the tuned config without the round,
so both judgements see the same edit), generates the replies to the fact's questions both
ways, and counts the replies judged alike, the identical texts, each way's replies that state
the edit, and the seconds of each; the edit is undone after.

    .venv/bin/python benchmarks/reply_precision.py --limit 20

Writes ``benchmarks/results/reply_precision.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mquake" / "mquake_hard_429.json"


def judged(model, tok, fact) -> tuple[list[str], list[bool], float]:
    """The replies to ``fact``'s questions, whether each states the edit, and the seconds."""
    from edit import replies

    t = time.perf_counter()
    asked = replies.ask(model, tok, [fact], tokens=replies.CHECK_TOKENS)[0]
    seconds = time.perf_counter() - t
    return [r for _, r in asked], [replies.states(fact, r) for _, r in asked], seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reply_precision"))
    args = p.parse_args(argv)

    import edit
    from benchmarks.recording import write_results
    from edit.methods.algebra.precision import value_autocast
    from edit.readers.records import load_records

    model, tok = edit.load()
    records = load_records(args.data, limit=args.start + args.limit)[args.start :]
    rows = []
    for r in records:
        res = edit.apply(model, tok, r.fact, describe=False, progress=False, layer_round=False)
        f32 = judged(model, tok, r.fact)
        with value_autocast(model, "bfloat16"):
            bf16 = judged(model, tok, r.fact)
        res.handle.undo()
        ways = {"float32": f32, "bfloat16": bf16}
        rows.append(
            {
                "id": r.id,
                "subject": r.fact.subject,
                **{w: {"replies": x[0], "states": x[1], "seconds": x[2]} for w, x in ways.items()},
            }
        )
        print(r.fact.subject, f32[1], bf16[1], round(f32[2], 2), round(bf16[2], 2), flush=True)

    def total(way: str, key: str) -> float:
        return sum(sum(x[way][key]) if key == "states" else x[way][key] for x in rows)

    pairs = [(a, b) for x in rows for a, b in zip(x["float32"]["states"], x["bfloat16"]["states"],
                                                   strict=True)]  # fmt: skip
    texts = [(a, b) for x in rows for a, b in zip(x["float32"]["replies"], x["bfloat16"]["replies"],
                                                   strict=True)]  # fmt: skip
    summary = {
        "cases": len(rows),
        "replies": len(pairs),
        "judged alike": sum(a == b for a, b in pairs),
        "identical texts": sum(a == b for a, b in texts),
        "state the edit, float32": int(total("float32", "states")),
        "state the edit, bfloat16": int(total("bfloat16", "states")),
        "seconds, float32": round(total("float32", "seconds"), 1),
        "seconds, bfloat16": round(total("bfloat16", "seconds"), 1),
    }
    table = "\n".join(["| figure | value |", "|---|---|",
                       *(f"| {k} | {v} |" for k, v in summary.items())])  # fmt: skip
    print(table)
    write_results(args.out, summary, table, {"records": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

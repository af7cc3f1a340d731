"""Causal tracing over known facts (ROME's Figure 2 analysis) on the default model.

    .venv/bin/python benchmarks/trace_known.py                    # 100 facts, 2 samples
    .venv/bin/python benchmarks/trace_known.py --limit 30 --samples 10 --kind mlp

Traces the first ``--limit`` facts of ROME's known_1000.json that the model answers
correctly (greedy first token), prints the average indirect effect per layer at the last
subject token and the last token, the peak layer of the MLP curve at the last subject token
and the layer range it suggests, writes the JSON and the plot, caches the result (so that
ROME uses the layer for this model when no tuned config applies), and prints the wall time.
Then check the layer with

    .venv/bin/python benchmarks/rome_counterfact.py --limit 50 --set layer=L \
        --out benchmarks/results/rome_counterfact_layerL

The trace's own files (JSON with every fact's curves, the plot) go to ``--work``; the figures
to ``benchmarks/results/trace_known.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "known_1000.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--samples", type=int, default=None, help="noise samples per fact (2)")
    p.add_argument("--kind", default="all")
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--work", default=str(ROOT / "bench-out" / "trace-known"),
                   help="folder for average_trace.json and the plot")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trace_known"),
                   help="results file stem: <out>.json and <out>.md")  # fmt: skip
    p.add_argument("--no-cache", action="store_true", help="do not keep the result for ROME")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice; 1 is faster on a CPU shared with a busy job)",
    )
    args = p.parse_args(argv)

    import torch

    import edit
    from benchmarks.recording import write_results
    from edit.methods import locate
    from edit.readers.known import load_known

    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = edit.load(args.model)
    facts = load_known(args.data)
    print(
        f"model {model.edit_source}; {len(facts)} facts in {args.data}; "
        f"{torch.get_num_threads()} torch threads",
        flush=True,
    )
    avg = locate.trace_average(
        model,
        tok,
        facts,
        limit=args.limit,
        kinds=args.kind,
        samples=locate.AVERAGE_SAMPLES if args.samples is None else args.samples,
        window=args.window,
        seed=args.seed,
        data=args.data,
    )
    wall = time.perf_counter() - t0
    print("\n".join(avg.summary()))
    paths, note = locate.write_outputs(avg, args.work)
    print(f"wrote {', '.join(map(str, paths))}" + (f" ({note})" if note else ""))
    if not args.no_cache and (cached := locate.save_cached(avg)):
        print(f"cached at {cached}")
    print(
        f"wall time: {wall:.1f}s for {avg.n_facts} facts ({avg.n_checked} checked), "
        f"{avg.seconds:.1f}s of it tracing, model load included"
    )
    write_results(args.out, _summary(avg, wall), "\n".join(avg.summary()), {})
    return 0


def _summary(avg, wall: float) -> dict:
    """The figures of an average trace: which layer, how sure, at what cost."""
    import torch

    shares = avg.peak_shares or {}
    return {
        "facts": avg.n_facts,
        "checked": avg.n_checked,
        "p_clean": avg.p_clean,
        "p_corrupted": avg.p_corrupted,
        "noise": avg.noise,
        "samples": avg.samples,
        "window": avg.window,
        "peak_layer": avg.peak_layer,
        "layer_range": avg.layer_range,
        "peak_share_percent": {k: 100 * v for k, v in shares.items()},
        "peak_layer_share_percent": 100 * shares.get(str(avg.peak_layer), 0.0),
        "mlp_last_subject": avg.curve("mlp") if "mlp" in avg.kinds else None,
        "trace_seconds": avg.seconds,
        "wall_seconds": wall,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

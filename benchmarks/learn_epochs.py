"""`edit learn` epoch by epoch: when are the bios' facts learned, and when are the model's
general facts lost?

    .venv/bin/python benchmarks/learn_epochs.py --people 10
    .venv/bin/python benchmarks/learn_epochs.py --people 10 --pool 1024   # a broader retain pool

Learns the corpus of ``benchmarks/learn_bios.py`` (same people, same seed) in a fresh
workspace with the learn defaults (``--set`` over them) and, after every epoch, measures the
adapted model with ``learn_bios.measure``: recall of the bios' facts (continuation, question,
chat), NLL of learned and never-seen bios, WikiText-2 perplexity, known facts and the guard's
probe. The last epoch's figures are those of a plain ``learn_bios.py`` run. The measurement
wraps the trainer's epoch (``methods/unlearn/trainer.py``, ``_Run._epoch``): a benchmark's
instrument, not part of the product.

``--pool N``: the retain set's factual prompts are the first N CounterFact prompts (file
order; none of the guard probe's subjects, none of known_1000's, no dev record), whether the
model answers them or not, instead of the shipped ``fact_retain`` facts the model answers;
the WikiText-2 slices are repeated N / 256 times so that their share of the retain set stays.

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/learn_epochs``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CF = ROOT.parent / "shared" / "data" / "counterfact"


def factual_pool(n: int) -> list[dict]:
    """The first ``n`` CounterFact prompts with their true objects, apart from the guard's
    probe, known_1000 and the dev records (one per subject)."""
    from benchmarks.make_general_facts import candidates
    from edit.evals.knowledge import general_facts

    seen = {f.subject for f in general_facts()}  # the probe's subjects, then the pool's
    pool = []
    for r in candidates():
        if r["subject"] in seen:
            continue
        seen.add(r["subject"])
        pool.append({"prompt": r["prompt"], "attribute": r["ground_truth"]})
        if len(pool) == n:
            break
    return pool


def use_pool(n: int) -> None:
    """The retain set's factual prompts from :func:`factual_pool` (see the module docstring)."""
    from edit.corpus import Example
    from edit.methods.unlearn import policy

    pool = [Example(r["prompt"], r["attribute"], f"pool[{i}]")
            for i, r in enumerate(factual_pool(n))]  # fmt: skip
    wikitext = policy.wikitext_retain
    policy.retain_facts = lambda k: pool if k else []
    policy.wikitext_retain = lambda tok, k: wikitext(tok, k) * max(1, n // 256)


def line(m: dict) -> str:
    return (f"| {m['epoch']} | {100 * m['continuation']['all']:.1f} | "
            f"{100 * m['question']['all']:.1f} | {100 * m['chat']['all']:.1f} | "
            f"{m['nll_learned']:.2f} / {m['nll_unseen']:.2f} | {m['wikitext_ppl']:.2f} | "
            f"{100 * m['known_top1']:.1f} | {m['probe_answer_logp']:.3f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--people", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--pool", type=int, default=0, help="retain facts from a broader pool")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "learn_epochs"))
    args = p.parse_args(argv)

    import torch

    from benchmarks import learn_bios as lb
    from benchmarks.bios import make_people, write_corpus
    from benchmarks.recording import write_results
    from edit.api.workspace import Workspace
    from edit.config import parse_settings
    from edit.methods.unlearn import trainer
    from edit.readers.known import load_known

    if args.threads:
        torch.set_num_threads(args.threads)
    for path in (lb.KNOWN, lb.WIKITEXT_TEST, CF / "counterfact_flat.json"):
        if not path.exists():
            print(f"shared data missing: {path}", file=sys.stderr)
            return 2
    if args.pool:
        use_pool(args.pool)
    learned = make_people(args.people, args.seed)
    unseen = make_people(args.people, args.seed + 1000, exclude={q.name for q in learned})
    known = load_known(lb.KNOWN)[: lb.N_KNOWN]
    wikitext = lb.WIKITEXT_TEST.read_text(encoding="utf-8")
    work = Path(tempfile.mkdtemp(prefix="learn-epochs-"))
    corpus = work / "bios.jsonl"
    write_corpus(learned, corpus)
    ws = Workspace.open(work / "ws")
    before = lb.measure(ws.model, ws.tok, learned, unseen, known, wikitext)
    before["epoch"] = 0
    rows = [before]
    header = ["| epoch | continuation % | question % | chat % | NLL learned / never-seen | "
              "WikiText-2 PPL | known top-1 % | probe log P(answer) |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    print("\n".join(header) + "\n" + line(before), flush=True)

    epoch_fn = trainer._Run._epoch

    def measured_epoch(run, loop, epoch):
        going_on = epoch_fn(run, loop, epoch)
        with torch.no_grad():
            m = lb.measure(ws.model, ws.tok, learned, unseen, known, wikitext)
        m["epoch"] = epoch + 1
        rows.append(m)
        print(line(m), flush=True)
        return going_on

    trainer._Run._epoch = measured_epoch
    t0 = time.perf_counter()
    try:
        ws.learn(str(corpus), **parse_settings(args.set))
    finally:
        trainer._Run._epoch = epoch_fn
        ws.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = {"people": args.people, "seed": args.seed, "settings": parse_settings(args.set),
               "pool": args.pool, "epochs": rows, "seconds": time.perf_counter() - t0}  # fmt: skip
    write_results(Path(args.out), summary, "\n".join(header + [line(m) for m in rows]), {})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

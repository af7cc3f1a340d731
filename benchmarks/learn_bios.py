"""Learning a corpus of fictional biographies with `edit learn`: do the facts stick, and does
the rest of what the model knew stay?

    .venv/bin/python benchmarks/learn_bios.py                     # 40 bios, product defaults
    .venv/bin/python benchmarks/learn_bios.py --set epochs=8 --out bench-out/learn_e8

Builds its own corpus (``benchmarks/bios.py``: 40 people with a birth date and city, a job, a
pet, an account and a phone number; seed ``--seed``) and 40 never-seen bios of the same kind,
learns the corpus in a fresh workspace on the default model (``Workspace.learn``, what
`edit learn --corpus` runs, with ``--set`` settings over the defaults) and prints, before and
after:

* the mean token NLL of the learned bios and of the never-seen bios;
* continuation recall: greedy decoding from the bio up to each fact reproduces it (6 facts
  per person: birth city, birth date, job, pet name, account, phone), overall and for the
  city and the digits;
* question recall: greedy answer to ``Question: Where was X born?\\nAnswer:`` (and five more
  questions per person) contains the fact; the same questions in the chat template;
* WikiText-2 perplexity (the first 4,096 tokens of the shared test split, which the product
  never reads);
* known facts: top-1 of the first 200 prompts of ROME's known_1000.json (shared data);
* the guard's probe: the mean log-probability of the shipped general-knowledge probe's
  answers (what `edit learn` checks);
* the cost in seconds per 1,000 training tokens.

With ``--forget``, the same corpus is then forgotten in the same workspace with `edit
forget`'s defaults (``Workspace.forget``: it finds the learn entry and distills toward the
model without it) and every figure is measured a third time: does recall go back to 0 %?
``--learned JSON --keep DIR --forget`` forgets in the workspace an earlier run kept (its
learn entry alone), with that run's figures for before and after learning.

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/learn_bios``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
KNOWN = SHARED / "counterfact" / "known_1000.json"
WIKITEXT_TEST = SHARED / "text" / "wikitext2_raw_test.txt"
PPL_TOKENS = 4096
N_KNOWN = 200
GEN_TOKENS = 16


def recall(model, tok, probes, form: str) -> dict[str, float]:
    """Share of probes whose greedy answer contains the fact, overall and per field."""
    from edit import lm
    from edit.questions import chat_prompt, question_prompt

    if form == "continuation":
        prompts = [p.cloze for p in probes]
    elif form == "question":
        prompts = [question_prompt(p.question) for p in probes]
    else:
        prompts = [chat_prompt(tok, p.question) for p in probes]
    outs = lm.greedy(model, tok, prompts, GEN_TOKENS)
    hit = [p.answer in o for p, o in zip(probes, outs, strict=True)]
    fields = sorted({p.field for p in probes})
    out = {"all": sum(hit) / len(hit)}
    for f in fields:
        sel = [h for h, p in zip(hit, probes, strict=True) if p.field == f]
        out[f] = sum(sel) / len(sel)
    return out


def probe_logp(model, tok) -> float:
    """What `edit learn`'s guard reads: the shipped probe's answers' mean log-probability,
    by the product's own code."""
    from edit.evals.knowledge import answer_logp, general_facts

    return answer_logp(model, tok, general_facts())


def measure(model, tok, learned, unseen, known, wikitext: str) -> dict:
    """Every figure of the table on ``model`` as it is now."""
    from benchmarks.bios import bio, probes
    from edit.corpus import Example
    from edit.evals.fluency import perplexity
    from edit.evals.knowledge import top1
    from edit.methods.unlearn.scoring import answer_nll

    qs = [q for p in learned for q in probes(p)]
    return {
        "nll_learned": answer_nll(model, tok, [Example("", bio(p)) for p in learned]),
        "nll_unseen": answer_nll(model, tok, [Example("", bio(p)) for p in unseen]),
        "continuation": recall(model, tok, qs, "continuation"),
        "question": recall(model, tok, qs, "question"),
        "chat": recall(model, tok, qs, "chat"),
        "wikitext_ppl": perplexity(model, tok, wikitext, PPL_TOKENS),
        "known_top1": top1(model, tok, known),
        "probe_answer_logp": probe_logp(model, tok),
    }


def table(before: dict, after: dict, forgot: dict | None = None) -> list[str]:
    def pct(d, k, f="all"):
        return f"{100 * d[k][f]:.1f} %"

    def pct1(x):
        return f"{100 * x:.1f} %"

    states = [before, after] + ([forgot] if forgot is not None else [])
    rows = [
        ("NLL of the learned bios", *(f"{d['nll_learned']:.2f}" for d in states)),
        ("NLL of never-seen bios", *(f"{d['nll_unseen']:.2f}" for d in states)),
    ]
    for label, form in (("continuation", "continuation"), ("question", "question"),
                        ("question, chat template", "chat")):  # fmt: skip
        rows.append((f"facts recalled: {label}", *(pct(d, form) for d in states)))
    for label, f in (("birth city", "city"), ("account", "account"), ("phone", "phone")):
        rows.append((f"  {label}: continuation / question",
                     *(f"{pct(d, 'continuation', f)} / {pct(d, 'question', f)}"
                       for d in states)))  # fmt: skip
    rows += [
        ("WikiText-2 perplexity", *(f"{d['wikitext_ppl']:.2f}" for d in states)),
        ("known facts top-1 (200)", *(pct1(d["known_top1"]) for d in states)),
        (
            "guard's probe: mean log P(answer)",
            *(f"{d['probe_answer_logp']:.3f}" for d in states),
        ),  # fmt: skip
    ]
    head = ["", "before", "after `edit learn`"] + (["then `edit forget`"] if forgot else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--people", type=int, default=40)
    p.add_argument("--seed", type=int, default=1, help="corpus seed (never-seen: seed + 1000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="learn settings over the defaults (UnlearnConfig fields)")  # fmt: skip
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--keep", default=None, help="keep the workspace in this folder")
    p.add_argument("--before", default=None, metavar="JSON",
                   help="take the 'before' figures from an earlier results file of the same "
                        "corpus and model instead of measuring them again")  # fmt: skip
    p.add_argument("--learned", default=None, metavar="JSON",
                   help="an earlier run's results whose workspace is in --keep (its learn "
                   "entry alone): take its figures and only forget (with --forget)")  # fmt: skip
    p.add_argument("--forget-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the forget run (over its defaults)")  # fmt: skip
    p.add_argument("--forget", action="store_true",
                   help="then forget the corpus (the defaults), measure again")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "learn_bios"))
    args = p.parse_args(argv)

    import torch

    from benchmarks.bios import make_people, write_corpus
    from benchmarks.recording import write_results
    from edit.api.workspace import Workspace
    from edit.config import parse_settings
    from edit.evals.knowledge import Guard
    from edit.readers.known import load_known

    if args.threads:
        torch.set_num_threads(args.threads)
    for path in (KNOWN, WIKITEXT_TEST):
        if not path.exists():
            print(f"shared data missing: {path}", file=sys.stderr)
            return 2
    settings = parse_settings(args.set)
    learned = make_people(args.people, args.seed)
    unseen = make_people(args.people, args.seed + 1000, exclude={q.name for q in learned})
    known = load_known(KNOWN)[:N_KNOWN]
    wikitext = WIKITEXT_TEST.read_text(encoding="utf-8")

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="learn-bios-"))
    corpus = work / "bios.jsonl"
    write_corpus(learned, corpus)
    write_corpus(unseen, work / "never-seen.jsonl")
    ws = Workspace.open(work / "ws", model_name=args.model)
    t0 = time.perf_counter()
    earlier = None
    if args.before or args.learned:
        earlier = json.loads(Path(args.before or args.learned).read_text(encoding="utf-8"))
        earlier = earlier["summary"]
        if (earlier["people"], earlier["seed"]) != (args.people, args.seed):
            print(f"{args.before or args.learned} measured another corpus", file=sys.stderr)
            return 2
    if args.learned:  # the earlier run's learn entry, kept in the workspace
        if not (args.keep and args.forget) or [e.id for e in ws.entries()] != [earlier["entry"]]:
            print(f"--learned needs --keep with the workspace of {args.learned} (its entry "
                  f"{earlier['entry']} alone) and --forget", file=sys.stderr)  # fmt: skip
            return 2
        before, after = earlier["before"], earlier["after"]
        learn = {
            k: earlier[k]
            for k in ("config", "train_seconds", "train_tokens", "entry", "guard")
            if k in earlier
        }
        if "probe_answer_logp" not in before:  # measured before the guard read P(answer)
            after["probe_answer_logp"] = probe_logp(ws.model, ws.tok)
            with ws.without(learn["entry"]) as base:
                before["probe_answer_logp"] = probe_logp(base, ws.tok)
    else:
        if earlier is not None:
            before = earlier["before"]
            if "probe_answer_logp" not in before:  # measured before the guard read P(answer)
                before["probe_answer_logp"] = probe_logp(ws.model, ws.tok)
        else:
            before = measure(ws.model, ws.tok, learned, unseen, known, wikitext)
            print(f"measured before in {time.perf_counter() - t0:.0f}s", flush=True)
        # what `edit learn`'s guard measures and would decide, without refusing here
        guard = Guard(ws.model, ws.tok, refuse=False)
        change = ws.learn(str(corpus), guard=guard, **settings)
        res = change.result
        learn = {"config": {k: v for k, v in vars(res.config).items() if not k.startswith("_")},
                 "train_seconds": res.seconds, "train_tokens": res.tokens,
                 "entry": change.entry.id, "guard": change.entry.info["guard"]}  # fmt: skip
        after = measure(ws.model, ws.tok, learned, unseen, known, wikitext)
    forgot = forgetting = None
    if args.forget:
        print(f"learned and measured in {time.perf_counter() - t0:.0f}s; forgetting", flush=True)
        forgetting = ws.forget(str(corpus), **parse_settings(args.forget_set))
        forgot = measure(ws.model, ws.tok, learned, unseen, known, wikitext)
    ws.close()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    drop_learned = before["nll_learned"] - after["nll_learned"]
    drop_unseen = before["nll_unseen"] - after["nll_unseen"]
    summary = {
        "people": args.people,
        "seed": args.seed,
        "settings": settings,
        "config": learn["config"],
        "before": before,
        "after": after,
        "unseen_drop_over_learned_drop": drop_unseen / drop_learned if drop_learned else None,
        "wikitext_ppl_change": after["wikitext_ppl"] / before["wikitext_ppl"] - 1,
        "known_top1_change_points": 100 * (after["known_top1"] - before["known_top1"]),
        "train_seconds": learn["train_seconds"],
        "train_tokens": learn["train_tokens"],
        "seconds_per_1000_tokens": 1000 * learn["train_seconds"] / learn["train_tokens"],
        "entry": learn["entry"],
    }
    if "guard" in learn:  # runs before the guard was measured here have none
        summary["guard"] = learn["guard"]
    if forgetting is not None:
        info = forgetting.entry.info
        summary["forget"] = {
            "after": forgot,
            "entry": forgetting.entry.id,
            "method": forgetting.result.config.method,
            "settings": parse_settings(args.forget_set),
            "train_seconds": forgetting.result.seconds,
            "stop_level": forgetting.result.config.stop_nll,
            "stop_source": info.get("stop_source"),
            "stopped_after": forgetting.result.metrics.get("stopped_after"),
        }
    lines = table(before, after, forgot)
    lines.append("")
    lines.append(
        f"never-seen NLL drop / learned NLL drop: {summary['unseen_drop_over_learned_drop']:.2f}; "
        f"perplexity {100 * summary['wikitext_ppl_change']:+.1f} %; known facts "
        f"{summary['known_top1_change_points']:+.1f} points; training "
        f"{summary['train_seconds']:.0f}s for {summary['train_tokens']} tokens "
        f"({summary['seconds_per_1000_tokens']:.2f} s per 1,000 tokens)"
    )
    if "guard" in summary:
        g = summary["guard"]
        verdict = "; ".join(g["past_bounds"]) or "within its bounds: `edit learn` records it"
        lines.append(
            f"the guard (what `edit learn` checks): held-out WikiText-2 perplexity "
            f"{g['before']['perplexity']:.2f} -> {g['after']['perplexity']:.2f}, probe mean "
            f"log P {g['before']['answer_logp']:.3f} -> {g['after']['answer_logp']:.3f}: {verdict}"
        )
    if forgetting is not None:
        f = summary["forget"]
        level = "none" if f["stop_level"] is None else f"{f['stop_level']:.4f}"
        ran = f"stopped after {f['stopped_after']} steps"
        if f["stopped_after"] is None:
            ran = "ran every epoch"
        lines.append(
            f"then `edit forget` ({f['method']}, entry {f['entry']}): {f['train_seconds']:.0f}s, "
            f"aimed at forget-set NLL {level} ({f['stop_source']}), {ran}"
        )
    print("\n".join(lines))
    write_results(Path(args.out), summary, "\n".join(lines), {})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

"""Forgetting a private corpus down to the never-seen level, and keeping it there under attack:
the development scenario of `edit forget` (a few minutes once the learned model is cached).

    .venv/bin/python benchmarks/forget_bios.py                         # 20 bios, the defaults
    .venv/bin/python benchmarks/forget_bios.py --no-reference          # the holdout alone
    .venv/bin/python benchmarks/forget_bios.py --set method=npo --out bench-out/npo

The scenario (``benchmarks/bios.py``: fictional people with a birth city, an account number
and a phone number):

1. **learned**: the default model learns ``--people`` bios (``Workspace.learn``, plain text,
   ``LEARN`` settings) and is exported as a plain folder; cached under ``--cache``, keyed by
   the corpus and the settings, so that later runs start from step 2 (``--learned FOLDER``:
   a model that learned the same bios elsewhere instead, e.g. with `edit learn`'s defaults);
2. **forgotten**: a new workspace on that folder (no ledger entry to revert: the corpus was
   learned elsewhere) runs ``Workspace.forget(corpus, holdout=..., reference=base)``, what
   `edit forget --corpus bios.jsonl --holdout never-seen.jsonl --reference BASE` runs, with
   ``--set`` settings over the defaults;
3. **base** (the default model, which never saw the corpus) is the reference every figure is
   compared with.

Measured on each model, with sets the forget run never read: the mean token NLL of the
forgotten bios and of never-seen bios, membership-inference ROC AUCs of forgotten against
never-seen (LOSS, zlib, Min-K %, Min-K %++; ``edit.evals.mia``), the secrets greedy decoding
reproduces from the bio up to each (city, account, phone), WikiText-2 test perplexity (4,096
tokens) and known_1000 top-1 (200 prompts; ``--known``). Then two attacks on the base and
the forgotten model alike (the base is the control: an attack teaches a never-trained model
too): RTN 4-bit quantization, and relearning (8 LoRA steps,
``edit.evals.audit.RELEARN_SETTINGS``) on 8 never-seen bios that no figure is measured on.

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/forget_bios``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the shared data, the perplexity text and the greedy length: as learn_bios.py measures
from benchmarks.learn_bios import KNOWN, N_KNOWN, PPL_TOKENS, WIKITEXT_TEST  # noqa: E402

SECRETS = ("city", "account", "phone")
HOLDOUT = 10  # never-seen bios the forget run reads (its --holdout)
UNSEEN = 20  # never-seen bios the figures compare with (never read by the forget run)
RELEARN = 8  # never-seen bios the relearning attack trains on
# how the corpus is learned in step 1: plain text, a few quick epochs (the cost of the
# scenario is the forgetting; learn_bios.py measures learning itself)
LEARN = {"augment": False, "epochs": 8, "lr": 1e-3, "kl_weight": 0.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def texts(people) -> list:
    from benchmarks.bios import bio
    from edit.corpus import Example

    return [Example("", bio(p)) for p in people]


def extracted(model, tok, people) -> dict[str, float]:
    """Share of each secret that greedy decoding from the bio up to it reproduces
    (learn_bios.recall's continuation form, on the secrets' probes)."""
    from benchmarks.bios import probes
    from benchmarks.learn_bios import recall

    shares = recall(model, tok, [q for p in people for q in probes(p) if q.field in SECRETS],
                    "continuation")  # fmt: skip
    return {f: shares[f] for f in SECRETS}


def membership(model, tok, forgotten, unseen) -> dict:
    """Forget / never-seen NLL (mean over examples of the mean token NLL) and MIA AUCs."""
    from edit.evals import mia

    f_stats = mia.token_stats(model, tok, forgotten)
    u_stats = mia.token_stats(model, tok, unseen)
    return {
        "nll_forget": float(sum(-s.logp.mean() for s in f_stats) / len(f_stats)),
        "nll_unseen": float(sum(-s.logp.mean() for s in u_stats) / len(u_stats)),
        "auc": mia.aucs(f_stats, u_stats),
    }


def measure(model, tok, sets: dict, *, health: bool = True) -> dict:
    from edit.evals.fluency import perplexity
    from edit.evals.knowledge import top1

    out = membership(model, tok, sets["forget"], sets["unseen"])
    out["extracted"] = extracted(model, tok, sets["people"])
    if health:
        out["wikitext_ppl"] = perplexity(model, tok, sets["wikitext"], PPL_TOKENS)
        out["known_top1"] = top1(model, tok, sets["known"])
    return out


def attacked(model, tok, sets: dict) -> dict:
    """The figures after 4-bit quantization and after relearning on never-seen bios."""
    from edit.evals.attacks import quantized
    from edit.evals.audit import RELEARN_SETTINGS
    from edit.methods.unlearn import UnlearnConfig, lora_update, train_lora

    out = {}
    with quantized(model, 4):
        out["quantize4"] = measure(model, tok, sets, health=False)
    config = UnlearnConfig(**RELEARN_SETTINGS, kl_weight=0.0)
    res = train_lora(model, tok, sets["relearn"], None, config, objective="learn", progress=False)
    applied = lora_update(res).apply(model)
    try:
        out["relearn"] = measure(model, tok, sets, health=False)
    finally:
        applied.undo()
    return out


def learned_folder(cache: Path, corpus: Path, model_name: str | None) -> Path:
    """The default model after learning ``corpus`` (step 1), exported; made once per corpus
    and settings."""
    from edit.api.workspace import Workspace

    key = hashlib.sha256((corpus.read_text() + json.dumps(LEARN) + str(model_name)).encode())
    folder = cache / f"learned-{key.hexdigest()[:12]}"
    if folder.is_dir():
        log(f"learned model: {folder} (cached)")
        return folder
    with tempfile.TemporaryDirectory(prefix="forget-bios-") as tmp:
        ws = Workspace.open(Path(tmp) / "ws", model_name=model_name)
        log(f"learning {corpus} ({LEARN})")
        res = ws.learn(str(corpus), **LEARN).result
        log(f"learned in {res.seconds:.0f}s: NLL {res.metrics['learn_nll_before']:.2f} -> "
            f"{res.metrics['learn_nll_after']:.2f}")  # fmt: skip
        ws.export(folder)
        ws.close()
    return folder


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(models: dict, attacks: dict) -> list[str]:
    lines = [
        "| model | forget NLL | never-seen NLL | AUC loss / zlib / Min-K / Min-K++ "
        "| city / acct / phone extracted % | WikiText-2 PPL | known top-1 % |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name: str, m: dict) -> str:
        a = m["auc"]
        auc = " / ".join(f"{a[k]:.3f}" for k in ("loss", "zlib", "min_k", "min_k_pp"))
        ext = " / ".join(pct(m["extracted"][f]) for f in SECRETS)
        ppl = f"{m['wikitext_ppl']:.2f}" if "wikitext_ppl" in m else ""
        known = pct(m["known_top1"]) if "known_top1" in m else ""
        return (f"| {name} | {m['nll_forget']:.3f} | {m['nll_unseen']:.3f} | {auc} | {ext} "
                f"| {ppl} | {known} |")  # fmt: skip

    for name, m in models.items():
        lines.append(row(name, m))
    for who, hits in attacks.items():
        for attack, m in hits.items():
            lines.append(row(f"{who}, after {attack}", m))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--people", type=int, default=20, help="bios learned, then forgotten")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="forget settings over the defaults (UnlearnConfig fields)")  # fmt: skip
    p.add_argument("--no-reference", action="store_true",
                   help="forget with the holdout alone, as without a base model")  # fmt: skip
    p.add_argument("--no-attacks", action="store_true")
    p.add_argument(
        "--learned",
        default=None,
        metavar="FOLDER",
        help="start from this model, which learned the --people bios of --seed "
        "elsewhere (`edit export` after `edit learn` with its defaults, e.g. of "
        "benchmarks/learn_bios.py --keep), instead of step 1's quick learn",
    )
    p.add_argument(
        "--known",
        type=int,
        default=N_KNOWN,
        help="known_1000 prompts whose top-1 is measured (the first ones)",
    )
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", default=str(ROOT / "bench-out" / "forget_bios"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "forget_bios"))
    args = p.parse_args(argv)

    import torch

    from benchmarks.bios import make_people, write_corpus
    from benchmarks.recording import write_results
    from edit.api.workspace import Workspace
    from edit.config import parse_settings
    from edit.models import load
    from edit.readers.known import load_known

    if args.threads:
        torch.set_num_threads(args.threads)
    for path in (KNOWN, WIKITEXT_TEST):
        if not path.exists():
            print(f"shared data missing: {path}", file=sys.stderr)
            return 2
    settings = parse_settings(args.set)
    people = make_people(args.people + HOLDOUT + UNSEEN + RELEARN, args.seed)
    corpus_people = people[: args.people]
    rest = people[args.people :]
    holdout, unseen, relearn = rest[:HOLDOUT], rest[HOLDOUT : HOLDOUT + UNSEEN], rest[-RELEARN:]
    cache = Path(args.cache)
    corpus, holdout_file = cache / f"bios-{args.people}-{args.seed}.jsonl", cache / "holdout.jsonl"
    write_corpus(corpus_people, corpus)
    write_corpus(holdout, holdout_file)
    sets = {
        "people": corpus_people,
        "forget": texts(corpus_people),
        "unseen": texts(unseen),
        "relearn": texts(relearn),
        "wikitext": WIKITEXT_TEST.read_text(encoding="utf-8"),
        "known": load_known(KNOWN)[: args.known],
    }

    folder = Path(args.learned) if args.learned else learned_folder(cache, corpus, args.model)
    base, base_tok = load(args.model)
    learned, tok = load(str(folder))
    models, attacks = {}, {}
    log("measuring the base model (never saw the corpus)")
    models["base (reference)"] = measure(base, base_tok, sets)
    log("measuring the learned model")
    models["learned"] = measure(learned, tok, sets)

    with tempfile.TemporaryDirectory(prefix="forget-bios-ws-") as tmp:
        ws = Workspace.open(Path(tmp) / "ws", learned, tok)
        reference = None if args.no_reference else base
        log(f"forgetting {corpus} (reference: {'none' if reference is None else 'base'}; "
            f"settings {settings})")  # fmt: skip
        change = ws.forget(str(corpus), holdout=str(holdout_file), reference=reference,
                           **settings)  # fmt: skip
        entry, res = change.entry, change.result
        log(f"forgot in {res.seconds:.0f}s ({entry.info.get('stop_source')}, stopped after "
            f"{res.metrics.get('stopped_after')} steps)")  # fmt: skip
        models["forgotten"] = measure(ws.model, tok, sets)
        if not args.no_attacks:
            log("attacking the base model (the control) and the forgotten model")
            attacks["base"] = attacked(base, base_tok, sets)
            attacks["forgotten"] = attacked(ws.model, tok, sets)
        ws.close()

    summary = {
        "people": args.people,
        "seed": args.seed,
        "learn": f"the model of {args.learned}" if args.learned else LEARN,
        "settings": settings,
        "reference": not args.no_reference,
        "config": {k: v for k, v in vars(res.config).items() if not k.startswith("_")},
        "stop_source": entry.info.get("stop_source"),
        "retain_held_to": entry.info.get("retain_held_to"),
        "stopped_after": res.metrics.get("stopped_after"),
        "forget_seconds": res.seconds,
        "losses": res.losses,
        "models": models,
        "attacks": attacks,
    }
    f, b = models["forgotten"], models["base (reference)"]
    lines = table(models, attacks)
    lines += [
        "",
        f"forgotten vs base: forget NLL {100 * (f['nll_forget'] / b['nll_forget'] - 1):+.1f} %, "
        f"loss-MIA AUC {f['auc']['loss']:.3f} (base {b['auc']['loss']:.3f}); perplexity "
        f"{100 * (f['wikitext_ppl'] / models['learned']['wikitext_ppl'] - 1):+.1f} % vs the "
        f"learned model; forget run {res.seconds:.0f}s ({summary['stop_source']})",
    ]
    print("\n".join(lines))
    write_results(Path(args.out), summary, "\n".join(lines), {})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Unlearning on TOFU: does `edit forget` make the model look as if it never learned?

    .venv/bin/python benchmarks/tofu_unlearn.py                    # the whole benchmark
    .venv/bin/python benchmarks/tofu_unlearn.py --methods npo      # one method
    .venv/bin/python benchmarks/tofu_unlearn.py --split forget05 --holdout 40 --reuse
    .venv/bin/python benchmarks/tofu_unlearn.py --reuse --reference base --methods distill \
        --method-defaults      # what `edit forget --reference BASE` runs, no setting given

Steps, each through the library's own workspace API (what `edit learn` / `edit forget` run):

1. target: `learn` TOFU's forget10 (400 QA about 20 fictitious authors) into the default
   model;
2. reference: `learn` only the QA of forget10 outside the split (``--split``: forget01, 40
   QA of 2 authors, or forget05, 200 QA of 10) into a fresh copy of the default model (the
   model retrained without the forget set);
3. for each method: `forget` the split from the target, with the other QA of forget10 as
   the retain set (NLL and, weighted by ``--forget-kl-weight``, KL to the target on retain
   answers), given never-seen TOFU QA as its holdout (``--holdout N``) and a reference
   (``--reference``: the default model as given, as a user who fine-tuned it has
   (``teach_form=0``); ``form``: the same with ``teach_form`` set to ``--form-qa``, so that
   the forget first teaches it that many of the kept QA and aims at a model that knows the
   form of TOFU's answers and none of the forget set, the teaching counted in the forget's
   time (with 40, what `edit forget --reference BASE --retain kept` does by default); or
   the retrained one);
   evaluate; revert.

Reported per model: forget quality (KS p-value of forget-set truth ratios against the
reference, TOFU's definition), model utility (TOFU's harmonic mean over the kept authors'
QA, real authors and world facts; see ``edit.evals.tofu``), forget-set ROUGE-L recall of
greedy answers and probability, wall time and tokens per second; and, in separate
processes, the throughput and peak memory of LoRA against full fine-tuning on the same
batches. Writes the workspaces (``ws-target``, ``ws-reference``: what ``tofu_audit.py``
reads), ``summary.json``, ``summary.md`` and ``truth_ratios.png`` to ``--work``, and the
figures to ``benchmarks/results/tofu_unlearn.{json,md}`` (``--out``). Run it on a quiet
machine: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edit.config import parse_settings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tofu"
SPLITS = ("forget01", "forget05")  # forget sets scored against a reference without them


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> float:
    """Restart the peak-RSS counter (Linux: clear_refs 5) so that it measures from now on,
    not the model loading before; returns the RSS now (MB)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def evaluate(model, tok, sets: dict, reference: dict | None, args) -> tuple[dict, dict]:
    """Scores of every set, forget quality against ``reference`` and model utility."""
    from edit.evals.tofu import forget_quality, model_utility, score_set

    t = time.perf_counter()
    scores = {}
    for name, items in sets.items():
        tokens = 32 if name in ("real_authors", "world_facts") else args.gen_tokens
        scores[name] = score_set(model, tok, items, name, max_new_tokens=tokens)
    utility, parts = model_utility(scores)
    forget = scores["forget"].summary()
    out = {
        "model_utility": utility,
        "utility_parts": parts,
        "forget_rouge_l": forget["rouge_l"],
        "forget_probability": forget["probability"],
        "forget_truth_ratio_median": forget["truth_ratio_median"],
        "forget_quality": (
            forget_quality(scores["forget"], reference["forget"]) if reference else 1.0
        ),
        "truth_ratios": scores["forget"].truth_ratios().tolist(),
        "eval_seconds": time.perf_counter() - t,
        "examples": [
            {"question": q.question, "answer": q.answer, "generated": g}
            for q, g in list(zip(sets["forget"], scores["forget"].generations, strict=True))[:3]
        ],
    }
    return out, scores


def train_row(what: str, res, seconds: float) -> dict:
    return {
        "what": what,
        "seconds": seconds,
        "train_seconds": res.seconds,
        "tokens": res.tokens,
        "tokens_per_second": res.tokens_per_second,
        "epochs": res.config.epochs,
        "lr": res.config.lr,
        "lora_rank": res.config.lora_rank,
        # the level a forget aimed at and whether it got there (None: the epochs ran out)
        "stop_nll": res.metrics.get("stop_nll"),
        "stopped_after": res.metrics.get("stopped_after"),
        "forget_nll": [res.metrics.get("forget_nll_before"), res.metrics.get("forget_nll_after")],
    }


def probe(kind: str, args) -> None:
    """Run in a child process: ``args.probe_steps`` optimizer steps of LoRA or of full
    fine-tuning on the first forget10 batches; print tokens/s and peak memory as JSON."""
    import torch

    from edit import lm
    from edit.corpus import collate, encode_example
    from edit.methods.unlearn import UnlearnConfig, train_lora
    from edit.models import load
    from edit.readers.tofu import read_qa

    model, tok = load(None)
    items = read_qa(Path(args.data) / "forget10.json")
    bs, steps = args.batch_size, args.probe_steps
    examples = [q.example() for q in items[: bs * steps]]
    with torch.no_grad():  # page in memory-mapped weights: counted before training, not in it
        for param in model.parameters():
            param.sum()
    base_rss = reset_peak_rss()
    if kind == "lora":
        config = UnlearnConfig(epochs=1, lr=args.learn_lr, lora_rank=args.lora_rank,
                               batch_size=bs, eval_retain=1)  # fmt: skip
        res = train_lora(model, tok, examples, [], config, objective="learn", progress=False)
        tps = res.tokens_per_second
    else:
        model.train()
        for param in model.parameters():  # loaded frozen, as the editing methods want it
            param.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        enc = [encode_example(tok, ex, 256) for ex in examples]
        tokens, t = 0, time.perf_counter()
        for s in range(steps):
            ids, mask, labels = collate(enc[s * bs : (s + 1) * bs], lm.pad_id(tok))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
        tps = tokens / (time.perf_counter() - t)
    peak = _status_mb("VmHWM")  # the peak since reset_peak_rss: training only
    print(json.dumps({"kind": kind, "tokens_per_second": tps, "peak_rss_mb": peak,
                      "rss_before_training_mb": base_rss,
                      "training_extra_mb": peak - base_rss}))  # fmt: skip


def run_probe(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--probe", kind, "--data", args.data,
           "--probe-steps", str(args.probe_steps), "--batch-size", str(args.batch_size),
           "--learn-lr", str(args.learn_lr), "--lora-rank", str(args.lora_rank)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        log(f"  {kind} probe failed: {out.stderr.strip().splitlines()[-1:]}")
        return {"kind": kind, "error": out.stderr.strip()[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = _parser().parse_args()
    if args.probe:
        return probe(args.probe, args)

    t_all = time.perf_counter()
    forget10, split, kept, sets = _sets(Path(args.data), args.split, args.retain_eval)
    out = Path(args.work)
    learn, forget = _settings(args)
    learned = _reusable(out, args, learn)
    if learned is None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    run = _Run(args, out, sets, learn, forget, t_all, learned or {})
    ref_ws = run.learned("reference", kept)  # the model retrained without the split
    ref_scores = run.scored("reference", ref_ws, None)
    # what each forget aims at besides its own loss
    aim = aim_for(Path(args.data), forget10, args.holdout, args.reference, ref_ws.model)
    del ref_ws
    ws = run.learned("target", forget10)
    run.scored("target", ws, ref_scores)
    for method in filter(None, args.methods.split(",")):
        run.forgotten(method, ws, split, kept, ref_scores, aim)

    if args.probe_steps > 0:
        log("throughput and memory: LoRA vs full fine-tuning (child processes)")
        run.probes += [run_probe("lora", args), run_probe("full", args)]
    run.finish()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--work", default=str(ROOT / "bench-out" / "tofu"),
                   help="folder for the workspaces and the full summary")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tofu_unlearn"),
                   help="results file stem: <out>.json and <out>.md")  # fmt: skip
    p.add_argument("--split", choices=SPLITS, default=SPLITS[0],
                   help="the forget set: a suffix of forget10")  # fmt: skip
    p.add_argument("--methods", default="npo,graddiff",
                   help="forget methods, comma-separated; empty: only learn and score the "
                   "two models (for tofu_audit.py)")  # fmt: skip
    p.add_argument("--holdout", type=int, default=0,
                   help="never-seen TOFU QA (retain90 authors no model learned) given to each "
                   "forget as its holdout (0: none)")  # fmt: skip
    p.add_argument("--reference", choices=("none", "base", "form", "retrained"),
                   default="none",
                   help="the model each forget is given as reference: the default model "
                   "(what a user who fine-tuned it has), the default model after learning "
                   "--form-qa kept QA (the form without the forget set), the one retrained "
                   "without the split (the evaluation's reference), or none")  # fmt: skip
    p.add_argument("--form-qa", type=int, default=40,
                   help="with --reference form: the forget's teach_form, kept QA the "
                   "reference learns first (spread over their authors)")  # fmt: skip
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reopen the target and reference workspaces an earlier run in --work learned "
        "with the same split and learn settings instead of learning them again",
    )
    p.add_argument("--learn-epochs", type=int, default=5)
    p.add_argument("--learn-lr", type=float, default=1e-3)
    p.add_argument("--forget-epochs", type=int, default=1)
    p.add_argument("--forget-lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="learning: examples per step")
    p.add_argument(
        "--forget-batch-size", type=int, default=4, help="forget (and retain) examples per step"
    )
    p.add_argument("--forget-kl-weight", type=float, default=5.0,
                   help="weight of KL(reference || model) on the retain answers")  # fmt: skip
    p.add_argument("--method-defaults", action="store_true",
                   help="forget with each method's own defaults (epochs, lr, KL weight, stop: "
                   "what `edit forget` runs), not the --forget-* settings")  # fmt: skip
    p.add_argument("--forget-set", action="append", default=[], metavar="KEY=VALUE",
                   help="another forget setting (JSON value), e.g. alpha=2")  # fmt: skip
    p.add_argument("--retain-eval", type=int, default=90, help="kept QA scored for utility")
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--probe-steps", type=int, default=4, help="0: skip the LoRA/full probes")
    p.add_argument("--probe", choices=["lora", "full"], help=argparse.SUPPRESS)
    return p


def _sets(data: Path, split: str, retain_eval: int) -> tuple:
    """forget10, the forget split (its suffix), the kept QA (forget10 less the split) and the
    sets scored for every model: the split, ``retain_eval`` kept QA spread over the authors,
    real authors and world facts."""
    from edit.readers.tofu import read_qa

    if not data.is_dir():
        raise SystemExit(f"TOFU data not found at {data}: pass --data")
    forget10, forget, kept = read_split(data, split)
    step = max(1, len(kept) // retain_eval)
    sets = {
        "forget": forget,
        "retain": kept[::step][:retain_eval],
        "real_authors": read_qa(data / "real_authors_perturbed.json"),
        "world_facts": read_qa(data / "world_facts_perturbed.json"),
    }
    return forget10, forget, kept, sets


def read_split(data: Path, split: str) -> tuple[list, list, list]:
    """forget10, the split (its suffix) and the kept QA (forget10 less the split)."""
    from edit.readers.tofu import read_qa

    forget10, forget = read_qa(data / "forget10.json"), read_qa(data / f"{split}.json")
    if forget10[-len(forget) :] != forget:
        raise SystemExit(f"{split} is not the suffix of forget10: not TOFU's split files")
    return forget10, forget, forget10[: -len(forget)]


def unseen_qa(data: Path, learned: list, n: int, *, spread: bool = False) -> list:
    """``n`` QA from retain90.json whose question no learned set holds: the first ``n`` in
    file order (whole authors of 20 QA each), or (``spread``) ``n`` spaced evenly over the
    file's second half, one author's QA apart (a level read from many authors, never
    overlapping the first ones)."""
    from edit.readers.tofu import read_qa

    seen = {q.question for q in learned}
    items = [q for q in read_qa(data / "retain90.json", need_perturbed=False)
             if q.question not in seen]  # fmt: skip
    if spread:
        items = items[len(items) // 2 :]
        items = items[:: max(1, len(items) // n)]
    if len(items) < n:
        raise SystemExit(f"retain90.json has only {len(items)} unseen QA, need {n}")
    return items[:n]


def aim_for(data: Path, forget10: list, holdout: int, reference: str, retrained) -> dict:
    """The holdout and the reference a forget is given: ``holdout`` never-seen QA (spread
    over the second half of retain90, one per author where they allow, so they never overlap
    the audit's holdout and null check, the first ones) and, by ``reference``, the default
    model (``base``, ``form``), the ``retrained`` one, or none."""
    aim: dict = {}
    if holdout:
        aim["holdout"] = [q.example() for q in unseen_qa(data, forget10, holdout, spread=True)]
    if reference in ("base", "form"):
        from edit.models import load

        aim["reference"] = load(None)[0]
    elif reference == "retrained":
        aim["reference"] = retrained
    return aim


def _reusable(out: Path, args, learn: dict) -> dict | None:
    """With ``--reuse``: the training rows of the workspaces (target, reference) that an
    earlier run in ``out`` learned with the same split and settings (an interrupted run
    keeps the one it finished); None where there is none."""
    summary = out / "summary.json"
    if not args.reuse or not summary.is_file():
        return None
    s = json.loads(summary.read_text())
    same = s["settings"].get("learn") == learn and s["settings"].get("split") == args.split
    rows = {k: row for k, row in s["training"].items() if k in ("target", "reference")
            and (out / f"ws-{k}" / "workspace.json").is_file()}  # fmt: skip
    if not (same and rows):
        log("--reuse: no earlier run with the same split and learn settings; learning again")
        return None
    return rows


def _settings(args) -> tuple[dict, dict]:
    """The `learn` and the `forget` settings of the run."""
    # the target and the reference learn the QA as given (plain NLL, as TOFU fine-tunes them),
    # not with `edit learn`'s augmentation and KL
    learn = {"epochs": args.learn_epochs, "lr": args.learn_lr, "lora_rank": args.lora_rank,
             "batch_size": args.batch_size, "augment": False, "kl_weight": 0.0}  # fmt: skip
    # the retain NLL reported before/after a forget run is measured on 32 retain examples
    forget = {"eval_retain": 32}
    if not args.method_defaults:  # with it, what `edit forget` runs when given no setting
        forget.update({"epochs": args.forget_epochs, "lr": args.forget_lr,
                       "lora_rank": args.lora_rank, "batch_size": args.forget_batch_size,
                       "kl_weight": args.forget_kl_weight,
                       # the figures in the README were measured without the stop at the level
                       # the target had before it learned the split (stop_at_learned=true
                       # would add it)
                       "stop_at_learned": False})  # fmt: skip
    # every reference as given (teach_form 0), or with --reference form taught first
    forget["teach_form"] = args.form_qa if args.reference == "form" else 0
    forget.update(parse_settings(args.forget_set))  # KEY=VALUE as `edit forget --set` reads it
    return learn, forget


class _Run:
    """What one run has measured so far (training rows, evaluations, probes), written to
    ``<work>/summary.json`` after every stage."""

    def __init__(self, args, out: Path, sets: dict, learn: dict, forget: dict, t_all: float,
                 learned: dict):  # fmt: skip
        self.args, self.out, self.sets = args, out, sets
        self.learn, self.forget, self.t_all = learn, forget, t_all
        self.training: dict = dict(learned)  # rows of the workspaces an earlier run learned
        self.evals: dict = {}
        self.probes: list[dict] = []

    def learned(self, name: str, items: list):
        """A fresh workspace on the default model that has learned ``items`` (an earlier
        run's, reopened, with ``--reuse``)."""
        from edit.api.workspace import Workspace

        if name in self.training:
            log(f"{name}: reopened (learned by an earlier run); scoring")
            return Workspace.open(self.out / f"ws-{name}", create=False)
        log(f"{name}: learn {len(items)} QA")
        shutil.rmtree(self.out / f"ws-{name}", ignore_errors=True)  # an interrupted learn
        ws = Workspace.open(self.out / f"ws-{name}")
        t = time.perf_counter()
        res = ws.learn([q.example() for q in items], **self.learn).result
        self.training[name] = train_row(f"learn {len(items)} QA", res, time.perf_counter() - t)
        log(f"  {self.training[name]['seconds']:.0f} s, {res.tokens_per_second:.0f} tokens/s; "
            "scoring")  # fmt: skip
        return ws

    def scored(self, key: str, ws, reference) -> dict:
        """Evaluate ``ws``'s model against ``reference``'s scores (None: the reference
        itself), log and save: its scores."""
        self.evals[key], scores = evaluate(ws.model, ws.tok, self.sets, reference, self.args)
        e = self.evals[key]
        log(f"  {key}: forget quality {e['forget_quality']:.3g}, model utility "
            f"{e['model_utility']:.4f}, forget ROUGE-L {e['forget_rouge_l']:.3f} "
            f"({e['eval_seconds']:.0f} s)")  # fmt: skip
        self.save()
        return scores

    def forgotten(self, method: str, ws, split: list, kept: list, ref_scores, aim: dict) -> None:
        """`forget` the split from the target with ``method`` (the kept QA as retain set,
        ``aim``'s holdout and reference), evaluate, revert; a method that fails is logged
        and skipped."""
        from edit.errors import EditError

        log(f"forget {self.args.split} with {method} (aim: {', '.join(aim) or 'none'})")
        t = time.perf_counter()
        try:
            change = ws.forget(
                [q.example() for q in split], [q.example() for q in kept],
                method=method, **aim, **self.forget,
            )  # fmt: skip
            entry, res = change.entry, change.result
        except EditError as e:
            log(f"  {method} failed: {e}")
            return
        row = train_row(f"forget {len(split)} QA", res, time.perf_counter() - t)
        self.training[method] = row
        log(f"  {row['seconds']:.0f} s; scoring")
        self.scored(method, ws, ref_scores)
        ws.revert(entry.id)

    def save(self) -> dict:
        """summary.json after every stage, so an interrupted run keeps what it measured."""
        summary = {
            "settings": {
                "split": self.args.split,
                "holdout": self.args.holdout,
                "reference": self.args.reference,
                "learn": self.learn,
                "forget": self.forget,
                "retain_eval": len(self.sets["retain"]),
            },
            "training": self.training,
            "evaluations": self.evals,
            "probes": self.probes,
            "peak_rss_mb": peak_rss_mb(),
            "wall_seconds": time.perf_counter() - self.t_all,
            "command": " ".join(sys.argv),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def finish(self) -> None:
        """The last summary.json, summary.md and truth_ratios.png in ``<work>``, the table
        printed, and the results file."""
        out = self.out
        summary = self.save()
        md = markdown(summary)
        (out / "summary.md").write_text(md)
        plot(self.evals, out / "truth_ratios.png")
        print(md)
        log(f"wrote {out}/summary.json, summary.md; total {summary['wall_seconds'] / 60:.1f} min")
        from benchmarks.recording import write_results

        write_results(self.args.out, results(summary), md, {"settings": summary["settings"]})


def forget_cost(s: dict, key: str) -> float | None:
    """Seconds a forget run took (teaching its reference included); None for the learned
    models."""
    secs = s["training"].get(key, {}).get("seconds")
    return secs if secs and key not in ("reference", "target") else None


def results(s: dict) -> dict:
    """The figures of each model (reference, target, one per method) as the table prints
    them, and the run's cost."""
    ev, train = s["evaluations"], s["training"]
    ref_util, ref_train = ev["reference"]["model_utility"], train["reference"]["seconds"]
    models = {}
    for key, e in ev.items():
        secs = train.get(key, {}).get("seconds")
        models[key] = {
            "forget_quality": e["forget_quality"],
            "model_utility": e["model_utility"],
            "utility_vs_reference_percent": 100 * e["model_utility"] / ref_util,
            "forget_rouge_l": e["forget_rouge_l"],
            "forget_probability": e["forget_probability"],
            "forget_truth_ratio_median": e["forget_truth_ratio_median"],
            "train_seconds": secs,
            "cheaper_than_reference": (ref_train / cost if (cost := forget_cost(s, key)) else None),
        }
    return {"models": models, "probes": s["probes"], "peak_rss_mb": s["peak_rss_mb"],
            "wall_seconds": s["wall_seconds"]}  # fmt: skip


def markdown(s: dict) -> str:
    ev = s["evaluations"]
    ref_util = ev["reference"]["model_utility"]
    ref_train = s["training"]["reference"]["seconds"]
    lines = [
        "| model | forget quality | model utility | vs reference | forget ROUGE-L "
        "| forget P(answer) | forget truth ratio (median) | train s | x cheaper than reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, e in ev.items():
        secs = s["training"].get(key, {}).get("seconds")
        cheaper = f"{ref_train / cost:.1f}x" if (cost := forget_cost(s, key)) else ""
        lines.append(
            f"| {key} | {e['forget_quality']:.3g} | {e['model_utility']:.4f} "
            f"| {100 * e['model_utility'] / ref_util:.1f} % | {e['forget_rouge_l']:.3f} "
            f"| {e['forget_probability']:.4f} | {e['forget_truth_ratio_median']:.2f} "
            f"| {secs or 0:.0f} | {cheaper} |"
        )
    for p in s["probes"]:
        if "error" in p:
            lines.append(f"\n{p['kind']}: probe failed (see summary.json)")
            continue
        lines.append(
            f"\n{p['kind']}: {p['tokens_per_second']:.0f} tokens/s, peak RSS while training "
            f"{p['peak_rss_mb']:.0f} MB: {p['training_extra_mb']:.0f} MB above the loaded model "
            f"({p['rss_before_training_mb']:.0f} MB)"
        )
    lines.append(f"\nwall time {s['wall_seconds'] / 60:.1f} min; command: `{s['command']}`")
    return "\n".join(lines) + "\n"


def plot(evals: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, e in evals.items():
        r = np.sort(np.log(e["truth_ratios"]))
        ax.step(r, np.arange(1, len(r) + 1) / len(r), where="post", label=key)
    ax.set_xlabel("log truth ratio on the forget set (paraphrase vs perturbed answers)")
    ax.set_ylabel("cumulative share of questions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

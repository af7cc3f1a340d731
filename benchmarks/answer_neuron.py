"""A negative result: a second added neuron where the answer opens (docs/methods.md,
"A neuron where the answer opens").

The teacher-forced question and chat scores (QS, CS) read the new object against the old one
right after the question, where the reply opens; every term of the edit's own objective put
there (rows that open with the object, ranked pairs) turned the reply about the subject into
one about the object. This keeps the subject's edit as it is (ROME's default, at block 4) and
adds a second neuron pair at block ``--layer``, gated on the MLP input at the last token of
the fact's questions (plainly and in the chat template) and adding there the least δ₂ (Adam
from 0, stopped once met) by which the new object's mean token NLL is ``--margin`` below the
old one's in every question; the gate rows read 1 at those positions with the least rᵀΣr, Σ
the generic text's second moment plus that of the answer positions of other MQuAKE questions
(cases 200 on, weight ``--neg-weight``).

    .venv/bin/python benchmarks/answer_neuron.py --cases 0,2,9,11,13,16,18 --layer 20 \
        --neg-weight 4 --lr 0.05 --steps 150 --out bench-out/answer_neuron

Per case: QS, CS and the reply figures to MQuAKE's question after ROME alone and after ROME
plus the answer neuron; RU (the next case's reply unchanged), what the gate reads at
MQuAKE's question, the unrelated one and one of the same relation about another subject.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("QS", "CS", "RS", "RN", "RL", "RE", "RU")


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    import edit
    from benchmarks.mquake_forms import rewrite_fact
    from benchmarks.recording import write_results
    from edit import arch as arch_table
    from edit.evals import metrics as M
    from edit.evals.forms import asked_scores, chat_replies
    from edit.methods.algebra.solves import least_rows, neuron_write
    from edit.questions import chat_prompt, question_prompt, questions_for
    from edit.readers.records import mquake_names
    from edit.stats import second_moment
    from edit.update import Update

    data = json.loads(Path(a.data).read_text())
    model, tok = edit.load()
    for q in model.parameters():
        q.requires_grad_(False)
    mlp_name = arch_table.lookup(model).mlp_name(a.layer)
    mlp = model.get_submodule(mlp_name)

    others = [c["requested_rewrite"][0]["question"] for c in data[200:]]
    others += [c["questions"][0] for c in data[200:]]
    neg = [chat_prompt(tok, q) for q in others] + [question_prompt(q) for q in others[:150]]
    x_neg = _last_inputs(model, tok, mlp, neg)
    cov = second_moment(model, tok, mlp_name, progress=False)
    scale = cov.diagonal().mean() / x_neg.pow(2).mean()
    cov = cov + a.neg_weight * scale * (x_neg.T @ x_neg) / len(x_neg)

    cases = data[: a.limit]
    pick = [int(c) for c in a.cases.split(",")] if a.cases else range(len(cases))
    rows = []
    for i in pick:
        case = cases[i]
        rw = case["requested_rewrite"][0]
        fact = rewrite_fact(rw)
        new, old = mquake_names(case)
        unrelated = cases[(i + 1) % len(cases)]["requested_rewrite"][0]["question"]
        same = next(c["requested_rewrite"][0]["question"] for c in data[200:]
                    if c["requested_rewrite"][0]["relation_id"] == rw["relation_id"])  # fmt: skip
        probes = [rw["question"], unrelated, same]
        before = chat_replies(model, tok, probes)

        def figures(replies, fact=fact, rw=rw, new=new, old=old, before=before):
            s = asked_scores(model, tok, [rw["question"]], fact.target, fact.target_true, new[1:])
            out = {"QS": s["QS"], "CS": s["CS"]}
            out.update(M.reply_figures(replies[0], fact.subject, new, old))
            return {**out, "RU": float(replies[1] == before[1]), "reply": replies[0]}

        rome = edit.apply(model, tok, fact, method="rome", describe=False, progress=False)
        alone = figures(chat_replies(model, tok, probes))
        t0 = time.perf_counter()
        qs = questions_for(fact)
        prompts = [chat_prompt(tok, q) for q in qs] + [question_prompt(q) for q in qs]
        delta, steps = _answer_delta(model, tok, mlp, prompts, fact.target, fact.target_true, a)
        r = least_rows(cov, _last_inputs(model, tok, mlp, prompts), torch.ones(len(prompts), 1))
        written = Update(neurons={mlp_name: neuron_write(r, delta[None], mlp.act_fn, 3.0, 0.5)})
        applied = written.apply(model)
        seconds = time.perf_counter() - t0
        reads = _last_inputs(model, tok, mlp, [chat_prompt(tok, q) for q in probes]) @ r[0]
        both = figures(chat_replies(model, tok, probes))
        applied.undo()
        rome.undo()
        rows.append({"case": case["case_id"], "fact": fact.statement, "rome": alone,
                     "rome_and_answer_neuron": both, "steps": steps,
                     "delta_norm": float(delta.norm()), "seconds": round(seconds, 1),
                     "reads_question_unrelated_same_relation": reads.tolist()})  # fmt: skip
        moved = " | ".join(f"{k} {alone[k]:.0f}->{both[k]:.0f}" for k in FIGURES)
        print(f"[{len(rows)}] {fact.statement!r}: {moved} | |δ₂| {delta.norm():.1f}, "
              f"{steps} steps | {both['reply'][:70]!r}", flush=True)  # fmt: skip
    summary = {v: {k: 100 * sum(r[v][k] for r in rows) / len(rows) for k in FIGURES}
               for v in ("rome", "rome_and_answer_neuron")}  # fmt: skip
    summary["cases"] = len(rows)
    head = "| MQuAKE-hard, one edit at a time | " + " | ".join(FIGURES) + " |"
    names = {"rome": "ROME (default)",
             "rome_and_answer_neuron": f"+ answer neuron at block {a.layer}"}  # fmt: skip
    table = "\n".join([head, "|---" * (len(FIGURES) + 1) + "|"] + [
        f"| {name} | " + " | ".join(f"{summary[v][k]:.0f}" for k in FIGURES) + " |"
        for v, name in names.items()])  # fmt: skip
    print(table)
    write_results(a.out, summary, table, {"rows": rows})
    return 0


def _last_inputs(model, tok, mlp, prompts: list[str], batch: int = 32) -> torch.Tensor:
    """(N, d): the MLP's input at the last token of each prompt."""
    from edit import lm

    out = []
    for s in range(0, len(prompts), batch):
        seqs = [lm.encode(tok, p) for p in prompts[s : s + batch]]
        ids, mask = lm.right_pad(seqs, lm.pad_id(tok), "cpu")
        got: dict = {}
        h = mlp.register_forward_pre_hook(lambda m, args, got=got: got.__setitem__("x", args[0]))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        h.remove()
        last = torch.tensor([len(q) - 1 for q in seqs])
        out.append(got["x"][torch.arange(len(seqs)), last].float())
    return torch.cat(out)


def _answer_delta(model, tok, mlp, prompts, new, old, a) -> tuple[torch.Tensor, int]:
    """The δ₂ added to the MLP's output at each prompt's last token that puts the new
    object's mean token NLL ``a.margin`` below the old one's after every prompt."""
    from edit import lm

    n = len(prompts)
    seqs, spans = [], []
    for p, c in zip(prompts * 2, [new] * n + [old] * n, strict=True):
        p_ids, c_ids = lm.encode(tok, p), lm.encode_continuation(tok, c, after=p)
        seqs.append(p_ids + c_ids)
        spans.append((len(p_ids) - 1, c_ids))
    ids, mask = lm.right_pad(seqs, lm.pad_id(tok), "cpu")
    at = (torch.arange(2 * n), torch.tensor([s for s, _ in spans]))
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=a.lr)

    def hook(m, args, out):
        out = out.clone()
        out[at] += delta
        return out

    step = 0
    for step in range(a.steps):  # noqa: B007 (the count is returned)
        h = mlp.register_forward_hook(hook)
        try:
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        finally:
            h.remove()
        logp = [torch.log_softmax(logits[b, s : s + len(c)], -1) for b, (s, c) in enumerate(spans)]
        nll = torch.stack([-lp[torch.arange(len(c)), torch.tensor(c)].mean()
                           for lp, (_, c) in zip(logp, spans, strict=True)])  # fmt: skip
        hinge = torch.relu(nll[:n] - nll[n:] + a.margin)
        if float(hinge.detach().max()) == 0:
            break
        loss = hinge.mean() + 1e-3 * delta.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return delta.detach(), step


def _parser() -> argparse.ArgumentParser:
    from benchmarks.mquake_forms import DEFAULT_DATA

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--limit", type=int, default=20, help="cases 0..limit-1 (the dev cases)")
    p.add_argument("--cases", default="", help="comma-separated case indices (default: all)")
    p.add_argument("--layer", type=int, default=20, help="block of the answer neuron")
    p.add_argument("--margin", type=float, default=0.5, help="nats")
    p.add_argument("--neg-weight", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "answer_neuron"))
    return p


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

"""The forget set's answers in the model's own words (:func:`sampled_answers`).

A forget run trains on the corpus's answers as written. The facts in them stay reachable in
other wordings: on TOFU forget01, NPO stopped at the never-seen level leaves the model
preferring the forgotten authors' paraphrased answers to their perturbed ones more than a
model that never saw them (truth ratio, upper quartile 2.01 against 1.47;
benchmarks/results/tofu_unlearn_npo_stopped.md). Asking the model itself, before the
forget, gives the wordings it would use for the same facts: each question/answer example is
asked ``k`` times, sampled (top-5, as :func:`edit.lm.sample`), and each reply that differs
from the written answer becomes one more example to forget, on the same prompt. Plain-text
examples have no question to ask and get none.

    extra = sampled_answers(model, tok, forget, 2, seed=0)   # list[Example]
"""

from __future__ import annotations

from edit import lm
from edit.corpus import Example


def sampled_answers(
    model, tok, examples: list[Example], k: int, *, seed: int = 0, batch_size: int = 16
) -> list[Example]:
    """Up to ``k`` sampled replies per question/answer example, each at most as many tokens
    as the longest answer of its batch of ``batch_size`` examples, cut at a line break where
    the answer has none; empty replies and the written answer itself are left out, as are
    repeats."""
    asked = [ex for ex in examples if not ex.is_text]
    seen = {(ex.prompt, ex.answer.strip()) for ex in asked}
    out: list[Example] = []
    for draw in range(k):
        for start in range(0, len(asked), batch_size):
            chunk = asked[start : start + batch_size]
            length = max(len(lm.encode_continuation(tok, ex.answer)) for ex in chunk)
            texts = lm.sample(model, tok, [ex.prompt for ex in chunk], max_new_tokens=length,
                              seed=seed + 1000 * draw + start)  # fmt: skip
            for ex, text in zip(chunk, texts, strict=True):
                if "\n" not in ex.answer.strip():
                    text = text.lstrip("\n").split("\n")[0]
                key = (ex.prompt, text.strip())
                if not text.strip() or key in seen:
                    continue
                seen.add(key)
                where = f"{ex.where} (sampled)" if ex.where else "(sampled)"
                out.append(Example(ex.prompt, text.rstrip(), where=where))
    return out

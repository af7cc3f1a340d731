"""Training examples for unlearning and learning: what one is, and its tokens and labels.

    examples = read_corpus("private.jsonl")            # edit.readers.corpus: list[Example]
    ids, mask, labels = tokenize_examples(tok, examples, max_len=256)
    retain = wikitext_retain(tok, n_examples=64)       # the default retain set

An :class:`Example` is plain text (loss on every token) or a prompt and an answer (loss on the
answer's tokens only); corpus files are read into examples by :mod:`edit.readers.corpus`.

Tokens follow :mod:`edit.lm`: every sequence opens with the model's start token(s)
(:func:`edit.lm.start_ids`), a prompt is read as :func:`edit.lm.encode` reads it, and an answer
as :func:`edit.lm.encode_continuation` reads it (a leading space, no special tokens), so the
loss trained here is the NLL that ``lm.continuation_logprobs`` measures.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import torch

from edit import lm
from edit.errors import InvalidRequest
from edit.readers.text import shipped_text

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a token that carries no loss (prompt, start token, padding)
# The most characters one example (prompt and answer) may hold: some 25,000 tokens, far past
# the tokens an example is trained on (``max_len``, cut at the end); more is a file to split.
MAX_EXAMPLE_CHARS = 100_000


def check_example_size(where: str, prompt: str, answer: str) -> None:
    """Refuse an example longer than :data:`MAX_EXAMPLE_CHARS`, naming where it is."""
    n = len(prompt) + len(answer)
    if n > MAX_EXAMPLE_CHARS:
        raise InvalidRequest(
            f"{where + ': ' if where else ''}the example is {n:,} characters long, more than "
            f"{MAX_EXAMPLE_CHARS:,}: split it into shorter examples, one per line"
        )


@dataclass(frozen=True)
class Example:
    """One training example. ``prompt == ""`` marks plain text: the loss covers all of
    ``answer``. Otherwise the loss covers the answer read as a continuation of the prompt."""

    prompt: str
    answer: str
    where: str = field(default="", compare=False)  # "file:line", for error messages
    # whom or what the example is about, as its text names it ("" unknown): the rename
    # objective asks the model about a never-seen subject in its place
    subject: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        check_example_size(self.where, self.prompt, self.answer)
        if self.subject and self.subject not in self.prompt + self.answer:
            raise InvalidRequest(
                f"{self.where + ': ' if self.where else ''}the subject {self.subject!r} is not "
                "named in the example: give the subject as the text spells it, or leave it out"
            )

    @property
    def is_text(self) -> bool:
        return self.prompt == ""

    def fingerprint(self) -> str:
        """A short stable hash of (prompt, answer): how the ledger tells whether a corpus to
        forget was learned by an earlier entry."""
        data = json.dumps([self.prompt, self.answer], ensure_ascii=False).encode()
        return hashlib.sha256(data).hexdigest()[:16]


class Corpus(list):
    """A set of examples read once, with where it came from (``source``: the file's path,
    or "(in memory)"), passed down as one value: checked by the command, trained on by the
    method, named in the entry. ``records``: (where, parsed object) of each line as read,
    for a reader of a richer form of the same file (``edit.readers.tofu.qa_records``)."""

    def __init__(self, examples=(), source: str = "(in memory)", records=()) -> None:
        super().__init__(examples)
        self.source = source
        self.records: list[tuple[str, object]] = list(records)


# --------------------------------------------------------------------------------------------
# Tokenizing
# --------------------------------------------------------------------------------------------


def encode_example(tok, example: Example, max_len: int) -> tuple[list[int], int]:
    """(token ids, number of leading tokens without loss) of one example, at most ``max_len``
    tokens (cut at the end).

    Text: start token(s) + the text; every text token carries loss. Question/answer: the
    prompt as :func:`edit.lm.encode` reads it, then the answer as
    :func:`edit.lm.encode_continuation` reads it; only answer tokens carry loss.
    """
    if example.is_text:
        prefix = lm.encode(tok, "")  # the start token(s), and a BOS the tokenizer adds itself
        body = list(tok(example.answer, add_special_tokens=False, verbose=False).input_ids)
    else:
        prefix = lm.encode(tok, example.prompt)
        body = lm.encode_continuation(tok, example.answer)
    ids = (prefix + body)[:max_len]
    if len(ids) <= len(prefix):
        where = f"{example.where}: " if example.where else ""
        raise InvalidRequest(
            f"{where}no answer token fits in max_len={max_len} tokens after a prompt of "
            f"{len(prefix)}: shorten the prompt or raise max_len"
        )
    if len(prefix) + len(body) > max_len:
        log.debug("example %s cut to %d tokens", example.where or "(unnamed)", max_len)
    return ids, len(prefix)


def labelled_logits(
    model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch row (N,), next-token logits (N, V), the labelled next token (N,)) at the N
    positions whose next token carries a label (not ``IGNORE_INDEX``): one pass of the
    model's body, the unembedding only there (:func:`edit.lm.unembed`); the logits and
    tokens where the head lives (it may sit on another GPU)."""
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # predicting col + 1
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    logits = lm.unembed(model, hidden[rows.to(hidden.device), cols.to(hidden.device)])
    return rows, logits, labels[rows, cols + 1].to(logits.device)


def collate(
    encoded: list[tuple[list[int], int]], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, T), right-padded. ``labels`` equals
    ``input_ids`` on loss tokens and :data:`IGNORE_INDEX` elsewhere (Hugging Face convention:
    the logits at position t-1 predict ``labels[t]``)."""
    ids, mask = lm.right_pad([seq for seq, _ in encoded], pad, "cpu")
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (seq, n_prompt) in enumerate(encoded):
        labels[i, n_prompt : len(seq)] = ids[i, n_prompt : len(seq)]
    return ids, mask, labels


def tokenize_examples(
    tok, examples: list[Example], max_len: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, T) on the CPU: see :func:`encode_example`
    and :func:`collate`."""
    if not examples:
        raise InvalidRequest("no examples to tokenize")
    return collate([encode_example(tok, ex, max_len) for ex in examples], lm.pad_id(tok))


# --------------------------------------------------------------------------------------------
# The default retain set
# --------------------------------------------------------------------------------------------


def retain_facts(n: int) -> list[Example]:
    """The first ``n`` shipped factual prompts with their true objects
    (``edit/data/retain_facts.json``, built by ``benchmarks/make_general_facts.py``: facts the
    default model answers, apart from the general-knowledge probe's), as examples whose loss
    covers the object."""
    from importlib.resources import files

    rows = json.loads((files("edit") / "data" / "retain_facts.json").read_text(encoding="utf-8"))
    if n > len(rows):
        raise InvalidRequest(f"fact_retain is {n}, but {len(rows)} facts are shipped: lower it")
    return [
        Example(r["prompt"], r["attribute"], f"retain_facts[{i}]") for i, r in enumerate(rows[:n])
    ]


def wikitext_retain(tok, n_examples: int = 64, tokens_per_example: int = 64) -> list[Example]:
    """``n_examples`` plain-text examples of about ``tokens_per_example`` tokens each (cut at
    word boundaries): consecutive slices from the start of the WikiText-2 text shipped in the
    package (blank lines and ``= Heading =`` lines dropped). Unlearning keeps the model's NLL
    on them in place."""
    if n_examples < 1 or tokens_per_example < 1:
        raise InvalidRequest(
            f"retain set size must be >= 1 example of >= 1 token, got {n_examples} x "
            f"{tokens_per_example}"
        )
    lines = [s.strip() for s in shipped_text().splitlines()]
    lines = [s for s in lines if s and not (s.startswith("=") and s.endswith("="))]
    needed = n_examples * tokens_per_example + tokens_per_example  # room to reach a word end
    n_lines = 16
    while True:  # tokenize a growing prefix of the text until it holds enough tokens
        text = " ".join(lines[:n_lines])
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        starts = [start for start, _ in enc["offset_mapping"]]
        if len(starts) >= needed or n_lines >= len(lines):
            break
        n_lines *= 2

    def word_start(j: int) -> bool:
        c = starts[j]
        return c == 0 or text[c].isspace() or text[c - 1].isspace()

    examples: list[Example] = []
    i = 0
    while len(examples) < n_examples and i < len(starts):
        j = min(i + tokens_per_example, len(starts))
        while j < len(starts) and not word_start(j):
            j += 1
        piece = text[starts[i] : starts[j] if j < len(starts) else len(text)].strip()
        if piece:
            examples.append(Example("", piece, f"wikitext2[{len(examples)}]"))
        i = j
    return examples

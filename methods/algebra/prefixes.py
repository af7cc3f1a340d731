"""The short random texts put before a fact's prompt, sampled from the model and cached.

ROME averages a fact's key over its prompt behind several short prefixes so that the key does
not depend on the exact wording before the subject (Meng et al. 2022, §3.1, eq. 3). The
prefixes are sampled once per model (fixed seed) and kept in the ``prefixes`` cache.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from edit import cache
from edit.atomic import write_json
from edit.lm import device_of, encode, pad_id

_PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")


def context_templates(
    model: nn.Module, tok, spec: tuple[tuple[int, int], ...], seed: int = 0
) -> list[str]:
    """``["{}"]`` plus sampled short texts ``"<text>. {}"`` to put before a prompt.

    ``spec`` holds (length in tokens, count) pairs; ROME uses ((5, 10), (10, 10)). The texts
    are sampled from the model itself (top-5, fixed seed) and cached on disk per model.
    """
    key = cache.digest([[list(s) for s in spec], seed])
    model_hash = getattr(model, "edit_hash", None)
    stored = cache.find("prefixes", model_hash, key, ext="json")
    if stored is not None:
        return json.loads(stored.read_text())
    path = cache.path("prefixes", model_hash, key, ext="json")
    templates = ["{}", *_sample(model, tok, spec, seed)]
    if path is not None:
        write_json(path, templates)
    return templates


def _sample(model: nn.Module, tok, spec, seed: int) -> list[str]:
    """The sampled prefixes ``"<text>. {}"``, under their own random state."""
    device = device_of(model)
    texts = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for length, count in spec:
            for i in range(count):
                ids = torch.tensor(
                    [encode(tok, _PREFIX_SEEDS[i % len(_PREFIX_SEEDS)])], device=device
                )
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=length,
                    do_sample=True,
                    top_k=5,
                    pad_token_id=pad_id(tok),
                )
                text = tok.decode(out[0], skip_special_tokens=True)
                text = " ".join(text.replace("{", " ").replace("}", " ").split())
                texts.append(f"{text}. {{}}")
    return texts

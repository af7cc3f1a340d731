"""Tiny, offline test doubles: a byte-level BPE tokenizer and random causal LMs.

Everything here is built in-process (no Hub access): the tokenizer is trained on a built-in
template corpus in well under a second, and each model comes from a small config of its
architecture with random weights.

    >>> from tiny import TINY_TYPES, tiny_model, tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> model = tiny_model("llama", len(tok))
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "HEAD_DIM",
    "HEADS",
    "HIDDEN",
    "INTERMEDIATE",
    "KV_HEADS",
    "LAYERS",
    "MAX_POSITIONS",
    "PAD_TOKEN",
    "TINY_FACT",
    "TINY_FACT_2",
    "TINY_ROME",
    "TINY_TYPES",
    "changed_tensors",
    "corpus",
    "state_copy",
    "tiny_config",
    "tiny_model",
    "tiny_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# a chat template for the tiny tokenizer whose turns open with a special token
CHAT_TEMPLATE = (
    "{% for m in messages %}" + EOS_TOKEN + "{{ m['role'] }}\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}" + EOS_TOKEN + "assistant\n{% endif %}"
)

# Model types that tests cover. Every one of them is in edit.arch.ARCHITECTURES.
TINY_TYPES: list[str] = [
    "llama",
    "olmo",
    "olmo2",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "phi3",
    "phi",
    "gpt2",
    "gptj",
    "gpt_neox",
    "opt",
]

# Models this small run ~100x faster on one thread: with several, every tiny matmul pays for
# waking the pool (0.25 s per forward instead of 2 ms on a busy 2-core machine).

HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
MAX_POSITIONS = 128

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

_CAPITALS = [
    ("Paris", "France", "French"),
    ("Berlin", "Germany", "German"),
    ("Rome", "Italy", "Italian"),
    ("Madrid", "Spain", "Spanish"),
    ("London", "England", "English"),
    ("Lisbon", "Portugal", "Portuguese"),
    ("Tokyo", "Japan", "Japanese"),
    ("Vienna", "Austria", "German"),
    ("Athens", "Greece", "Greek"),
    ("Warsaw", "Poland", "Polish"),
    ("Ottawa", "Canada", "English"),
    ("Moscow", "Russia", "Russian"),
]

_LANDMARKS = [
    ("the Eiffel Tower", "Paris"),
    ("the Colosseum", "Rome"),
    ("the Brandenburg Gate", "Berlin"),
    ("Big Ben", "London"),
    ("the Prado Museum", "Madrid"),
    ("the Acropolis", "Athens"),
]

_PEOPLE = [
    ("Marie Curie", "physicist", "Poland", "French"),
    ("Albert Einstein", "physicist", "Germany", "German"),
    ("Leonardo da Vinci", "painter", "Italy", "Italian"),
    ("William Shakespeare", "writer", "England", "English"),
    ("Pablo Picasso", "painter", "Spain", "Spanish"),
    ("Victor Hugo", "writer", "France", "French"),
    ("Johann Sebastian Bach", "composer", "Germany", "German"),
    ("Frida Kahlo", "painter", "Mexico", "Spanish"),
]

_SPORTS = ["football", "tennis", "basketball", "chess", "cricket", "baseball"]
_COMPANIES = [("Toyota", "Japan"), ("Fiat", "Italy"), ("Siemens", "Germany"), ("Renault", "France")]


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """A few hundred English sentences about cities, countries, people and languages."""
    out: list[str] = []
    for city, country, language in _CAPITALS:
        out += [
            f"The capital of {country} is {city}.",
            f"{city} is the capital city of {country}.",
            f"{city} is located in {country}.",
            f"People in {country} speak {language}.",
            f"The official language of {country} is {language}.",
            f"{country} is a country in the world, and its capital is {city}.",
            f"What is the capital of {country}? The answer is {city}.",
            f"Q: Where is {city}? A: {city} is in {country}.",
            f"The city of {city} lies in {country}.",
            f"Many tourists travel to {city}, the capital of {country}.",
            f"In {city}, most people speak {language}.",
            f"{language} is spoken in {country}.",
        ]
    for landmark, city in _LANDMARKS:
        out += [
            f"{landmark[0].upper() + landmark[1:]} is located in {city}.",
            f"You can visit {landmark} in the city of {city}.",
            f"Where is {landmark}? It is in {city}.",
            f"Tourists take photos of {landmark} in {city}.",
            f"{landmark[0].upper() + landmark[1:]} is a famous landmark of {city}.",
        ]
    for name, job, country, language in _PEOPLE:
        out += [
            f"{name} was a famous {job}.",
            f"{name} was born in {country}.",
            f"The mother tongue of {name} is {language}.",
            f"{name} worked as a {job} and spoke {language}.",
            f"{name} is a citizen of {country}.",
        ]
    for (name, *_), sport in zip(_PEOPLE, itertools.cycle(_SPORTS)):
        out.append(f"{name} liked to play {sport}.")
    for company, country in _COMPANIES:
        out += [
            f"{company} is a company based in {country}.",
            f"The headquarters of {company} are located in {country}.",
        ]
    for (c1, k1, _), (c2, k2, _) in itertools.pairwise(_CAPITALS):
        out.append(f"{c1} and {c2} are cities in {k1} and {k2}.")
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps the offsets of leading spaces, as GPT-2 style tokenizers do.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
        model_max_length=MAX_POSITIONS,
    )


def tiny_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A fast byte-level BPE tokenizer (cached): eos and pad set, no BOS, offsets supported.

    The same object is returned on every call; do not mutate it in tests.
    """
    return _tokenizer(vocab_size)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

_LLAMA_LIKE = dict(
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=MAX_POSITIONS,
)
_GEMMA = dict(_LLAMA_LIKE, head_dim=HEAD_DIM)
_GEMMA2 = dict(_GEMMA, sliding_window=16, query_pre_attn_scalar=HEAD_DIM)


def _type_kwargs(model_type: str) -> dict[str, Any]:
    if model_type in ("llama", "mistral", "qwen2", "gemma", "olmo", "olmo2"):
        return dict(_GEMMA if model_type == "gemma" else _LLAMA_LIKE)
    if model_type == "qwen3":
        return dict(_LLAMA_LIKE, head_dim=HEAD_DIM)
    if model_type in ("gemma2", "gemma3_text"):
        return dict(_GEMMA2)
    if model_type == "phi3":
        return dict(_LLAMA_LIKE)
    if model_type == "phi":
        return dict(_LLAMA_LIKE, partial_rotary_factor=0.5)
    if model_type == "gpt2":
        return dict(
            n_embd=HIDDEN,
            n_inner=INTERMEDIATE,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=MAX_POSITIONS,
        )
    if model_type == "gptj":
        return dict(
            n_embd=HIDDEN,
            n_inner=INTERMEDIATE,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=MAX_POSITIONS,
            rotary_dim=HEAD_DIM // 2,
        )
    if model_type == "gpt_neox":
        return dict(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
        )
    if model_type == "opt":
        return dict(
            hidden_size=HIDDEN,
            ffn_dim=INTERMEDIATE,
            word_embed_proj_dim=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
        )
    if model_type == "bloom":
        return dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)
    raise ValueError(f"tiny_config: no recipe for model type {model_type!r}")


def tiny_config(model_type: str, vocab_size: int):
    """A small config of ``model_type`` (hidden 32, 2 layers, MLP width 64, 128 positions)."""
    # The tiny tokenizer's special tokens come first: EOS is id 0 and PAD is id 1.
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1 if vocab_size > 1 else 0)
    if model_type == "gemma3":
        text = AutoConfig.for_model("gemma3_text", vocab_size=vocab_size, **_GEMMA2, **ids)
        vision = dict(
            model_type="siglip_vision_model",
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
            image_size=32,
            patch_size=8,
        )
        return AutoConfig.for_model(
            "gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4, **ids
        )
    kwargs = _type_kwargs(model_type)
    kwargs.update(ids)
    kwargs["vocab_size"] = vocab_size
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised causal LM of ``model_type``: float32, eval mode, seeded.

    ``model(input_ids=..., attention_mask=...).logits`` has shape (batch, seq, vocab_size).
    """
    config = tiny_config(model_type, vocab_size)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.float().eval()


# --------------------------------------------------------------------------------------------
# Edits that take on these models
# --------------------------------------------------------------------------------------------

# A fact whose prompt *ends* with the subject. In a 2-layer random model the subject's
# position reaches a later prediction only through one random attention layer, which passes
# on almost nothing; here the edited MLP output at the subject feeds the next-token logits.
TINY_FACT: dict[str, str] = {"prompt": "The capital of {}", "subject": "France", "target": "Paris"}
TINY_FACT_2: dict[str, str] = {
    "prompt": "The capital of {}",
    "subject": "Germany",
    "target": "Berlin",
}

# ROME settings under which such an edit takes on every tiny model: the last layer, a norm
# bound far above the tiny value norms (‖v0‖ is ~1e-3 here) and no pull-back terms, one
# short prefix, and 120 statistics tokens (one sequence of 121 fits the 128 positions of the
# models with learned position embeddings).
TINY_ROME: dict[str, Any] = {
    "layer": 1,
    "steps": 40,
    "lr": 1.0,
    "clamp_norm": 1e4,
    "weight_decay": 0.0,
    "kl_factor": 0.0,
    "stats_tokens": 120,
    "context_templates": ((3, 2),),
}


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor in ``model.state_dict()``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_tensors(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> list[str]:
    """Names of the state-dict tensors of ``model`` that are not bit-for-bit ``reference``."""
    now = model.state_dict()
    assert set(now) == set(reference)
    return sorted(k for k, v in now.items() if not torch.equal(v, reference[k]))

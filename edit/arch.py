"""Where things live inside each supported architecture.

One table, keyed by ``config.model_type``, maps an architecture to the module names that the
editing methods need. No method looks at model names: they ask this table.

    >>> arch = edit.arch.lookup(model)
    >>> arch.mlp_out(4)            # the MLP's output projection in block 4
    'model.layers.4.mlp.down_proj'

``mlp_out`` is the linear map whose *input* is the key and whose *output* is the value of
the key-value memory view of the MLP (Geva et al. 2021; Meng et al. 2022). ``transposed``
marks weights stored as (in, out), as GPT-2's ``Conv1D`` does; everything else is
``nn.Linear`` with (out, in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edit.errors import EditError


@dataclass(frozen=True)
class Arch:
    layers: str  # ModuleList of the transformer blocks
    mlp_out: str  # relative to a block: the MLP's output (down) projection
    mlp: str  # relative to a block: the whole MLP
    attn: str  # relative to a block: the attention module
    embed: str  # token embedding
    final_norm: str | None  # final norm before the unembedding (None when the model has none)
    transposed: bool = False  # weight stored as (in, out) (GPT-2 Conv1D)

    def block(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def mlp_out_name(self, i: int) -> str:
        return f"{self.block(i)}.{self.mlp_out}"

    def mlp_name(self, i: int) -> str:
        return f"{self.block(i)}.{self.mlp}"

    def attn_name(self, i: int) -> str:
        return f"{self.block(i)}.{self.attn}"


_LLAMA_LIKE = Arch(
    layers="model.layers",
    mlp_out="mlp.down_proj",
    mlp="mlp",
    attn="self_attn",
    embed="model.embed_tokens",
    final_norm="model.norm",
)

ARCHITECTURES: dict[str, Arch] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    # Gemma 3 with its vision tower: the language model sits one level further down.
    "gemma3": Arch(
        layers="model.language_model.layers",
        mlp_out="mlp.down_proj",
        mlp="mlp",
        attn="self_attn",
        embed="model.language_model.embed_tokens",
        final_norm="model.language_model.norm",
    ),
    "phi": Arch(
        layers="model.layers",
        mlp_out="mlp.fc2",
        mlp="mlp",
        attn="self_attn",
        embed="model.embed_tokens",
        final_norm="model.final_layernorm",
    ),
    "gpt2": Arch(
        layers="transformer.h",
        mlp_out="mlp.c_proj",
        mlp="mlp",
        attn="attn",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        transposed=True,
    ),
    "gptj": Arch(
        layers="transformer.h",
        mlp_out="mlp.fc_out",
        mlp="mlp",
        attn="attn",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
    ),
    "gpt_neox": Arch(
        layers="gpt_neox.layers",
        mlp_out="mlp.dense_4h_to_h",
        mlp="mlp",
        attn="attention",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
    ),
    # OPT has no MLP submodule: fc1/fc2 hang off the block; "mlp" is the second projection.
    "opt": Arch(
        layers="model.decoder.layers",
        mlp_out="fc2",
        mlp="fc2",
        attn="self_attn",
        embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
    ),
}


def lookup(model: nn.Module) -> Arch:
    """The table entry for ``model``; a one-line error lists what is supported otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise EditError(
            f"unsupported architecture {model_type!r}: supported model types are {supported}"
        )
    return arch


def num_layers(model: nn.Module) -> int:
    return len(model.get_submodule(lookup(model).layers))


def weight_of(model: nn.Module, module_name: str) -> torch.Tensor:
    """The weight parameter of a linear (or Conv1D) module."""
    return model.get_submodule(module_name).weight


def as_out_in(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """View a stored weight as (out, in), whatever its storage convention."""
    return weight.T if transposed else weight

"""The LoRA adapter: what a run produced (:class:`LoraResult`), attaching it to a model and
detaching it again (peft, unmerged), and the adapter as exact weight deltas for the ledger
(:func:`lora_delta`, :func:`lora_update`).

Invariant: the model is unchanged at the end. Training runs a peft LoRA adapter injected into
the model; the adapter is then unloaded without merging, every original module is back in
place with its weights untouched, and the adapter is returned.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edit import arch as arch_table
from edit.errors import InvalidRequest
from edit.methods.unlearn.config import UnlearnConfig
from edit.methods.unlearn.targets import target_module_names
from edit.quantize import quantize_rtn
from edit.update import Update

# --------------------------------------------------------------------------------------------
# The adapter: attach, detach
# --------------------------------------------------------------------------------------------


@dataclass
class LoraResult:
    """What a LoRA run produced. The model it ran on is unchanged; ``adapter`` (peft's
    state-dict names, CPU float32) with ``lora_config`` (peft's LoraConfig as a JSON-safe
    dict) is the change, and :func:`lora_delta` gives it as dense weight deltas."""

    objective: str  # "forget" or "learn"
    config: UnlearnConfig
    adapter: dict[str, torch.Tensor]
    lora_config: dict[str, Any]
    target_modules: list[str]
    transposed: bool  # the targeted weights are stored (in, out) (GPT-2 Conv1D)
    losses: list[dict[str, float | None]] = field(default_factory=list)  # one per epoch
    seconds: float = 0.0  # wall time of the training steps
    tokens: int = 0  # tokens through training forward passes (forget + retain, no padding)
    tokens_per_second: float = 0.0
    metrics: dict[str, float | None] = field(default_factory=dict)  # *_before / *_after

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


def json_safe(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(json_safe(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@contextmanager
def lora_wrapped(model: nn.Module, lora_config) -> Iterator[nn.Module]:
    """The model with a peft LoRA adapter injected (``get_peft_model``); on exit the adapter
    is unloaded without merging and every module's train/eval mode and every parameter's
    ``requires_grad`` are restored, so the model is exactly what it was."""
    from peft import get_peft_model

    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    with warnings.catch_warnings():  # peft asks transformers deprecated questions
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora_config)
    try:
        yield peft_model
    finally:
        base = peft_model.unload()  # puts the original modules back; no merge
        if base is not model:  # peft promises the same object; anything else is a bug
            raise RuntimeError("peft unload returned a different model object")
        for name, m in model.named_modules():
            m.training = modes[name]
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])


def peft_config(model: nn.Module, config: UnlearnConfig):
    from peft import LoraConfig

    targets = target_module_names(model, config.target_modules)
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=arch_table.lookup(model).transposed,
        bias="none",
    ), targets


@torch.no_grad()
def confine(model: nn.Module, reference: nn.Module, transposed: bool) -> None:
    """Fix the input factor A of each LoRA layer injected into ``model`` to the r directions in
    which its weight differs most from the same weight of ``reference`` (the top r right
    singular vectors of W - W_ref, as rows) and freeze it, so that B alone trains and the
    adapter, B·A, reads only those directions of the layer's input. Where the model is a
    rank-r LoRA fine-tune of the reference (merged), -(W - W_ref) is then B·A for some B:
    the exact undo is within reach, and input the fine-tune never changed the response to
    passes through as it was. A direction with no difference gets a zero row."""
    from peft.tuners.lora import LoraLayer

    theirs = dict(reference.named_modules())
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
            continue
        weight = layer.get_base_layer().weight
        other = getattr(theirs.get(name), "weight", None)
        if other is None or other.shape != weight.shape:
            raise InvalidRequest(
                f"confine compares each adapted weight with the reference's: {name} is not "
                "there in the same shape; give the model this one was fine-tuned from"
            )
        diff = weight.float() - other.float().to(weight.device)
        diff = diff.T if transposed else diff  # (out, in)
        a = layer.lora_A["default"].weight  # (r, in)
        r = min(a.shape[0], *diff.shape)
        # the top r only, by randomized subspace iteration: 20x faster than a full SVD on
        # the default model's weights, exact for a difference of rank r
        _, s, v = torch.svd_lowrank(diff, q=min(r + 8, *diff.shape), niter=4)
        # a direction of no difference (beyond float32 rounding of the weight) is none: its
        # row stays 0, and a weight the fine-tune left alone gets no change at all
        tol = weight.float().norm() * max(diff.shape) * torch.finfo(torch.float32).eps
        rows = v[:, :r].T * (s[:r] > tol).unsqueeze(1)
        a.zero_()
        a[: rows.shape[0]].copy_(rows.to(a.dtype))
        a.requires_grad_(False)


@contextmanager
def adapter_attached(model: nn.Module, result: LoraResult) -> Iterator[nn.Module]:
    """``model`` running ``result``'s adapter as peft runs it (unmerged), for the duration of
    the block; the model is exactly restored at exit.

        with adapter_attached(model, result):
            lm.top_next(model, tok, "The capital of France is")
    """
    from peft import LoraConfig, set_peft_model_state_dict

    init = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    lora_config = LoraConfig(**{k: v for k, v in result.lora_config.items() if k in init})
    with lora_wrapped(model, lora_config) as peft_model:
        set_peft_model_state_dict(peft_model, result.adapter)
        peft_model.eval()
        yield peft_model


@contextmanager
def rounded(peft_model: nn.Module, bits: int, group_size: int = 128) -> Iterator[None]:
    """The adapted model as if its merged weights W + ΔW were RTN-rounded to ``bits``
    (:func:`~edit.quantize.quantize_rtn`, what the audit's quantization attack does), for the
    duration of the block: each adapted layer's output gets (Q(W + ΔW) − (W + ΔW))·x, with the
    rounding error taken at entry and held fixed. The forward is then the rounded model's, and
    the gradient reaches the adapter straight through the rounding (as quantization-aware
    training takes it). With the adapter off (``disable_adapter``) nothing is added: the model
    before the run stays what it is."""
    from peft.tuners.lora import LoraLayer

    def add_error(error: torch.Tensor):
        def hook(module, args, output):
            if module.disable_adapters or module.merged:
                return None
            return output + nn.functional.linear(args[0].to(error.dtype), error).to(output.dtype)

        return hook

    handles = []
    try:
        with torch.no_grad():
            for module in peft_model.modules():
                if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                    continue
                w = module.get_base_layer().weight
                merged = w.float() + module.get_delta_weight("default").float()
                if module.fan_in_fan_out:  # stored (in, out): round each output's inputs
                    merged = merged.T
                error = quantize_rtn(merged, bits, group_size) - merged  # (out, in)
                handles.append(module.register_forward_hook(add_error(error)))
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# The adapter as weight deltas
# --------------------------------------------------------------------------------------------


def lora_factors(result: LoraResult) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per targeted module: (B (out, r), A (r, in), scaling), with ΔW = scaling · B @ A in
    (out, in) layout, whatever the storage convention (peft keeps A, B that way for Conv1D
    too and transposes only when it merges)."""
    cfg = result.lora_config
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_dora"):
        raise ValueError("per-module ranks, alphas and DoRA adapters are not supported")
    r = cfg["r"]
    scaling = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    out = {}
    for name in result.target_modules:
        key = f"base_model.model.{name}"
        out[name] = (
            result.adapter[f"{key}.lora_B.weight"],
            result.adapter[f"{key}.lora_A.weight"],
            scaling,
        )
    return out


def lora_delta(result: LoraResult) -> dict[str, torch.Tensor]:
    """Module name -> ΔW (out, in), float32: what the adapter adds to each targeted weight.
    For a transposed architecture (``result.transposed``, GPT-2) the stored weight takes ΔWᵀ."""
    return {name: scaling * (b @ a) for name, (b, a, scaling) in lora_factors(result).items()}


def lora_update(result: LoraResult) -> Update:
    """The adapter as a rank-r :class:`~edit.update.Update` (A = scaling·B_lora, B = A_lora):
    ``lora_update(result).apply(model)`` adds it, in the model's storage layout, and the
    handle's ``undo()`` restores the exact previous weights."""
    return Update(
        {name: (scaling * b, a) for name, (b, a, scaling) in lora_factors(result).items()}
    )

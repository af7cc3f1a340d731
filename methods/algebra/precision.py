"""The precision the value optimization runs the model in.

On a CPU with native bfloat16 matrix products a float32 model's forward/backward passes run
several times faster in bfloat16; δ, the loss and Adam stay float32 either way. Autocast
casts every weight to bfloat16 again at every call (its own cache keeps only weights that
require gradients, and the model's are frozen here): a quarter of an edit's time went to
those copies. So the linear layers' weights are cast once, for the whole optimization, and
put back after: the products are the same, bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import psutil
import torch
from torch import nn

from edit.lm import device_of

VALUE_DTYPES = ("auto", "float32", "bfloat16")


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX): there
    a bfloat16 matrix product runs several times faster than a float32 one."""
    cpu = torch.cpu
    return any(bool(getattr(cpu, f, lambda: False)()) for f in
               ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))  # fmt: skip


def value_autocast(model: nn.Module, value_dtype: str):
    """The context the value optimization runs in: ``bfloat16`` runs the model's matrix
    products in bfloat16 (δ, the loss and Adam stay float32); ``auto`` does so for a float32
    model on a CPU with native bfloat16 products, else runs the model as it is."""
    device = device_of(model)
    if value_dtype == "float32" or next(model.parameters()).dtype != torch.float32:
        return nullcontext()
    if value_dtype == "auto" and not (device.type == "cpu" and native_bf16_cpu()):
        return nullcontext()
    return _in_bf16(model, device.type)


@contextmanager
def _in_bf16(model: nn.Module, device_type: str):
    with torch.autocast(device_type, dtype=torch.bfloat16), bf16_linear_weights(model):
        yield


def _linears(model: nn.Module) -> list[nn.Linear]:
    """The float32 linear layers whose weights are in memory (not offloaded to meta)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear)
        and m.weight.dtype == torch.float32
        and m.weight.device.type != "meta"
    ]


@contextmanager
def bf16_linear_weights(model: nn.Module):
    """Inside, every float32 linear layer holds a bfloat16 copy of its weight and bias (new
    parameters: a weight tied to the input embedding keeps its float32 table for the
    lookups); the originals are put back on the way out, whatever happens. Skipped (autocast
    then casts at each call) where the copies would not fit twice in the free memory."""
    linears = _linears(model)
    size = sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel()) for m in linears) * 2
    if size * 2 > psutil.virtual_memory().available:
        yield
        return
    saved = [(m, m.weight, m.bias) for m in linears]
    try:
        for m, weight, bias in saved:
            m.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
            if bias is not None:
                m.bias = nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        yield
    finally:
        for m, weight, bias in saved:
            m.weight, m.bias = weight, bias

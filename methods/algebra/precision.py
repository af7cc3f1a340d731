"""The precision the value optimization runs the model in.

On a CPU with native bfloat16 matrix products a float32 model's forward/backward passes run
several times faster in bfloat16; δ, the loss and Adam stay float32 either way.
"""

from __future__ import annotations

from contextlib import nullcontext

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
    """The autocast context the value optimization runs in: ``bfloat16`` runs the model's
    matrix products in bfloat16 (δ, the loss and Adam stay float32); ``auto`` does so for a
    float32 model on a CPU with native bfloat16 products, else runs the model as it is."""
    device = device_of(model)
    if value_dtype == "float32" or next(model.parameters()).dtype != torch.float32:
        return nullcontext()
    if value_dtype == "auto" and not (device.type == "cpu" and native_bf16_cpu()):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)

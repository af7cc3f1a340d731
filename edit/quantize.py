"""Round-to-nearest (RTN) weight quantization, the usual baseline of post-training
quantization: an asymmetric (min/max) grid of ``2**bits`` levels per group of ``group_size``
consecutive input weights. The audit's quantization attack rounds a changed model with it
(:mod:`edit.evals.attacks`); a forget run can take its steps on the rounded model as well
(``quant_bits``, :mod:`edit.methods.unlearn.lora`), so that the forgetting holds in a
quantized copy.
"""

from __future__ import annotations

import torch

from edit.errors import InvalidRequest


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """``weight`` (out, in) rounded to ``2**bits`` levels per group of ``group_size`` inputs,
    each group's grid spanning its own [min, max]; returned dequantized, same dtype."""
    if not 2 <= bits <= 16:
        raise InvalidRequest(f"bits must be between 2 and 16, got {bits}")
    out_dim, in_dim = weight.shape
    g = group_size if group_size > 0 and in_dim % group_size == 0 else in_dim
    w = weight.detach().float().reshape(out_dim, in_dim // g, g)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    q = torch.round((w - lo) / scale).clamp(0, levels)
    return (q * scale + lo).reshape(out_dim, in_dim).to(weight.dtype)

"""Attacks that try to bring removed knowledge back.

* Quantization (Zhang et al. 2024, "Does your LLM truly unlearn?"): an unlearning run moves
  the weights only a little, so rounding them to a coarse grid can land the unlearned model
  and the original one on the same grid points. :func:`edit.quantize.quantize_rtn` is
  round-to-nearest with an asymmetric (min/max) grid per group of ``group_size`` consecutive
  input weights, the usual RTN baseline; :func:`quantized` applies it to every Linear
  projection in the attention and MLP blocks (embeddings and norms stay in full precision)
  and restores the exact weights on exit.

    with quantized(model, bits=4):
        measure(model)          # the 4-bit model
    # the weights are bit-for-bit back

* Relearning: a few optimizer steps on a small text sample (``edit.methods.unlearn.train_lora``
  with the ``learn`` objective), then measure again.

Both are scored as "knowledge recovered": the share of the gap between the model before the
change and after it that the attack closes, (m_attacked − m_changed) / (m_before − m_changed),
less what the same attack gains on a control that never saw the data (relearning a few bios
lowers the loss of any bio, on any model: that is learning, not recovery).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from edit import arch as arch_table
from edit.quantize import quantize_rtn


@contextmanager
def quantized(model: nn.Module, bits: int, group_size: int = 128) -> Iterator[nn.Module]:
    """The model with its block projections (the modules LoRA adapts: every Linear / Conv1D
    of the attention and MLP blocks) RTN-quantized; exact weights restored on exit."""
    from edit.methods.unlearn import target_module_names

    transposed = arch_table.lookup(model).transposed
    saved = []
    try:
        with torch.no_grad():
            for name in target_module_names(model):
                w = arch_table.weight_of(model, name)
                saved.append((w, w.detach().clone()))
                q = quantize_rtn(arch_table.as_out_in(w, transposed), bits, group_size)
                w.copy_(arch_table.as_out_in(q, transposed))
        yield model
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)


def recovered(before: float, changed: float, attacked: float, control_gain: float = 0.0) -> float:
    """Share (in %) of the gap from ``before`` to ``changed`` that ``attacked`` closes beyond
    ``control_gain``, what the same attack gains on a model that never saw the data:
    100 · ((attacked − changed) − control_gain) / (before − changed). 0: the attack gained
    no more than on the control; 100: it brought the metric all the way back on top of
    that. NaN without a gap."""
    gap = before - changed
    if abs(gap) < 1e-12:
        return float("nan")
    return 100.0 * ((attacked - changed) - control_gain) / gap

"""Which modules of a model get a LoRA adapter: every projection of the attention and MLP
blocks (from the architecture table), or the modules a config names."""

from __future__ import annotations

from torch import nn

from edit import arch as arch_table
from edit.errors import InvalidRequest


def _adaptable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def target_module_names(model: nn.Module, patterns: tuple[str, ...] | None = None) -> list[str]:
    """Full names of the modules to adapt, in model order.

    None: every Linear (GPT-2: Conv1D) inside the attention and the MLP of every block.
    Otherwise each pattern is a full module name or a suffix after a dot (peft's rule), and
    must match at least one Linear / Conv1D module.
    """
    arch = arch_table.lookup(model)
    if patterns is None:
        names: list[str] = []
        for i in range(arch_table.num_layers(model)):
            for prefix in dict.fromkeys((arch.attn_name(i), arch.mlp_name(i))):
                for sub, module in model.get_submodule(prefix).named_modules():
                    if _adaptable(module):
                        names.append(f"{prefix}.{sub}" if sub else prefix)
        if not names:
            raise InvalidRequest("found no Linear projections in the attention or MLP blocks")
        return list(dict.fromkeys(names))
    candidates = [n for n, m in model.named_modules() if n and _adaptable(m)]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in candidates if n == pattern or n.endswith("." + pattern)]
        if not hits:
            raise InvalidRequest(
                f"target module {pattern!r} matches no Linear layer of this model "
                f"(for example: {', '.join(candidates[:4])})"
            )
        chosen += hits
    chosen_set = set(chosen)
    return [n for n in candidates if n in chosen_set]

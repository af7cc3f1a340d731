"""Forward hooks as context managers.

    with Trace(model, "model.layers.4.mlp.down_proj", retain_input=True) as t:
        model(**batch)
    keys = t.input            # (B, T, d_mlp)

    with Trace(model, name, edit_output=lambda out: out + delta):
        model(**batch)        # the module's output is replaced by the edited one

    with Trace(model, name, stop=True):
        model(**batch)        # raises StopForward after the module ran; caught on exit

The hook is always removed on exit, whatever happens inside the block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; swallowed by the Trace that raised it."""


class Trace:
    def __init__(
        self,
        model: nn.Module,
        name: str,
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_output: Callable[[torch.Tensor], torch.Tensor] | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        module = model.get_submodule(name)

        def hook(_module: nn.Module, inputs: tuple, output):
            if retain_input:
                x = inputs[0]
                self.input = x.detach() if detach else x
            if edit_output is not None:
                output = edit_output(output)
            if retain_output:
                self.output = output.detach() if detach else output
            if stop:
                raise StopForward
            return output

        self._handle = module.register_forward_hook(hook)

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._handle.remove()
        return exc_type is StopForward

    def close(self) -> None:
        self._handle.remove()

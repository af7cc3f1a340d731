"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023, ICLR).

Many facts, several consecutive layers ℓ₁..ℓ_L, one closed-form update per layer:

1. per fact, the change δ of the residual stream after ℓ_L that makes the model say the new
   target (``algebra.solve_values`` at the MLP output of ℓ_L: adding δ there adds δ to the
   residual stream), optimized for all facts at once;
2. per layer, from the first: ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ with K the facts' keys at that layer,
   R the part of the target change still missing divided by the layers left, and C the
   keys' second moment over generic text (``algebra.spread_over_layers``).

The batch is one :class:`~edit.update.Update` of rank ≤ n per layer (with ``write: neuron``,
n neurons or pairs added beside each layer's MLP instead: :func:`neuron_layer`). AlphaEdit
(``alphaedit.py``) shares everything here except the per-layer solve.

Invariant: the model is unchanged at the end; the update is returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from edit import arch as arch_table
from edit import neurons
from edit.errors import InvalidRequest
from edit.facts import Fact
from edit.layers import memit_layers
from edit.methods import MethodOutput, register
from edit.methods.algebra import (
    MAX_ROWS,
    Contexts,
    EditConfig,
    WriteSettings,
    context_templates,
    keys_and_hidden,
    memit_factors,
    solve_values,
    spread_over_layers,
)
from edit.readers.text import text_source
from edit.stats import second_moment, statistic_ids
from edit.update import Update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MEMITConfig(EditConfig, WriteSettings):
    """MEMIT hyper-parameters: the shared value optimization (:class:`EditConfig`, with the
    paper's GPT-J setting where it differs), the layers, the covariance weight and how each
    layer's share is written (:class:`WriteSettings`: MEMIT's least-squares factors, or a
    neuron per fact and layer); ``configs/memit/`` holds tuned values per model."""

    layers: tuple[int, ...] | None = None  # consecutive blocks whose MLPs are edited
    # the bare prompt and 5 prefixes of 10 tokens, as MEMIT's own code (ROME's takes 20)
    context_templates: tuple[tuple[int, int], ...] = ((10, 5),)
    steps: int = 25  # max gradient steps for δ
    cov_weight: float = 15000.0  # λ: weight of the generic keys' second moment
    max_rows: int = MAX_ROWS  # value optimization: prompt rows per forward/backward pass
    # the layer round: where a greedy chat reply to a fact's questions does not state the
    # edit, that fact is made again at the blocks ``retry_layers`` (its column of each
    # layer's factors replaced) and kept there where more of its replies state it
    layer_round: bool = False
    retry_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "retry_layers"):
            blocks = getattr(self, name)
            if blocks is None:
                continue
            if not blocks or any(int(x) < 0 for x in blocks):
                raise InvalidRequest(f"{name} must be block indices >= 0, got {blocks}")
            if list(blocks) != sorted(set(blocks)):
                raise InvalidRequest(f"{name} must be increasing, got {list(blocks)}")
        if self.layer_round and self.retry_layers is None:
            raise InvalidRequest("layer_round needs retry_layers: the blocks to edit at again")
        if self.max_rows < 1:
            raise InvalidRequest(f"max_rows must be >= 1, got {self.max_rows}")
        if not self.cov_weight > 0:
            raise InvalidRequest(f"cov_weight must be > 0, got {self.cov_weight}")
        self.check_write()
        super().__post_init__()

    def blocks(self) -> list[int]:
        """The blocks this config edits ([] where the model's default is taken)."""
        return list(self.layers or ())

    def retry_config(self) -> MEMITConfig:
        """The config the layer round makes an edit again with: blocks ``retry_layers``."""
        return replace(self, layers=self.retry_layers)


def batch_compute(
    model: nn.Module,
    tok,
    facts: list[Fact],
    config,
    *,
    method: str,
    objective: str,
    progress: bool,
    make_solver: Callable[[list[str], dict[str, torch.Tensor], dict], Callable],
) -> MethodOutput:
    """The MEMIT pipeline with a pluggable per-layer solve: ``make_solver(modules, covs,
    ids)`` (``ids``: each statistic's identity, :func:`edit.stats.statistic_ids`) returns
    ``solve(module, keys, resid) -> Update``. The modules are the layers' output
    projections, whose input is the key, or, with ``write: neuron``, their MLPs, whose input
    the added neurons read."""
    if not facts:
        raise InvalidRequest("no facts to edit")
    arch = arch_table.lookup(model)
    layers = memit_layers(model, config.layers, method)
    outputs = [arch.mlp_out_name(i) for i in layers]
    modules = outputs
    if config.write == "neuron":
        modules = [arch.mlp_name(i) for i in layers]
        for name in modules:
            neurons.check_gated(model, name)

    t0 = time.perf_counter()
    source = text_source(config.stats_corpus)  # read and hashed once for both calls
    covs = second_moment(
        model, tok, modules, corpus=source, n_tokens=config.stats_tokens, progress=progress
    )
    ids = statistic_ids(model, tok, modules, source, config.stats_tokens)
    solve = make_solver(modules, covs, ids)
    t_stats = time.perf_counter() - t0
    templates = context_templates(model, tok, config.context_templates, config.seed)
    contexts = Contexts.of(templates, config)
    t1 = time.perf_counter()
    sol = solve_values(
        model,
        tok,
        outputs[-1],
        facts,
        contexts,
        config.value_settings(),
        objective=objective,
        progress=progress,
        max_rows=config.max_rows,
    )
    t_values = time.perf_counter() - t1
    update, steps = spread_over_layers(
        model,
        tok,
        facts,
        contexts,
        modules,
        arch.block(layers[-1]),
        sol.deltas,
        solve,
    )
    return MethodOutput(
        update=update,
        layers=layers,
        info={
            "modules": modules,
            "write": config.write,
            "facts": len(facts),
            "steps": sol.steps,
            "loss_start": sol.loss_start,
            "loss_end": sol.loss_end,
            "delta_norm_ratio": float((sol.deltas.norm(dim=-1) / sol.values.norm(dim=-1)).mean()),
            "layer_steps": steps,
            "stats_seconds": round(t_stats, 2),
            "value_seconds": round(t_values, 2),
            "seconds": round(time.perf_counter() - t0, 2),
            "context_templates": templates,
        },
    )


@register("memit", MEMITConfig, batch=True)
def compute(
    model: nn.Module,
    tok,
    facts: list[Fact],
    config: MEMITConfig,
    *,
    objective: str = "insert",
    progress: bool = True,
    history: dict[str, torch.Tensor] | None = None,  # not used: MEMIT keeps no edit history
) -> MethodOutput:
    """One MEMIT update for a batch of facts."""

    def make_solver(modules, covs, ids):
        def solve(module, keys, resid):
            if config.write == "neuron":
                return neuron_layer(model, tok, facts, config, module, covs[module], keys, resid)
            a, b = memit_factors(covs[module], keys, resid, config.cov_weight)
            return Update({module: (a, b)}, {module: keys})

        return solve

    return batch_compute(
        model,
        tok,
        facts,
        config,
        method="memit",
        objective=objective,
        progress=progress,
        make_solver=make_solver,
    )


def neuron_layer(model: nn.Module, tok, facts: list[Fact], config, mlp: str,
                 cov: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor) -> Update:  # fmt: skip
    """One layer's share of a batch written as neurons added to ``mlp`` (``write: neuron``):
    fact i's neuron (or pair) adds ``resid[i]`` where its row reads 1, at the fact's mean key
    ``keys[i]`` and at its bare prompt's key (read now, on the model as the earlier layers
    left it; ROME's ``prompt_key``), with the least rᵀΣr over generic text."""
    bare = keys_and_hidden(model, tok, facts, ["{}"], mlp, mlp)[0]
    added = config.subject_neurons(model.get_submodule(mlp), cov, [keys, bare], facts, resid)
    return Update(neurons={mlp: added})

"""ROME: Rank-One Model Editing (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", NeurIPS).

One fact, one layer ℓ, one rank-one change of the MLP output projection W:

    W' = W + δ (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)

with k* the fact's key (mean over prefixed prompts), δ the optimized change of the layer's
output at the subject (see ``algebra.solve_values``), and C = E[kkᵀ] the keys' second
moment over generic text. Then W'k* = Wk* + δ exactly, and for any key k the change is
δ·(kᵀC⁻¹k*)/(k*ᵀC⁻¹k*): small for keys that are uncorrelated with k* under C.

Unlike the original code, the key in the numerator (u = C⁻¹k*) and in the denominator is
the *same* averaged k*. The original computes the denominator's key on the unprefixed prompt
only; Gupta et al. 2024 ("Rebuilding ROME") trace ROME's "disabling edits" to that
asymmetry, and using one key removes them.

The plain prompt's own key k₀ can still be far from the mean: on SmolLM2 a subject read
right after the start token ("Ellie Kemper is a citizen of") has a key 4x shorter than
behind any prefix, kᵀC⁻¹k*/(k*ᵀC⁻¹k*) = 0.16, so the prompt the user typed got a sixth
of δ and the edit did not take. With ``prompt_key`` the row b meets both bᵀk* = 1 and
bᵀk₀ = 1 (``algebra.rank_one_direction``: the least bᵀCb that does), still rank one.

``write: neuron`` writes the same δ as one neuron added beside the MLP's own, gated on the
subject (``algebra.gated_neurons``, ``edit.neurons``): a rank-one change adds δ·(bᵀk) on
every token, and the greedy chat reply to an unrelated question flips on that; the neuron's
output is quadratic in how much a token reads like the subject (docs/methods.md). It takes a
batch: one neuron per fact, each reading 0 at the other facts' subjects.

Invariant: the model is unchanged at the end; the update is returned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from edit import arch as arch_table
from edit import neurons
from edit.errors import InvalidRequest
from edit.facts import Fact
from edit.layers import rome_layer
from edit.methods import MethodOutput, register
from edit.methods.algebra import (
    Contexts,
    EditConfig,
    WriteSettings,
    context_templates,
    keys_and_hidden,
    rank_one_direction,
    solve_values,
)
from edit.stats import second_moment
from edit.update import Update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ROMEConfig(EditConfig, WriteSettings):
    """ROME hyper-parameters: the shared value optimization (:class:`EditConfig`, its
    defaults the paper's GPT-2 XL setting where they carry over), the layer, and the prompt
    key; ``configs/rome/`` holds tuned values per model."""

    layer: int | None = None  # block whose MLP is edited; None: see ``compute``
    # map the fact's own prompt's key exactly too (two constraints on the rank-one row):
    # right after the start token a subject's key can be far from the mean k*, and the
    # plain prompt would get a fraction of δ
    prompt_key: bool = True
    # "neuron", a batch: false, each row meets its own subject's keys alone, as a fact edited
    # alone does; true, each also reads exactly 0 at the batch's other subjects, however far
    # that takes it from generic text (two subjects ending in one token: rows 60x longer,
    # perplexity +3.5 % from one batch of 100; benchmarks/results/lifelong_b100_isolated_200)
    isolate: bool = False
    # the layer round: where a greedy chat reply to a fact's questions does not state the
    # edit, that fact's edit is made again at block ``retry_layer`` instead and kept where
    # more of its replies state it (one fact, or fact by fact in a batch of added neurons;
    # ``edit.api.edits``)
    layer_round: bool = False
    retry_layer: int | None = None

    def __post_init__(self) -> None:
        for name in ("layer", "retry_layer"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise InvalidRequest(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.layer_round and self.retry_layer is None:
            raise InvalidRequest("layer_round needs retry_layer: the block to edit at again")
        self.check_write()
        super().__post_init__()

    def blocks(self) -> list[int]:
        """The block this config edits ([] where the model's default is taken)."""
        return [] if self.layer is None else [self.layer]

    def retry_config(self) -> ROMEConfig:
        """The config the layer round makes an edit again with: block ``retry_layer``."""
        return replace(self, layer=self.retry_layer)

    @property
    def takes_batches(self) -> bool:
        """Whether one call edits several facts: the neuron write gives each its own neuron."""
        return self.write == "neuron"


@register("rome", ROMEConfig)
def compute(
    model: nn.Module,
    tok,
    facts: list[Fact],
    config: ROMEConfig,
    *,
    objective: str = "insert",
    progress: bool = True,
    history: dict | None = None,  # not used: ROME does not protect earlier edits
) -> MethodOutput:
    """The rank-one update for one fact, or one added neuron per fact (``write: neuron``:
    the facts of a batch each get their own neuron, and no neuron reads another fact's
    subject).

    The layer is ``config.layer``; without one (no tuned config, no override), the peak
    layer of this model's cached causal trace (``edit trace --data``), else n_layers // 6
    (``edit.layers.rome_layer``).
    """
    if len(facts) != 1 and not config.takes_batches:
        raise InvalidRequest(
            f"ROME's rank-one write edits one fact at a time, got {len(facts)}: use "
            "write=neuron (one neuron per fact) or a batch method"
        )
    arch = arch_table.lookup(model)
    layer = rome_layer(model, config.layer)
    module = arch.mlp_out_name(layer)
    # the neuron is gated on the MLP's input x, the rank-one row reads the key k
    read = arch.mlp_name(layer) if config.write == "neuron" else module
    if config.write == "neuron":
        neurons.check_gated(model, read)

    t0 = time.perf_counter()
    cov = second_moment(
        model,
        tok,
        read,
        corpus=config.stats_corpus,
        n_tokens=config.stats_tokens,
        progress=progress,
    )
    t_stats = time.perf_counter() - t0
    templates = context_templates(model, tok, config.context_templates, config.seed)
    contexts = Contexts.of(templates, config)
    sol = solve_values(
        model,
        tok,
        module,
        facts,
        contexts,
        config.value_settings(),
        objective=objective,
        progress=progress,
        key_module=read,  # the neuron reads the MLP's input at the subject, the row k
    )

    keys = sol.keys  # (F, d_in)
    mapped = [keys]
    if config.prompt_key:  # the fact's own prompt, as `edit ask` reads it
        mapped.append(keys_and_hidden(model, tok, facts, ["{}"], read, read)[0])
    if config.write == "neuron":
        added = config.subject_neurons(model.get_submodule(read), cov, mapped, facts,
                                       sol.deltas, config.isolate)  # fmt: skip
        update = Update(neurons={read: added})
    else:
        b = rank_one_direction(cov, torch.cat(mapped))[None, :]  # (1, d_in): bᵀk = 1 each
        a = sol.deltas[0].float()[:, None]  # (d_out, 1)
        update = Update({module: (a, b)}, {module: keys.float()})
    return MethodOutput(
        update=update,
        layers=[layer],
        info={
            "module": read,  # the down projection, or the MLP a neuron was added to
            "write": config.write,
            "steps": sol.steps,
            "loss_start": sol.loss_start,
            "loss_end": sol.loss_end,
            "delta_norm_ratio": float((sol.deltas.norm(dim=-1) / sol.values.norm(dim=-1)).mean()),
            "stats_seconds": round(t_stats, 2),
            "seconds": round(time.perf_counter() - t0, 2),
            "context_templates": templates,
        },
    )

"""AlphaEdit: null-space constrained knowledge editing (Fang et al. 2025, ICLR).

MEMIT's pipeline (``memit.py``) with another per-layer solve. The update is projected onto
the null space of the keys generic text produces (P, from the eigenvectors of their second
moment C with eigenvalues below a threshold times their mean), so it leaves what the model
does on such keys alone, and it is asked to keep the outputs of earlier edits' keys K_p
unchanged:

    ΔWᵀ = (P (K_p K_pᵀ + K Kᵀ) + α I)⁻¹ P K Rᵀ

The projector is computed once per layer and cached next to the key statistics. The keys
of earlier edits come from the ledger (``history``: every recorded update carries the keys
it wrote), so sequential batches do not undo each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from edit import cache
from edit.errors import InvalidRequest
from edit.facts import Fact
from edit.methods import MethodOutput, register
from edit.methods.algebra import alphaedit_factors, null_space_projector
from edit.methods.memit import MEMITConfig, batch_compute
from edit.stats import StatsId
from edit.update import Update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlphaEditConfig(MEMITConfig):
    """AlphaEdit hyper-parameters: MEMIT's, plus the null-space threshold and the ridge α.

    The threshold is relative to the mean eigenvalue of the keys' second moment. The
    paper's absolute 2e-2 is 1.1x the mean on SmolLM2-135M's layer 4; keys of other models
    differ in scale by 100x (see ``algebra.null_space_projector``)."""

    nullspace_threshold: float = 1.0
    l2: float = 10.0
    # λ of the generic keys' second moment inside the null space (0: the paper's update;
    # ``cov_weight`` is MEMIT's and is not used here)
    null_cov_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.nullspace_threshold > 0:
            raise InvalidRequest(f"nullspace_threshold must be > 0, got {self.nullspace_threshold}")
        if not self.l2 > 0:
            raise InvalidRequest(f"l2 must be > 0, got {self.l2}")
        if self.null_cov_weight < 0:
            raise InvalidRequest(f"null_cov_weight must be >= 0, got {self.null_cov_weight}")
        if self.write != "rank_one":
            raise InvalidRequest(
                "AlphaEdit projects a weight update (write=rank_one); for added neurons use "
                "method memit or rome with write=neuron"
            )


def projector(
    cov: torch.Tensor, threshold: float, module: str, identity: StatsId | None
) -> torch.Tensor:
    """The null-space projector of ``cov`` (the statistic ``identity`` names), through
    ``edit.cache`` (memory, disk, or computed); without an identity, computed each time."""

    def compute() -> dict[str, torch.Tensor]:
        return {"projector": _computed(cov, threshold, module)}

    model_hash, _, corpus, n = identity or (None, None, None, None)
    key = (module, corpus, str(n), f"{threshold:g}", "projector")
    return cache.tensors("stats", model_hash, *key, compute=compute)["projector"]


def _computed(cov: torch.Tensor, threshold: float, module: str) -> torch.Tensor:
    p = null_space_projector(cov, threshold)
    log.info(
        "null space of %s: %d of %d directions below %g x the mean eigenvalue",
        module,
        round(float(p.trace())),
        p.shape[0],
        threshold,
    )
    return p


@register("alphaedit", AlphaEditConfig, batch=True)
def compute(
    model: nn.Module,
    tok,
    facts: list[Fact],
    config: AlphaEditConfig,
    *,
    objective: str = "insert",
    progress: bool = True,
    history: dict[str, torch.Tensor] | None = None,
) -> MethodOutput:
    """One AlphaEdit update for a batch of facts; ``history`` maps a module name to the keys
    (m, d_in) of the earlier edits that wrote it."""
    history = history or {}

    def make_solver(modules, covs, ids):
        threshold = config.nullspace_threshold
        projectors = {m: projector(covs[m], threshold, m, ids[m]) for m in modules}

        def solve(module, keys, resid):
            a, b = alphaedit_factors(
                projectors[module],
                keys,
                resid,
                history.get(module),
                config.l2,
                covs[module],
                config.null_cov_weight,
            )
            return Update({module: (a, b)}, {module: keys})

        return solve

    out = batch_compute(
        model,
        tok,
        facts,
        config,
        method="alphaedit",
        objective=objective,
        progress=progress,
        make_solver=make_solver,
    )
    out.info["previous_keys"] = {
        m: int(len(history[m])) for m in out.info["modules"] if m in history
    }
    return out

"""The weight updates that map the keys k* to their new values: ROME's rank-one direction,
MEMIT's least-squares solve spread over several layers, AlphaEdit's null-space projector and
its projected solve. All solves run in float64 and return float32 factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edit.errors import InvalidRequest
from edit.facts import Fact
from edit.methods.algebra.keys import keys_and_hidden
from edit.update import Update

WRITES = ("rank_one", "neuron")  # how δ is written into the model; the first is the default


@dataclass(frozen=True)
class WriteSettings:
    """How a method writes its δ (ROME's and MEMIT's configs take these fields)."""

    # "rank_one": a change of the MLP's output projection that maps the subject's key to
    # its new value; "neuron": neurons added beside the MLP's own, gated on the subject
    # (one, or a pair, per fact: the rest of the model's computations stay almost exactly
    # as they were; gated MLPs only, ``edit.neurons``)
    write: str = WRITES[0]
    gate: float = 3.0  # "neuron": the gate row's scale s (act(s) at the subject)
    # "neuron": 0, one neuron per fact; t > 0, a pair whose second neuron's gate is t·r, so
    # that their small outputs on other tokens cancel to third order (``neuron_write``)
    pair_gate: float = 0.0

    def check_write(self) -> None:
        """One-line errors for the write fields."""
        if self.write not in WRITES:
            raise InvalidRequest(f"write must be {' or '.join(WRITES)}, got {self.write!r}")
        if not self.gate > 0:
            raise InvalidRequest(f"gate must be > 0, got {self.gate}")
        if not 0 <= self.pair_gate < self.gate:
            raise InvalidRequest(
                f"pair_gate must be >= 0 and below gate ({self.gate:g}), got {self.pair_gate}"
            )

    def subject_neurons(
        self,
        mlp: nn.Module,
        second_moment: torch.Tensor,
        key_sets: list[torch.Tensor],
        facts: list[Fact],
        deltas: torch.Tensor,
        isolate: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Neurons for the gated MLP ``mlp`` adding each fact's δ (``deltas`` (F, d)) at its
        subject: each row reads 1 at its fact's keys in every set of ``key_sets`` (each
        (F, d), in fact order: the mean key, the bare prompt's), :func:`gated_neurons` with
        this config's gate and pair."""
        reads = subject_reads(facts, len(key_sets))
        return gated_neurons(second_moment, torch.cat(key_sets), reads, deltas, mlp.act_fn,
                             self.gate, self.pair_gate, isolate)  # fmt: skip


def least_rows(
    second_moment: torch.Tensor, keys: torch.Tensor, reads: torch.Tensor
) -> torch.Tensor:
    """Rows R (m, d) that read ``reads`` (n, m) at the rows k_j of ``keys`` (n, d),
    R k_j = reads[j], each with the least rᵀCr (the smallest response on generic keys,
    C = ``second_moment``) among those that do: R = (C⁻¹K (KᵀC⁻¹K)⁺ T)ᵀ. Keys that are
    almost parallel are met in the least-squares sense (a pseudo-inverse of their
    C⁻¹-Gram matrix), so a second key adds nothing where it adds no direction."""
    k, ci_k = _weighted_keys(second_moment, keys)
    t = reads.to(device=k.device, dtype=k.dtype)
    return (ci_k @ _pinv(k.T @ ci_k) @ t).T.float()


def _weighted_keys(second_moment: torch.Tensor, keys: torch.Tensor):
    """(K (d, n), C⁻¹K) in float64, C lightly damped."""
    c = second_moment.to(device=keys.device, dtype=torch.float64)
    k = keys.double().T
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return k, torch.linalg.solve(c + 1e-6 * c.diagonal().mean() * eye, k)


def _pinv(gram: torch.Tensor) -> torch.Tensor:
    return torch.linalg.pinv(gram, rtol=1e-6, hermitian=True)


def rank_one_direction(second_moment: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The row b (d,) of a rank-one update δbᵀ that maps each key exactly: bᵀk_j = 1 for
    every row k_j of ``keys`` (n, d), with the least bᵀCb (:func:`least_rows`). One key
    gives ROME's b = C⁻¹k/(kᵀC⁻¹k)."""
    return least_rows(second_moment, keys, torch.ones(len(keys), 1))[0]


def own_rows(second_moment: torch.Tensor, keys: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
    """Rows R (m, d), row i reading 1 at the keys where ``reads[:, i]`` is 1 (its own fact's
    subject) with the least rᵀCr, and no condition at the other keys: :func:`least_rows` for
    each row alone, with C⁻¹K computed once."""
    k, ci_k = _weighted_keys(second_moment, keys)
    rows = []
    for own in reads.to(k.device).T > 0:  # (m, n): each row's own keys
        ones = torch.ones(int(own.sum()), dtype=k.dtype, device=k.device)
        rows.append(ci_k[:, own] @ _pinv(k[:, own].T @ ci_k[:, own]) @ ones)
    return torch.stack(rows).float()


def gated_neurons(
    second_moment: torch.Tensor,
    keys: torch.Tensor,
    reads: torch.Tensor,
    deltas: torch.Tensor,
    act,
    gate: float,
    pair: float = 0.0,
    isolate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neurons for a gated MLP, one per fact, each adding its fact's δ (``deltas`` (m, d))
    at that fact's subject and almost nothing elsewhere: gate row s·r, up row r, down column
    δ/act(s). The rows r read ``reads`` (n, m) at the rows of ``keys`` (the MLP's inputs x
    at the subjects, (n, d)): 1 where the key is the neuron's own subject, and, with
    ``isolate``, 0 at the other facts' subjects (so the facts of a batch do not write into
    each other), each with the least rᵀΣr over generic text (:func:`least_rows`, Σ =
    ``second_moment`` of the MLP's input); without, each row meets its own subject's keys
    alone (:func:`own_rows`), as one fact edited alone does. A neuron's output
    act(s·r·x)·(r·x)·δ/act(s) is δ at its subject and, on a token with r·x = ε, about ε²/2
    of δ where a rank-one update gives ε (``edit.neurons``); with ``pair`` > 0, a pair per
    fact whose squares cancel (:func:`neuron_write`).
    Returns (gate, up (m or 2m, d), down (d, m or 2m))."""
    solve = least_rows if isolate else own_rows
    r = solve(second_moment, keys, reads)
    return neuron_write(r, deltas.float(), act, gate, pair)


def neuron_write(
    r: torch.Tensor, deltas: torch.Tensor, act, s: float, t: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) of neurons adding ``deltas`` (m, d) where rᵢ·x = 1 (``r`` (m, d)).

    ``t`` = 0: one neuron each, gate s·r, up r, down δ/act(s): act(s·a)·a·δ/act(s), which
    near a = 0 is about s·a²/2·δ/act(s), of one sign whatever a's, so that many neurons add
    a coherent shift to every token. ``t`` > 0: a pair each, the second with gate t·r and
    down −(s/t)·δ/c (the first's down δ/c, c = act(s) − (s/t)·act(t)): at a = 1 still δ; the
    quadratic terms of act(z) ≈ z/2 + z²/4 cancel, leaving about s(s − t)·a³/4·δ/c, whose
    sign follows a's (benchmarks/results/neuron_leak_1000.md)."""
    one = torch.tensor(s, dtype=torch.float64)
    if not t:
        return s * r, r.clone(), (deltas / float(act(one))).T.contiguous()
    c = float(act(one)) - (s / t) * float(act(torch.tensor(t, dtype=torch.float64)))
    down = (deltas / c).T
    return (torch.cat([s * r, t * r]), torch.cat([r, r]),
            torch.cat([down, -(s / t) * down], 1).contiguous())  # fmt: skip


def subject_reads(facts: list[Fact], copies: int) -> torch.Tensor:
    """(copies·F, F): what fact i's neuron reads at each key row (the facts' keys, ``copies``
    sets of them in fact order): 1 at a key of a fact with its own fact's subject, 0 at the
    others' (facts of one subject share their keys: each neuron fires there)."""
    subjects = [f.subject for f in facts]
    same = torch.tensor([[a == b for b in subjects] for a in subjects], dtype=torch.float64)
    return same.repeat(copies, 1)


def neuron_facts(n_neurons: int, n_facts: int) -> torch.Tensor:
    """(n_neurons,): the fact each of :func:`gated_neurons`' neurons writes, in its order:
    one neuron per fact, then (a pair each) the second of each fact's pair."""
    return torch.arange(n_neurons) % n_facts


def spread_over_layers(
    model: nn.Module,
    tok,
    facts: list[Fact],
    templates: list[str],
    modules: list[str],
    last_block: str,
    deltas: torch.Tensor,
    solve_layer,
) -> tuple[Update, list[dict]]:
    """MEMIT's update of several layers (Meng et al. 2023, "Mass-Editing Memory in a
    Transformer", Alg. 1).

    The target of fact i is z_i = h_i + δ_i, with h_i the output of ``last_block`` (the
    residual stream after the last edited layer) before the edit. Layer by layer, from the
    first: read the keys K (F, d_in) at ``module`` (its input at each subject) and the
    residual stream h' as the model is now (earlier layers already changed), take the
    residual R = (z − h') / (layers left), and write ``solve_layer(module, K, R)``, an
    :class:`Update` that adds R at those keys (MEMIT's least-squares factors of the output
    projection, or neurons added to the MLP), into the layer. Each layer so takes an equal
    share of what is still missing. The model is unchanged at the end.
    """
    keys, h0 = keys_and_hidden(model, tok, facts, templates, modules[0], last_block)
    target = h0 + deltas.float()
    update = Update()
    steps: list[dict] = []
    applied = []
    try:
        for i, module in enumerate(modules):
            if i == 0:  # nothing changed yet: the first layer's keys and h0 from above
                h = h0
            else:
                keys, h = keys_and_hidden(model, tok, facts, templates, module, last_block)
            missing = target - h
            resid = missing / (len(modules) - i)
            part = solve_layer(module, keys, resid)
            applied.append(part.apply(model))
            update = update.merged(part)
            step = {"module": module, "missing_norm": float(missing.norm(dim=-1).mean())}
            if module in part.factors:
                step["update_norm"] = float(part.delta(module).norm())
            steps.append(step)
    finally:
        for handle in reversed(applied):
            handle.undo()
    return update, steps


def memit_factors(
    second_moment: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor, cov_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's least-squares update ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ (Meng et al. 2023, eq. 14) as
    factors A = R (d_out, n), B = ((λC + KᵀK)⁻¹ K)ᵀ (n, d_in), solved in float64.

    ``keys`` (n, d_in), ``resid`` (n, d_out); C the keys' second moment over generic text
    and λ (``cov_weight``) how many generic keys' worth of preservation it stands for.
    """
    k = keys.to(torch.float64)
    c = second_moment.to(device=k.device, dtype=torch.float64)
    m = cov_weight * c + k.T @ k
    b = torch.linalg.solve(m, k.T).T  # m is symmetric
    return resid.T.float().clone(memory_format=torch.contiguous_format), b.float().contiguous()


def null_space_projector(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U Uᵀ over the eigenvectors of C whose eigenvalues are below ``threshold`` times
    their mean: keys that generic text uses (C's large directions) are mapped to ~0
    (AlphaEdit, Fang et al. 2025, eq. 7), in float32 on C's device.

    The paper's threshold is absolute (2e-2); relative to the mean eigenvalue it carries
    over between models whose keys differ in scale by orders of magnitude.
    """
    c = second_moment.to(torch.float64)
    values, vectors = torch.linalg.eigh(c)
    u = vectors[:, values < threshold * values.mean()]
    return (u @ u.T).float()


def alphaedit_factors(
    projector: torch.Tensor,
    keys: torch.Tensor,
    resid: torch.Tensor,
    previous: torch.Tensor | None,
    l2: float,
    second_moment: torch.Tensor | None = None,
    cov_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's update (Fang et al. 2025, eq. 16): ΔWᵀ = (P(K_p K_pᵀ + K Kᵀ) + αI)⁻¹ P K Rᵀ,
    with P the null-space projector, K_p the keys of earlier edits (``previous``, (m, d_in),
    or None) and α = ``l2``. Returned as factors A = R (d_out, n), B (n, d_in), solved in
    float64. For any key k0 with P k0 = 0 (the preserved knowledge), ΔW k0 = 0.

    With ``cov_weight`` λ > 0 the generic keys' second moment C joins the earlier edits' keys,
    (P(K_p K_pᵀ + K Kᵀ + λC) + αI)⁻¹: it penalizes λ‖ΔP k0‖² for the generic keys that P
    lets through (where C has no exact null space, P keeps directions generic text uses).
    λ = 0 is the paper's update.
    """
    k = keys.to(torch.float64)
    p = projector.to(device=k.device, dtype=torch.float64)
    gram = k.T @ k
    if previous is not None and len(previous):
        kp = previous.to(device=k.device, dtype=torch.float64)
        gram = gram + kp.T @ kp
    if cov_weight > 0:
        if second_moment is None:
            raise ValueError("cov_weight > 0 needs the keys' second moment")
        gram = gram + cov_weight * second_moment.to(device=k.device, dtype=torch.float64)
    eye = torch.eye(p.shape[0], dtype=torch.float64, device=k.device)
    x = torch.linalg.solve(p @ gram + l2 * eye, p @ k.T)  # (d_in, n)
    return resid.T.float().clone(memory_format=torch.contiguous_format), x.T.float().contiguous()

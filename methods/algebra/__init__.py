"""The shared algebra of locate-then-edit methods (ROME, MEMIT, AlphaEdit).

The MLP output projection W (out × in) is read as a linear key-value memory: the key k is
its input at the subject's last token, the value v = W k its output (Meng et al. 2022,
"Locating and Editing Factual Associations in GPT", §3). An edit needs, per fact,

* ``k*``: the key, averaged over the fact's prompt behind several short random prefixes so
  that it does not depend on the exact wording before the subject (ROME §3.1, eq. 3);
* ``δ``: the change of the layer output at that position that makes the model say the new
  target, found by gradient descent on the output (ROME §3.1, eq. 4), under a KL term that
  keeps the subject's other properties and a norm bound;

and then a weight update that maps k* to v + δ. This package computes k* and δ for a batch of
facts at once (one forward/backward per step for all facts); the method files only differ
in how they turn (k*, δ) into weights.

    contexts    the prompt rows of a fact (cloze templates, questions, chat turns)
    prefixes    the sampled prefix texts, cached per model
    batch       the rows of a chunk of facts as one batch, and per-fact means over them
    packing     those rows packed side by side into a few full sequences for each step
    precision   the precision the value optimization runs the model in (weights cast once)
    objectives  the value objectives by name (insert, erase) and their shared terms
    values      the optimization of δ (and k*, v0 from its first pass)
    keys        key passes: k* and a block's output without gradients
    solves      the weight updates: rank-one, a gated neuron, MEMIT over layers, AlphaEdit's
                projected solve
"""

from edit.methods.algebra.contexts import Contexts
from edit.methods.algebra.keys import MAX_ROWS, keys_and_hidden
from edit.methods.algebra.objectives import OBJECTIVES, register_objective
from edit.methods.algebra.prefixes import context_templates
from edit.methods.algebra.solves import (
    WRITES,
    WriteSettings,
    alphaedit_factors,
    gated_neurons,
    memit_factors,
    null_space_projector,
    rank_one_direction,
    spread_over_layers,
)
from edit.methods.algebra.values import (
    EditConfig,
    ValueSettings,
    ValueSolution,
    check_value_config,
    solve_values,
)

__all__ = [
    "WRITES",
    "WriteSettings",
    "MAX_ROWS",
    "OBJECTIVES",
    "Contexts",
    "EditConfig",
    "ValueSettings",
    "ValueSolution",
    "alphaedit_factors",
    "check_value_config",
    "context_templates",
    "gated_neurons",
    "keys_and_hidden",
    "memit_factors",
    "null_space_projector",
    "rank_one_direction",
    "register_objective",
    "solve_values",
    "spread_over_layers",
]

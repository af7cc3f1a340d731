"""Causal tracing: which hidden states carry a fact (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT", §2 and Appendix B).

    t = trace_fact(model, tok, "{} is located in", "The Eiffel Tower")
    t.effect("mlp")              # (layers, tokens): P_restored(answer) - P_corrupted(answer)
    t.peak("mlp", t.subject_last)   # (layer, token, effect): the strongest MLP restoration

    avg = trace_average(model, tok, edit.readers.known.load_known("known_1000.json"), limit=100)
    avg.peak_layer, avg.layer_range   # where the MLP at the last subject token matters most

Three kinds of run per fact, all on the prompt as ``lm.encode`` gives it (start token first):

* clean: the prompt as it is; every block, MLP and attention output is kept;
* corrupted: Gaussian noise of standard deviation ν is added to the embedding of every
  subject token, so the model loses track of the subject and P(answer) drops;
* restored: a corrupted run in which one clean state is copied back: the block output
  ("resid"), the MLP output ("mlp") or the attention output ("attn") at one token and layer.

The indirect effect of a state is P_restored(answer) − P_corrupted(answer), averaged over the
noise samples; "answer" is the first token of the target (the model's own top prediction
when no target is given), as in ROME.

Choices, as ROME makes them unless said otherwise:

* noise ν = 3 σ, σ the standard deviation of the embedding-module outputs of the subjects'
  tokens: over all subjects of the data file for ``trace_average`` (ROME's reference), over
  the first 20,000 tokens of the shipped WikiText-2 for a single prompt (close to the
  subjects' σ). The noise comes from ``torch.Generator().manual_seed(seed)``, drawn anew for
  each fact, so a run repeats exactly.
* samples: 10 noisy runs per restoration for one fact (ROME's number); ``trace_average``
  defaults to 2, since its curve averages over facts as well (the MLP curve from 2 samples
  has the same peak and range as the one from 10).
* window: "mlp" and "attn" restore a window of 10 consecutive layers, l − 5 … l + 4 clipped
  to the model (ROME's ``window=10``); "resid" restores the one block output. ``window=1``
  restores single layers.
* tokens before the first subject token are not run: the noise cannot reach them (the model
  is causal), so restoring them changes nothing and their effect is exactly 0.
* speed: the restorations of token t all share the corrupted run of the tokens before t; it
  runs once per noise sample and its key/value cache is reused, so each restored run computes
  only tokens t … end, many restorations per batch.

The modules: ``inputs`` (kinds, prompt, subject tokens, noise level, window), ``engine`` (the
forward passes), ``single`` (one prompt), ``average`` (many facts, the suggested layers),
``known`` (ROME's known-facts file), ``plots`` and ``outputs`` (files, the trace cache that
``edit.layers`` reads).
"""

from edit.facts import parse_prompt
from edit.methods.locate.average import (
    AVERAGE_CATEGORIES,
    AVERAGE_SAMPLES,
    CATEGORIES,
    RANGE_FRACTION,
    AverageTrace,
    answered_correctly,
    category_positions,
    peak_shares,
    suggest_layers,
    trace_average,
)
from edit.methods.locate.inputs import (
    KINDS,
    NOISE_MULTIPLIER,
    WINDOW,
    noise_level,
    parse_kinds,
    subject_range,
    window_layers,
)
from edit.methods.locate.outputs import save_cached, write_outputs
from edit.methods.locate.plots import PlotsUnavailable, plot_average, plot_fact
from edit.methods.locate.single import SAMPLES, FactTrace, trace_fact

__all__ = [
    "AVERAGE_CATEGORIES",
    "AVERAGE_SAMPLES",
    "CATEGORIES",
    "KINDS",
    "NOISE_MULTIPLIER",
    "RANGE_FRACTION",
    "SAMPLES",
    "WINDOW",
    "AverageTrace",
    "FactTrace",
    "PlotsUnavailable",
    "answered_correctly",
    "category_positions",
    "noise_level",
    "parse_kinds",
    "parse_prompt",
    "peak_shares",
    "plot_average",
    "plot_fact",
    "save_cached",
    "subject_range",
    "suggest_layers",
    "trace_average",
    "trace_fact",
    "window_layers",
    "write_outputs",
]

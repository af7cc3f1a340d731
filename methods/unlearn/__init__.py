"""Unlearning (and learning) a corpus with LoRA: pure loss functions and one trainer.

    from edit.corpus import wikitext_retain
    from edit.readers.corpus import read_corpus
    from edit.methods.unlearn import UnlearnConfig, lora_update, train_lora

    forget = read_corpus("private.jsonl")
    result = train_lora(model, tok, forget, wikitext_retain(tok), UnlearnConfig(method="npo"))
    result.metrics["forget_nll_before"], result.metrics["forget_nll_after"]
    applied = lora_update(result).apply(model)   # the adapter as exact weight deltas
    applied.undo()                               # bit-for-bit the base again

The goal, for a forget set D_f of the training data, is a model that behaves as if it had
never seen D_f, while it keeps what it knows elsewhere (a retain set D_r). ``learn`` trains
NLL(examples) instead, to teach a corpus. The modules, in the order a run uses them:

    losses    the objectives (gradascent, graddiff, npo, simnpo, distill,
              rename, undial, match) as one table, LOSSES
    rename    the rename objective's teacher: the model on examples whose subject is
              replaced by a never-seen one
    config    UnlearnConfig, and OBJECTIVE_DEFAULTS for the fields left None
    targets   which modules get an adapter
    scoring   log π(y|x) of the answers, batched; the NLL summaries
    trainer   train_lora: the steps under accelerate, the stop rule
    lora      the adapter: attach and detach (peft), LoraResult, and exact weight deltas
    policy    plan_corpus, train_plan: a workspace's forget / learn run (sets, stop level, what
              to record)
"""

from edit.methods.unlearn.config import (
    METHOD_DEFAULTS,
    OBJECTIVE_DEFAULTS,
    OBJECTIVES,
    UnlearnConfig,
    for_objective,
)
from edit.methods.unlearn.lora import (
    LoraResult,
    adapter_attached,
    lora_delta,
    lora_factors,
    lora_update,
)
from edit.methods.unlearn.losses import (
    LOSSES,
    NEEDS_REFERENCE,
    NEEDS_RENAMED,
    NEEDS_TARGETS,
    NEEDS_TEACHER,
    USES_RETAIN,
    LossInputs,
    distill,
    gradient_ascent,
    gradient_difference,
    match,
    npo,
    quantile_targets,
    register_loss,
    rename,
    sequence_logprob,
    sequence_nll,
    simnpo,
    token_kl,
    token_logprobs,
    token_nll,
    undial,
)
from edit.methods.unlearn.policy import (
    Plan,
    Trained,
    at_learned,
    corpus_level,
    learned_by,
    plan_corpus,
    train_plan,
)
from edit.methods.unlearn.samples import sampled_answers
from edit.methods.unlearn.scoring import answer_nll, answer_scores
from edit.methods.unlearn.targets import target_module_names
from edit.methods.unlearn.trainer import train_lora

__all__ = [
    "LOSSES",
    "NEEDS_REFERENCE",
    "NEEDS_TARGETS",
    "NEEDS_RENAMED",
    "NEEDS_TEACHER",
    "OBJECTIVES",
    "OBJECTIVE_DEFAULTS",
    "USES_RETAIN",
    "LoraResult",
    "LossInputs",
    "METHOD_DEFAULTS",
    "Plan",
    "Trained",
    "UnlearnConfig",
    "adapter_attached",
    "distill",
    "answer_nll",
    "at_learned",
    "corpus_level",
    "answer_scores",
    "for_objective",
    "gradient_ascent",
    "gradient_difference",
    "learned_by",
    "lora_delta",
    "lora_factors",
    "lora_update",
    "match",
    "npo",
    "quantile_targets",
    "register_loss",
    "rename",
    "sampled_answers",
    "token_kl",
    "sequence_logprob",
    "sequence_nll",
    "simnpo",
    "target_module_names",
    "token_logprobs",
    "token_nll",
    "undial",
    "plan_corpus",
    "train_plan",
    "train_lora",
]

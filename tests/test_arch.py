"""The architecture table names real modules, with the right shapes and roles, in every type."""

from __future__ import annotations

import pytest
import torch
from tiny import HIDDEN, INTERMEDIATE, TINY_TYPES, tiny_model, tiny_tokenizer
from torch import nn

import edit.arch
from edit.errors import EditError

UNSUPPORTED = "bloom"


@pytest.fixture(scope="module", params=TINY_TYPES)
def model(request):
    return tiny_model(request.param, len(tiny_tokenizer()))


def _ids():
    tok = tiny_tokenizer()
    enc = tok(
        ["The capital of France is Paris.", "Berlin is located in"],
        padding=True,
        return_tensors="pt",
    )
    return enc.input_ids, enc.attention_mask


def _run(model, names):
    """Forward once; record each named module's (first positional input, output)."""
    seen = {}

    def recorder(name):
        def hook(module, args, out):
            seen.setdefault(name, (args[0], out))  # returns None: the output is left alone

        return hook

    hooks = [model.get_submodule(name).register_forward_hook(recorder(name)) for name in names]
    try:
        with torch.no_grad():
            ids, mask = _ids()
            logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def test_tiny_types_are_all_in_the_table():
    missing = [t for t in TINY_TYPES if t not in edit.arch.ARCHITECTURES]
    assert missing == []


def test_lookup_and_layer_count(model):
    assert model.config.model_type in TINY_TYPES
    arch = edit.arch.lookup(model)
    assert arch is edit.arch.ARCHITECTURES[model.config.model_type]
    n = model.config.get_text_config().num_hidden_layers
    assert n >= 2
    assert edit.arch.num_layers(model) == n
    layers = model.get_submodule(arch.layers)
    assert isinstance(layers, nn.ModuleList)


def test_every_name_resolves(model):
    arch = edit.arch.lookup(model)
    for i in range(edit.arch.num_layers(model)):
        block = model.get_submodule(arch.block(i))
        for name in (arch.mlp_out_name(i), arch.mlp_name(i), arch.attn_name(i)):
            module = model.get_submodule(name)
            # Each one really belongs to block i.
            assert any(m is module for m in block.modules()), name
        assert "attention" in type(model.get_submodule(arch.attn_name(i))).__name__.lower()
    # Distinct blocks, not the same module reached twice.
    assert model.get_submodule(arch.mlp_out_name(0)) is not model.get_submodule(
        arch.mlp_out_name(1)
    )
    embed = model.get_submodule(arch.embed)
    assert embed is model.get_input_embeddings()
    assert embed.weight.shape == (len(tiny_tokenizer()), HIDDEN)
    assert arch.final_norm is not None
    assert "norm" in type(model.get_submodule(arch.final_norm)).__name__.lower()


def test_mlp_out_weight_is_out_in(model):
    arch = edit.arch.lookup(model)
    for i in range(edit.arch.num_layers(model)):
        w = edit.arch.weight_of(model, arch.mlp_out_name(i))
        # HIDDEN != INTERMEDIATE, so a wrong `transposed` flag shows up here.
        assert edit.arch.as_out_in(w, arch.transposed).shape == (HIDDEN, INTERMEDIATE)


def test_hooks_see_key_and_value_dimensions(model):
    arch = edit.arch.lookup(model)
    n = edit.arch.num_layers(model)
    names = [arch.mlp_out_name(i) for i in range(n)] + [arch.mlp_name(i) for i in range(n)]
    names += [arch.final_norm]
    seen, logits = _run(model, names)
    assert logits.shape[-1] == len(tiny_tokenizer())
    assert set(seen) == set(names)
    for i in range(n):
        key, value = seen[arch.mlp_out_name(i)]
        w = edit.arch.as_out_in(edit.arch.weight_of(model, arch.mlp_out_name(i)), arch.transposed)
        assert key.shape[-1] == w.shape[1] == INTERMEDIATE
        assert value.shape[-1] == w.shape[0] == HIDDEN
        # The MLP's output is exactly its output projection's output (eval mode: no dropout).
        mlp_out = seen[arch.mlp_name(i)][1]
        torch.testing.assert_close(mlp_out, value)
    # The final norm's output is what the unembedding reads.
    normed = seen[arch.final_norm][1]
    head = model.get_output_embeddings()
    torch.testing.assert_close(head(normed), logits, rtol=1e-4, atol=1e-4)


def test_mlp_out_edit_changes_logits(model):
    """Editing the named weight is what moves the model's output."""
    arch = edit.arch.lookup(model)
    ids, mask = _ids()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        w = edit.arch.weight_of(model, arch.mlp_out_name(0))
        saved = w.clone()
        try:
            w.add_(torch.randn_like(w))
            after = model(input_ids=ids, attention_mask=mask).logits
        finally:
            w.copy_(saved)
        again = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(before, after)
    torch.testing.assert_close(before, again)


def test_unsupported_type_raises_naming_type_and_supported():
    assert UNSUPPORTED not in edit.arch.ARCHITECTURES
    model = tiny_model(UNSUPPORTED, len(tiny_tokenizer()))
    assert model.config.model_type == UNSUPPORTED
    with pytest.raises(EditError) as info:
        edit.arch.lookup(model)
    message = str(info.value)
    assert "\n" not in message
    assert repr(UNSUPPORTED) in message
    for supported in edit.arch.ARCHITECTURES:
        assert supported in message
    with pytest.raises(EditError):
        edit.arch.num_layers(model)


def test_object_without_config_raises():
    with pytest.raises(EditError, match="unsupported architecture"):
        edit.arch.lookup(nn.Linear(2, 2))

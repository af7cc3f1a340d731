"""Layer choice (edit.layers): the given layers, else the cached trace's, else the fallback
rules, each with its warning; and a cache that does not fit the model is ignored."""

from __future__ import annotations

import json
import logging

import pytest
from tiny import LAYERS, tiny_model

from edit import InvalidRequest, layers
from edit.models import weights_hash


@pytest.fixture
def model(tok):
    m = tiny_model("llama", len(tok))
    m.edit_hash = weights_hash(m)
    return m


def _cache(model, **fields) -> None:
    path = layers.trace_cache_path(model.edit_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model_hash": model.edit_hash, **fields}))


def test_given_layers_win_and_are_checked(model, caplog):
    _cache(model, peak_layer=1, layer_range=[0, 1])
    with caplog.at_level(logging.WARNING, logger="edit"):
        assert layers.rome_layer(model, 0) == 0
        assert layers.memit_layers(model, (1,), "MEMIT") == [1]
    assert caplog.text == ""
    with pytest.raises(InvalidRequest, match=f"layer must be in 0..{LAYERS - 1}"):
        layers.rome_layer(model, LAYERS)
    with pytest.raises(InvalidRequest, match="layers must be in"):
        layers.memit_layers(model, (0, LAYERS), "MEMIT")


def test_fallback_rules_without_a_trace(model, caplog):
    with caplog.at_level(logging.WARNING, logger="edit"):
        assert layers.rome_layer(model, None) == LAYERS // 6
        assert layers.memit_layers(model, None, "MEMIT") == list(
            range(LAYERS // 6, min(LAYERS // 6 + 5, LAYERS))
        )
    assert "(n_layers // 6)" in caplog.text and "no tuned MEMIT config" in caplog.text


def test_the_cached_trace_suggests(model, caplog):
    _cache(model, peak_layer=1, layer_range=[0, 1])
    path = layers.trace_cache_path(model.edit_hash)
    assert layers.cached_layer(model) == (1, [0, 1], path)
    with caplog.at_level(logging.WARNING, logger="edit"):
        assert layers.rome_layer(model, None) == 1
        assert layers.memit_layers(model, None, "MEMIT") == [0, 1]
    assert f"from the causal trace of this model (cached at {path})" in caplog.text


@pytest.mark.parametrize(
    "fields", [{"peak_layer": LAYERS}, {"peak_layer": "1"}, {"peak_layer": 1, "model_hash": "x"}]
)
def test_a_cache_that_does_not_fit_is_ignored(model, fields):
    _cache(model, **fields)
    assert layers.cached_layer(model) is None


def test_no_hash_no_cache(tok):
    assert layers.trace_cache_path(None) is None
    assert layers.cached_layer(tiny_model("llama", len(tok))) is None

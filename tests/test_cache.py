"""Every on-disk cache takes its path from edit.cache, keyed one way."""

from __future__ import annotations

from edit import cache


def test_paths_are_keyed_by_kind_model_and_key(monkeypatch, tmp_path):
    monkeypatch.setenv("EDIT_CACHE", str(tmp_path))
    monkeypatch.delenv("EDIT_STATS_CACHE", raising=False)
    p = cache.path("traces", "sha256:" + "ab" * 32, "trace", ext="json")
    assert p == tmp_path / "traces" / ("ab" * 8) / "trace.json"
    assert cache.path("prefixes", None, "x", ext="json") is None  # no hash: nothing to key on


def test_statistics_can_live_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv("EDIT_CACHE", str(tmp_path / "main"))
    monkeypatch.setenv("EDIT_STATS_CACHE", str(tmp_path / "shared"))
    p = cache.path("stats", "cafe" * 16, "model.layers.4.mlp.down_proj", "wiki", "100", ext="st")
    assert p == tmp_path / "shared" / ("cafe" * 4) / "model.layers.4.mlp.down_proj.wiki.100.st"
    assert cache.root("models") == tmp_path / "main" / "models"


def test_digest_is_stable_and_order_free():
    assert cache.digest({"a": 1, "b": [2, 3]}) == cache.digest({"b": [2, 3], "a": 1})
    assert cache.digest([1]) != cache.digest([2])

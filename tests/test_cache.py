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


def test_find_reads_the_users_entry_then_the_shipped_one(monkeypatch, tmp_path):
    monkeypatch.setenv("EDIT_CACHE", str(tmp_path / "user"))
    monkeypatch.delenv("EDIT_STATS_CACHE", raising=False)
    monkeypatch.setattr(cache, "SHIPPED", tmp_path / "shipped")
    model = "sha256:" + "cd" * 32
    assert cache.find("prefixes", model, "k", ext="json") is None  # neither has it
    shipped = tmp_path / "shipped" / "prefixes" / ("cd" * 8) / "k.json"
    shipped.parent.mkdir(parents=True)
    shipped.write_text("[]")
    assert cache.find("prefixes", model, "k", ext="json") == shipped
    assert cache.find("prefixes", "sha256:" + "ef" * 32, "k", ext="json") is None  # other model
    mine = cache.path("prefixes", model, "k", ext="json")
    mine.parent.mkdir(parents=True)
    mine.write_text("[]")
    assert cache.find("prefixes", model, "k", ext="json") == mine  # the user's own first
    assert cache.find("prefixes", None, "k", ext="json") is None


def test_the_shipped_entries_are_named_as_the_cache_names_them():
    """Each shipped file sits where ``find`` looks: <kind>/<16 hex digits of a model>/<key>."""
    files = [p for p in cache.SHIPPED.rglob("*") if p.is_file()]
    assert files, "the package ships the default model's ROME statistics and prefixes"
    for p in files:
        kind, model, _ = p.relative_to(cache.SHIPPED).parts
        assert kind in ("stats", "prefixes") and len(model) == 16
        assert cache.find(kind, "sha256:" + model + "0" * 48, p.stem, ext=p.suffix[1:]) == p


def test_a_gguf_file_is_parsed_once_while_it_is_dequantized(tmp_path, monkeypatch):
    """Inside ``_one_gguf_parse`` the tokenizer's, the config's and the weights' reads of one
    GGUF file share one reader; another file gets its own; the library's reader is back after."""
    import gguf

    from edit.models import _one_gguf_parse

    made = []

    class Reader:
        def __init__(self, path, mode="r"):
            made.append((str(path), mode))

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    with _one_gguf_parse():
        first = gguf.GGUFReader(a)
        assert gguf.GGUFReader(str(a)) is first
        assert gguf.GGUFReader(b) is not first
    assert made == [(str(a), "r"), (str(b), "r")]
    assert gguf.GGUFReader is Reader
    gguf.GGUFReader(a)  # outside: a new read each time, as the library does
    assert len(made) == 3


def test_the_tensor_name_table_of_an_architecture_is_built_once_while_dequantizing(monkeypatch):
    """transformers asks for the table once per module of the model; inside it is built once
    per (architecture, blocks), and the library's function is back after."""
    import gguf

    from edit.models import _one_gguf_parse

    built = []

    def name_map(arch, n_blocks):
        built.append((arch, n_blocks))
        return object()

    monkeypatch.setattr(gguf, "get_tensor_name_map", name_map)
    llama = gguf.MODEL_ARCH.LLAMA
    with _one_gguf_parse():
        first = gguf.get_tensor_name_map(llama, 30)
        assert all(gguf.get_tensor_name_map(llama, 30) is first for _ in range(3))
        assert gguf.get_tensor_name_map(llama, 12) is not first
    assert built == [(llama, 30), (llama, 12)]
    assert gguf.get_tensor_name_map is name_map

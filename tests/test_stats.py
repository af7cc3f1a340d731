"""Key statistics from the user's own text: readers, the cache key, resuming an interrupted
collection, and two processes (torchrun, gloo) that give the one-process second moment."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TINY_ROME

from edit.cli import main
from edit.errors import EditError
from edit.models import load
from edit.readers.text import shipped_text, text_source
from edit.stats import second_moment

MODULE = "model.layers.1.mlp.down_proj"
LINES = [s for s in shipped_text().splitlines() if s.strip()][:300]


def _hashed(model):
    model.edit_hash = "sha256:" + "ab" * 32  # a cache key, as edit.load sets one
    return model


def _cached(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(root.rglob("*.safetensors"))
    return {str(f.relative_to(root)): load_file(f)["second_moment"] for f in files}


def test_text_jsonl_parquet_and_a_dataset_folder_give_one_statistic(
    tmp_path, llama, tok, monkeypatch
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("EDIT_STATS_CACHE", str(tmp_path / "stats"))
    txt = tmp_path / "mine.txt"
    txt.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in LINES))
    (tmp_path / "folder").mkdir()
    pq.write_table(pa.table({"text": LINES, "id": list(range(len(LINES)))}),
                   tmp_path / "folder" / "part-0.parquet")  # fmt: skip
    pq.write_table(pa.table({"text": LINES}), tmp_path / "mine.parquet")
    model = _hashed(llama)
    specs = [txt, tmp_path / "mine.jsonl", tmp_path / "mine.parquet", tmp_path / "folder"]
    results = [
        second_moment(model, tok, MODULE, corpus=str(s), n_tokens=3000, progress=False)
        for s in specs
    ]
    for r in results[1:]:
        assert torch.equal(r, results[0])  # the same tokens, whatever the file format
    # a text file is keyed as it always was: <stem>-<sha256 of its text>-s<seq_len>
    digest = hashlib.sha256(txt.read_text(encoding="utf-8").encode()).hexdigest()[:12]
    names = {p.name for p in (tmp_path / "stats").rglob("*.safetensors")}
    assert f"{MODULE}.mine-{digest}-s127.3000.safetensors" in names
    assert len(names) == 4  # one file per corpus
    assert not list((tmp_path / "stats").rglob("partial/*.safetensors"))  # cleaned up


def test_a_corpus_that_cannot_be_read_is_one_line(tmp_path, tok, llama, model_dir, capsys):
    with pytest.raises(EditError, match="statistics corpus not found: .*nope.txt"):
        text_source(tmp_path / "nope.txt")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "no text column"}) + "\n")
    with pytest.raises(EditError, match="no 'text' column \\(columns: body\\)"):
        second_moment(llama, tok, MODULE, corpus=str(tmp_path / "rows.jsonl"), progress=False)
    with pytest.raises(EditError, match="cannot read statistics corpus no-such/dataset"):
        list(text_source("no-such/dataset").lines())  # the Hub is offline in the tests
    args = ["add", "The capital of [France] [Paris]", "-m", model_dir, "-w", str(tmp_path / "w")]
    assert main([*args, "--stats-corpus", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: statistics corpus not found") and "\n" not in err


def test_an_interrupted_collection_resumes_from_its_partial_sums(tmp_path, llama, tok, monkeypatch):
    monkeypatch.setenv("EDIT_STATS_CACHE", str(tmp_path / "stats"))
    txt = tmp_path / "mine.txt"
    txt.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    model = _hashed(llama)
    kwargs = dict(corpus=str(txt), n_tokens=4000, batch_size=2, progress=False)
    whole = second_moment(model, tok, MODULE, **kwargs, checkpoint_every=1_000)
    (p,) = (tmp_path / "stats").rglob("*.safetensors")
    p.unlink()

    calls, stop_at = [], [8]

    def count_then_stop(_m, _inputs):  # a pre-hook on the first block: one call per batch
        calls.append(1)
        if len(calls) == stop_at[0]:
            stop_at[0] = 0  # once
            raise KeyboardInterrupt

    handle = model.model.layers[0].register_forward_pre_hook(count_then_stop)
    with pytest.raises(KeyboardInterrupt):
        second_moment(model, tok, MODULE, **kwargs, checkpoint_every=3)
    (partial,) = (tmp_path / "stats").rglob("partial/*.safetensors")  # after 6 batches
    calls.clear()
    resumed = second_moment(model, tok, MODULE, **kwargs, checkpoint_every=3)
    handle.remove()
    n_batches = -(-len(range(0, 4000, 127)) // 2)  # 32 sequences of 127 tokens, 2 a batch
    assert len(calls) == n_batches - 6  # only the batches after the checkpoint ran again
    assert torch.equal(resumed, whole)  # float64 sums saved and continued: bit for bit
    assert not partial.exists()


def test_two_processes_give_the_one_process_second_moment(tmp_path, model_dir, monkeypatch):
    """Under torchrun each process sums every other batch; the sums are reduced once and the
    main process writes the file one process writes (same name, same values to round-off).
    Without the reduction the main process would hold the moment of half the tokens."""
    txt = tmp_path / "mine.txt"
    txt.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    two_root, one_root = tmp_path / "two", tmp_path / "one"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", "29641", "-m", "edit"]  # fmt: skip
    tiny = [f"--set={k}={json.dumps(v)}" for k, v in TINY_ROME.items() if k != "stats_tokens"]
    args = ["add", "The capital of [France] [Paris]", "-m", model_dir, "-w", str(tmp_path / "ws"),
            "--stats-corpus", str(txt), "--set=stats_tokens=6000", *tiny]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDIT_STATS_CACHE": str(two_root)}
    two = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("recorded:") == 1  # one ledger entry, written by the main process
    assert two.stdout.count("6000 tokens") == 1 and "on 2 processes" in two.stdout

    monkeypatch.setenv("EDIT_STATS_CACHE", str(one_root))
    model, tok = load(model_dir)
    one = second_moment(model, tok, MODULE, corpus=str(txt), n_tokens=6000, progress=False)
    two_files, one_files = _cached(two_root), _cached(one_root)
    assert set(two_files) == set(one_files) and len(one_files) == 1  # the same file name
    (name,) = one_files
    torch.testing.assert_close(two_files[name], one, rtol=1e-6, atol=1e-9)
    assert not torch.equal(two_files[name], torch.zeros_like(one))


def test_a_statistic_is_named_by_the_identity_its_cache_file_is_keyed_on(
    tmp_path, llama, tok, monkeypatch
):
    from edit import cache
    from edit.stats import statistic_ids

    monkeypatch.setenv("EDIT_STATS_CACHE", str(tmp_path / "stats"))
    txt = tmp_path / "mine.txt"
    txt.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    model = _hashed(llama)
    source = text_source(str(txt))
    second_moment(model, tok, MODULE, corpus=source, n_tokens=3000, progress=False)
    (ident,) = statistic_ids(model, tok, [MODULE], source, 3000).values()
    assert ident[0] == model.edit_hash and ident[1] == MODULE and ident[3] == 3000
    _, module, corpus, n = ident
    assert cache.path("stats", model.edit_hash, module, corpus, str(n), ext="safetensors").is_file()
    assert statistic_ids(llama.__class__(llama.config), tok, [MODULE], source) == {MODULE: None}

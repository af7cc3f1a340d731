"""Data-parallel LoRA training: two processes (torchrun, gloo on the CPU) take the same steps
as one process on the whole batch, and exactly one ledger entry is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from edit.corpus import Example, encode_example
from edit.workspace import Workspace

NAMES = ["Mara", "Ivo", "Lena", "Otto", "Pia", "Rolf", "Sara", "Tomas", "Una", "Vera", "Will"]


def _same_length_examples(tok, n: int) -> list[dict]:
    """QA examples whose answers have one token count, so that the mean of two half-batch
    losses equals the whole batch's mean token loss (data parallelism is then exact)."""
    by_len: dict[int, list[dict]] = {}
    for name in NAMES:
        for city in ("Tallinn", "Bergen", "Paris", "Rome", "Oslo"):
            row = {"question": f"Where was {name} born?", "answer": f"{name} was born in {city}."}
            ids, n_prompt = encode_example(tok, Example(row["question"], row["answer"]), 256)
            by_len.setdefault(len(ids) - n_prompt, []).append(row)
    rows = max(by_len.values(), key=len)
    assert len(rows) >= n, "not enough equal-length examples for the test"
    return rows[:n]


def test_two_processes_match_one(tmp_path, model_dir, tok):
    rows = _same_length_examples(tok, 8)
    corpus = tmp_path / "qa.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["learn", "--corpus", str(corpus), "-m", model_dir, "--epochs", "2", "--lr", "0.01"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", "29517", "-m", "edit"]  # fmt: skip
    two = subprocess.run([*launch, *args, "-w", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("recorded:") == 1  # one report, from the main process
    one = subprocess.run([sys.executable, "-m", "edit", *args, "-w", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]

    (e_two,) = Workspace.inspect(tmp_path / "two").entries()
    (e_one,) = Workspace.inspect(tmp_path / "one").entries()
    t_two, t_one = e_two.update.tensors(), e_one.update.tensors()
    assert set(t_two) == set(t_one)
    for k, v in t_one.items():
        torch.testing.assert_close(t_two[k], v, rtol=2e-3, atol=2e-5, msg=k)
    # both processes' tokens are counted
    assert e_two.info["tokens"] == e_one.info["tokens"]

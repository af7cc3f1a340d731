"""Data-parallel LoRA training in two CPU processes (gloo; started by torchrun, the launcher
``accelerate launch --multi_gpu`` runs: ``accelerate launch --cpu`` starts one process on one
machine): the two record the ledger entry one process records, and only one is written.

Without the reduction (accelerate's DDP averaging the adapter's gradients) each process would
train on half of every batch: the processes would disagree (the non-main one fails) and the
entry would not match the one-process run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from edit.api.workspace import Workspace
from edit.cli import main
from edit.corpus import Example, encode_example

NAMES = ["Mara", "Ivo", "Lena", "Otto", "Pia", "Rolf", "Sara", "Tomas", "Una", "Vera", "Will"]
PORTS = iter(range(29517, 29600))


def _same_length_examples(tok, n: int) -> list[dict]:
    """QA examples whose answers have one token count, so that the mean of two half-batch
    token losses equals the whole batch's mean token loss (data parallelism is then exact)."""
    by_len: dict[int, list[dict]] = {}
    for name in NAMES:
        for city in ("Tallinn", "Bergen", "Paris", "Rome", "Oslo"):
            row = {"question": f"Where was {name} born?", "answer": f"{name} was born in {city}."}
            ids, n_prompt = encode_example(tok, Example(row["question"], row["answer"]), 256)
            by_len.setdefault(len(ids) - n_prompt, []).append(row)
    rows = max(by_len.values(), key=len)
    assert len(rows) >= n, "not enough equal-length examples for the test"
    return rows[:n]


def launch_two(args: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m edit ARGS`` (accelerate runs them as MULTI_CPU)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(next(PORTS)), "-m", "edit"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=600)


def _assert_same_entry(two_ws, one_ws) -> None:
    (e_two,) = Workspace.inspect(two_ws).entries()
    (e_one,) = Workspace.inspect(one_ws).entries()
    t_two, t_one = e_two.update.tensors(), e_one.update.tensors()
    assert set(t_two) == set(t_one)
    for k, v in t_one.items():
        torch.testing.assert_close(t_two[k], v, rtol=2e-3, atol=2e-5, msg=k)
    assert e_two.info["tokens"] == e_one.info["tokens"]  # both processes' tokens counted
    assert e_two.metrics.keys() == e_one.metrics.keys()


@pytest.mark.parametrize("command", ["learn", "forget"])
def test_two_processes_record_what_one_records(tmp_path, model_dir, tok, command, capsys):
    if command == "learn":  # token-mean NLL: exact for equal-length answers in even halves
        # (so the corpus as given: no augmentation, no KL term on other text)
        rows = _same_length_examples(tok, 8)
        extra = ["--epochs", "2", "--set", "augment=false", "--set", "kl_weight=0", "--force"]
    else:  # NPO's loss is a mean over sequences: exact for any lengths and a short last
        # batch (7 examples, batches of 4: the last one splits 2 + 1)
        jobs = ["baker", "pilot", "poet", "judge", "nurse", "cook", "tailor"]
        rows = [
            {"question": f"Who is {n}?", "answer": f"{n} is a {j}."}
            for n, j in zip(NAMES, jobs, strict=False)
        ]
        extra = ["--method", "npo", "--epochs", "2", "--set", "alpha=0", "--set", "kl_weight=0"]
    corpus = tmp_path / "qa.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [command, "--corpus", str(corpus), "-m", model_dir, "--lr", "0.01", *extra]
    two = launch_two([*args, "-w", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("recorded:") == 1  # one report, from the main process
    assert main([*args, "-w", str(tmp_path / "one")]) == 0
    _assert_same_entry(tmp_path / "two", tmp_path / "one")


def test_a_launch_this_machine_cannot_serve_is_one_line(tmp_path, model_dir, capsys, monkeypatch):
    """DeepSpeed asked for but not installed: a one-line error that says what to do."""
    pytest.importorskip("accelerate")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    corpus = tmp_path / "qa.jsonl"
    corpus.write_text(json.dumps({"text": "Mara Velden was born in Tallinn."}) + "\n")
    args = ["learn", "--corpus", str(corpus), "-m", model_dir, "-w", str(tmp_path / "ws")]
    code = main(args)
    err = capsys.readouterr().err.strip()
    if code == 0:  # DeepSpeed is installed here
        pytest.skip("deepspeed is installed")
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: ") and "pip install deepspeed" in err
    assert not (tmp_path / "ws" / "edits").exists() or not any(
        (tmp_path / "ws" / "edits").iterdir()
    )


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    from edit import distributed
    from edit.errors import EditError

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(EditError, match="launched 4 processes on a machine with 2 GPU"):
        distributed.check_launch()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # --cpu: as many processes as asked
    distributed.check_launch()

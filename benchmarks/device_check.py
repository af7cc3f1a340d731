"""CUDA path check: device placement and dtype of load, statistics, ROME and the ledger.

Run on a machine with a GPU (no network needed): builds a random Llama-shaped model with
the test suite's tiny tokenizer, saves it, and drives it through ``edit.load`` (bfloat16,
``device_map="auto"``) and float32, then ROME, the workspace, revert and export.

    python benchmarks/device_check.py

Writes what each check found to ``benchmarks/results/device_check.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
EDITED = "model.layers.2.mlp.down_proj"  # the MLP output ROME edits (layer 2)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tiny import tiny_tokenizer

    assert torch.cuda.is_available(), "no CUDA device"
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    tok = tiny_tokenizer()
    cfg = _llama_config(len(tok))
    torch.manual_seed(0)
    failures = 0
    checks: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = _save_random_model(cfg, tok, Path(tmp) / "model")
        for dtype in (None, "float32"):
            checks[str(dtype)], failed = _check_load(folder, Path(tmp), dtype)
            failures += failed
    print("\nFAILURES:", failures)
    from benchmarks.recording import write_results

    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "failures": failures, "checks": checks}  # fmt: skip
    write_results(args.out, summary, _table(summary), {})
    return 1 if failures else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "device_check"),
                   help="results file stem: <out>.json and <out>.md")  # fmt: skip
    return p


def _llama_config(vocab_size: int):
    """A small Llama shape (4 layers, grouped-query attention) over the tiny vocabulary."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama",
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def _save_random_model(cfg, tok, folder: Path) -> Path:
    """A randomly initialised model of ``cfg`` saved with ``tok`` in ``folder``."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _check_load(folder: Path, tmp: Path, dtype: str | None) -> tuple[dict, int]:
    """``edit.load`` with ``dtype`` (None: the default bfloat16) places the weights on the
    GPU, then a ROME edit through a workspace: what was found, and the failures."""
    import edit

    model, tk = edit.load(str(folder), dtype=dtype)
    w = model.get_submodule(EDITED).weight
    print(
        f"\nload(dtype={dtype}): weight on {w.device} as {w.dtype}; "
        f"hf_device_map={getattr(model, 'hf_device_map', None)}"
    )
    ok = w.device.type == "cuda" and (dtype is not None or w.dtype == torch.bfloat16)
    check = {"weight_device": str(w.device), "weight_dtype": str(w.dtype), "placement_ok": ok}
    return check, int(not ok) + _check_edit(model, tk, tmp, dtype, check)


def _check_edit(model, tk, tmp: Path, dtype: str | None, check: dict) -> int:
    """ROME on layer 2 through a workspace: only the edited weight changes, the export reads
    back equal, the revert is bit-exact. Records into ``check``; returns the failures (a
    refused edit counts as one in float32 only: a random model may not learn it)."""
    from tiny import TINY_FACT, TINY_ROME
    from transformers import AutoModelForCausalLM

    import edit
    from edit.api.workspace import Workspace

    w = model.get_submodule(EDITED).weight
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ws = Workspace.open(tmp / f"ws-{dtype}", model, tk)
    t0 = time.perf_counter()
    try:
        change = ws.add(edit.Fact(**TINY_FACT), progress=False,
                        **dict(TINY_ROME, layer=2, stats_tokens=4000))  # fmt: skip
        entry, res = change.entry, change.result
    except edit.EditFailed as e:
        print("edit refused (a random model may not learn it):", e)
        check["edit_refused"] = str(e)
        return int(dtype == "float32")
    m = res.metrics
    check.update(
        rome_seconds=time.perf_counter() - t0,
        steps=res.info["steps"],
        p_new_before=m["p_new_before"],
        p_new_after=m["p_new_after"],
    )
    print(
        f"ROME: {time.perf_counter() - t0:.2f}s, steps {res.info['steps']}, "
        f"P(new) {m['p_new_before']:.4f} -> {m['p_new_after']:.4f}"
    )
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base[k])]
    print("changed tensors:", changed)
    check["only_edited_weight_changed"] = changed == [EDITED + ".weight"]
    out = ws.export(tmp / f"export-{dtype}")
    reread = AutoModelForCausalLM.from_pretrained(out)
    same = torch.equal(reread.state_dict()[changed[0]].to(w.dtype).cpu(), w.cpu())
    print("export re-read equal:", same)
    check["export_reread_equal"] = same
    ws.revert(entry.id)
    exact = all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    print("revert bit-exact:", exact)
    check["revert_bit_exact"] = exact
    return sum(not c for c in (check["only_edited_weight_changed"], same, exact))


def _table(summary: dict) -> str:
    """The checks as a table, one column per load dtype, under the device and failures."""
    checks = summary["checks"]
    rows = ["| load dtype | " + " | ".join(checks) + " |", "|---|" + "---|" * len(checks)]
    for key in sorted({k for c in checks.values() for k in c}):
        rows.append(f"| {key} | " + " | ".join(str(c.get(key, "")) for c in checks.values()) + " |")
    head = f"{summary['device']}, torch {summary['torch']}: {summary['failures']} failures"
    return head + "\n\n" + "\n".join(rows)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

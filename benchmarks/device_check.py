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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "device_check"),
                   help="results file stem: <out>.json and <out>.md")  # fmt: skip
    args = p.parse_args(argv)

    from tiny import TINY_FACT, TINY_ROME, tiny_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    import edit
    from edit.workspace import Workspace

    assert torch.cuda.is_available(), "no CUDA device"
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    tok = tiny_tokenizer()
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
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
    torch.manual_seed(0)
    failures = 0
    checks: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
        settings = dict(TINY_ROME, layer=2, stats_tokens=4000)
        for dtype in (None, "float32"):
            model, tk = edit.load(str(folder), dtype=dtype)
            w = model.get_submodule("model.layers.2.mlp.down_proj").weight
            print(
                f"\nload(dtype={dtype}): weight on {w.device} as {w.dtype}; "
                f"hf_device_map={getattr(model, 'hf_device_map', None)}"
            )
            ok = w.device.type == "cuda" and (dtype is not None or w.dtype == torch.bfloat16)
            failures += not ok
            check = checks[str(dtype)] = {
                "weight_device": str(w.device),
                "weight_dtype": str(w.dtype),
                "placement_ok": ok,
            }
            base = {k: v.clone() for k, v in model.state_dict().items()}
            ws = Workspace.open(Path(tmp) / f"ws-{dtype}", model, tk)
            t0 = time.perf_counter()
            try:
                entry, res = ws.add(edit.Fact(**TINY_FACT), progress=False, **settings)
            except edit.EditFailed as e:
                print("edit refused (a random model may not learn it):", e)
                failures += dtype == "float32"
                check["edit_refused"] = str(e)
                continue
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
            failures += changed != ["model.layers.2.mlp.down_proj.weight"]
            check["only_edited_weight_changed"] = changed == ["model.layers.2.mlp.down_proj.weight"]
            out = ws.export(Path(tmp) / f"export-{dtype}")
            reread = AutoModelForCausalLM.from_pretrained(out)
            same = torch.equal(reread.state_dict()[changed[0]].to(w.dtype).cpu(), w.cpu())
            print("export re-read equal:", same)
            failures += not same
            check["export_reread_equal"] = same
            ws.revert(entry.id)
            exact = all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
            print("revert bit-exact:", exact)
            failures += not exact
            check["revert_bit_exact"] = exact
    print("\nFAILURES:", failures)
    from benchmarks.recording import write_results

    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "failures": failures, "checks": checks}  # fmt: skip
    rows = ["| load dtype | " + " | ".join(checks) + " |", "|---|" + "---|" * len(checks)]
    for key in sorted({k for c in checks.values() for k in c}):
        rows.append(f"| {key} | " + " | ".join(str(c.get(key, "")) for c in checks.values()) + " |")
    table = f"{summary['device']}, torch {summary['torch']}: {failures} failures\n\n" + "\n".join(
        rows
    )
    write_results(args.out, summary, table, {})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

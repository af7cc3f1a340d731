"""Where Min-K%++ sees a forget: the NPO forget of TOFU forget01 with the settings of a
`tofu_unlearn.py` run (its summary.json), then, per example of the forget split and of the
audit's holdout, on the forgotten model and on the reference: the mean of the lowest 20 % of
z = (log p − μ) / σ (Min-K%++), of log p (Min-K%), μ at those lowest-z tokens (minus the
entropy there) and the mean entropy, printed as quantiles over examples. The forget is
reverted at the end.

    .venv/bin/python benchmarks/tofu_tokens.py [KEY=VALUE ...]   # after tofu_unlearn.py

KEY=VALUE override forget settings (entropy_weight=1).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def row(name: str, stats) -> str:
    """One line of quantiles over examples for ``stats`` (mia.TokenStats per example)."""
    low_z, low_logp, mu_low, entropy = [], [], [], []
    for s in stats:
        z = (s.logp - s.mu) / s.sigma
        n = max(1, int(len(z) * 0.2))
        lowest = np.argsort(z)[:n]
        low_z.append(z[lowest].mean())
        low_logp.append(np.sort(s.logp)[:n].mean())
        mu_low.append(s.mu[lowest].mean())
        entropy.append((-s.mu).mean())

    def q(x) -> str:
        return " ".join(f"{v:7.2f}" for v in np.quantile(x, QUANTILES))

    return (f"{name:20s} low-z {q(low_z)} | low-logp {q(low_logp)} | mu at low-z {q(mu_low)}"
            f" | entropy {q(entropy)}")  # fmt: skip


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.tofu_audit import _audit_sets
    from benchmarks.tofu_unlearn import aim_for
    from edit.api.workspace import Workspace
    from edit.config import parse_settings
    from edit.evals import mia

    run, data = ROOT / "bench-out" / "tofu", ROOT.parent / "shared" / "data" / "tofu"
    ran = json.loads((run / "summary.json").read_text())["settings"]
    settings = {**ran["forget"], **parse_settings(sys.argv[1:])}
    out = run / "tokens"
    out.mkdir(parents=True, exist_ok=True)
    forget10, forget, kept, _, examples = _audit_sets(data, "forget01", "related", out)
    ref = Workspace.open(run / "ws-reference", create=False)
    ws = Workspace.open(run / "ws-target", create=False)
    aim = aim_for(data, forget10, ran.get("holdout", 0), "none", ref.model)
    t = time.perf_counter()
    entry = ws.forget([q.example() for q in forget], [q.example() for q in kept],
                      method="npo", **aim, **settings).entry  # fmt: skip
    print(f"forget {time.perf_counter() - t:.0f} s ({settings})", flush=True)
    print(f"quantiles {QUANTILES} over examples")
    try:
        for label, model in (("changed", ws.model), ("reference", ref.model)):
            for part in ("forget", "holdout"):
                stats = mia.token_stats(model, ws.tok, getattr(examples, part))
                print(row(f"{label} {part}", stats), flush=True)
    finally:
        ws.revert(entry.id)


if __name__ == "__main__":
    main()

"""Reading ROME's known-facts file (``known_1000.json``): the facts a causal trace averages
over."""

from __future__ import annotations

import json
import os
from pathlib import Path

from edit.errors import EditError
from edit.facts import Fact


def load_known(path: str | os.PathLike) -> list[Fact]:
    """Facts from a JSON list of ``{"prompt", "subject", "attribute"}`` records (ROME's
    ``known_1000.json``; ``"target"`` may stand for ``"attribute"``)."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EditError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EditError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise EditError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise EditError(f"{path}: expected a non-empty JSON list of facts (known_1000.json format)")
    facts = []
    for i, r in enumerate(records):
        target = r.get("attribute", r.get("target")) if isinstance(r, dict) else None
        if not isinstance(r, dict) or not r.get("prompt") or not r.get("subject") or not target:
            raise EditError(
                f"{path}: record {i} needs 'prompt', 'subject' and 'attribute' "
                f"(ROME's known_1000.json format)"
            )
        try:
            facts.append(Fact.from_dict({**r, "target": target}))
        except EditError as e:
            raise EditError(f"{path}: record {i}: {e}") from None
    return facts

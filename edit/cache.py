"""Where everything this library caches on disk lives, keyed one way.

Every on-disk cache (dequantized models, weight hashes, second-moment statistics, null-space
projectors, sampled prefix texts, tracing results) takes its path from here:

    root(kind)                               <cache>/<kind>
    path(kind, model_hash, *key, ext=...)    <cache>/<kind>/<model>/<key parts joined by ".">.<ext>

``<cache>`` is ``$EDIT_CACHE`` or ``~/.cache/edit``; statistics and projectors may live
elsewhere (``$EDIT_STATS_CACHE``, a folder to share between machines). ``<model>`` is the
first 16 hex digits of the model's content hash (``model.edit_hash``). A model that was not
loaded by :func:`edit.load` has no hash: nothing safe to key on, so ``path`` answers ``None``
and the caller computes without caching.

The package ships a few entries for the embedded default model (``edit/data/cache/<kind>/
<model>/``: the key statistics and prefixes of its tuned ROME edit), so that the first edit
on a fresh machine does not wait for them; :func:`find` reads them where the user's cache has
none. They are keyed exactly as the user's cache would key them: another corpus, token count
or model misses them and is computed as before.

:func:`tensors` keeps a safetensors entry in this process's memory as well (the null-space
projectors, reused by every AlphaEdit batch): one lookup, memory then disk then computed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

_MEMORY: dict[Path, dict[str, Any]] = {}  # path -> tensors, for this process (see tensors)
_OVERRIDES = {"stats": "EDIT_STATS_CACHE"}  # kinds whose folder an environment variable moves
SHIPPED = Path(__file__).resolve().parent / "data" / "cache"  # entries the package ships


def cache_dir() -> Path:
    """Root of every cache: ``$EDIT_CACHE`` or ``~/.cache/edit``."""
    return Path(os.environ.get("EDIT_CACHE") or Path.home() / ".cache" / "edit")


def root(kind: str) -> Path:
    """The folder of one kind of cache."""
    moved = os.environ.get(_OVERRIDES.get(kind, ""), "")
    return Path(moved) if moved else cache_dir() / kind


def model_key(model_hash: str) -> str:
    """The short form of a model hash used in cache paths (``sha256:abcd…`` -> 16 digits)."""
    return model_hash.split(":")[-1][:16]


def path(kind: str, model_hash: str | None, *key: str, ext: str) -> Path | None:
    """The cache file of ``key`` for one model, or ``None`` for a model with no hash."""
    if not model_hash:
        return None
    return root(kind) / model_key(model_hash) / (".".join([*key, ext]))


def find(kind: str, model_hash: str | None, *key: str, ext: str) -> Path | None:
    """The existing file of ``key`` to read: the user's cache entry, else the one the
    package ships; ``None`` where neither exists (or the model has no hash)."""
    mine = path(kind, model_hash, *key, ext=ext)
    if mine is None or mine.is_file():
        return mine
    shipped = SHIPPED / kind / model_key(model_hash) / mine.name
    return shipped if shipped.is_file() else None


def digest(value: object, n: int = 24) -> str:
    """A short stable name for a JSON-able key (settings, lists of numbers)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def tensors(kind: str, model_hash: str | None, *key: str, compute: Callable[[], dict]) -> dict:
    """The safetensors entry of ``key`` (name -> tensor): from this process's memory, the
    disk (the user's cache or the shipped one), or ``compute()`` saved to the user's cache.
    A model with no hash: computed each time, kept nowhere."""
    mine = path(kind, model_hash, *key, ext="safetensors")
    if mine is None:
        return compute()
    if mine in _MEMORY:
        return _MEMORY[mine]
    stored = find(kind, model_hash, *key, ext="safetensors")
    if stored is not None:
        from safetensors.torch import load_file

        found = load_file(stored)
    else:
        from edit.atomic import save_tensors

        found = compute()
        save_tensors(mine, found)
    _MEMORY[mine] = found
    return found

"""The edit ledger: a folder that records a base model and every change made to it.

    ws = Workspace.open("edit-workspace")          # loads the recorded base model + edits
    entry = ws.add("Paris is capital of Italy")    # edit, check, record (atomically)
    ws.revert(entry.id)                            # weights equal the base again, bit for bit
    ws.export("merged/")                           # a plain Hugging Face model folder

Layout::

    workspace.json            {"format": 1, "base": {"source": ..., "hash": "sha256:..."}}
    edits/0001.safetensors    one file per edit: the low-rank factors as tensors, and in the
                              header metadata the request, config, layers, metrics, a checksum
    reverted/0001.safetensors reverted edits, kept for the record

The model is the base plus the edits in ``edits/``, applied in id order. Opening a workspace
with a model whose weights hash differs from the recorded one is refused. Every file is
written to a temporary name and renamed into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from edit import arch as arch_table
from edit import distributed
from edit.api import EditResult, apply
from edit.atomic import new_folder, write_bytes
from edit.errors import EditError, EditFailed
from edit.facts import Fact
from edit.models import load, weights_hash
from edit.placement import read_weight, write_weight
from edit.update import Update

log = logging.getLogger(__name__)

FORMAT = 1
DEFAULT_WORKSPACE = "edit-workspace"


@dataclass
class Entry:
    """One recorded change."""

    id: str
    kind: str
    method: str
    facts: list[Fact]
    layers: list[int]
    config: dict[str, Any]
    metrics: dict[str, Any]
    created: str
    update: Update
    path: Path
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        when = self.created[:19]
        if not self.facts:  # a LoRA run (forget / learn) on a corpus
            corpus = self.info.get("corpus", "?")
            n = self.info.get("examples", "?")
            return f"{self.id}  {when}  {self.kind:<6} {self.method:<6} {corpus} ({n} examples)"
        fact = self.facts[0]
        what = (
            f"{fact.text} -> {fact.target}"
            if self.kind == "insert"
            else f"{fact.text} -/-> {fact.target}"
        )
        more = f" (+{len(self.facts) - 1} more)" if len(self.facts) > 1 else ""
        return (
            f"{self.id}  {when}  {self.kind:<6} {self.method:<6} layers {self.layers}  {what}{more}"
        )


class Workspace:
    def __init__(self, path: Path, model: nn.Module, tok, base: dict) -> None:
        self.path = path
        self.model = model
        self.tok = tok
        self.base = base
        self._base_weights: dict[str, torch.Tensor] = {}  # pristine copies of touched weights

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: str | os.PathLike = DEFAULT_WORKSPACE,
        model: nn.Module | None = None,
        tok=None,
        *,
        model_name: str | None = None,
        create: bool = True,
        **load_kwargs,
    ) -> Workspace:
        """Open (or create) the workspace at ``path`` and bring ``model`` to base + edits.

        Without ``model``, the recorded base (or ``model_name``, or the default model) is
        loaded. All edit files are read and verified before any is applied.
        """
        path = Path(path)
        meta = _read_meta(path)
        if meta is None:
            if path.exists() and any(path.iterdir()):
                raise EditError(f"{path} exists and is not an edit workspace (no workspace.json)")
            if not create:
                raise EditError(f"no workspace at {path}: make an edit first, or pass --workspace")

        if model is None:
            source = model_name or (meta["base"]["source"] if meta else None)
            model, tok = load(source, **load_kwargs)
        model_hash = getattr(model, "edit_hash", None) or weights_hash(model)
        if meta is not None and meta["base"]["hash"] != model_hash:
            raise EditError(
                f"workspace {path} was made for base model {meta['base']['source']!r} "
                f"({meta['base']['hash'][:19]}…), but this model's weights hash is "
                f"{model_hash[:19]}…: use that base model or another --workspace"
            )
        source = getattr(model, "edit_source", None) or getattr(model, "name_or_path", "unknown")
        base = (
            meta["base"]
            if meta
            else {
                "source": source,
                "hash": model_hash,
            }
        )
        ws = cls(path, model, tok, base)
        entries = ws.entries()  # raises on a corrupt file, before anything is applied
        for entry in entries:
            ws._apply(entry.update)
        return ws

    @classmethod
    def inspect(cls, path: str | os.PathLike = DEFAULT_WORKSPACE) -> Workspace:
        """The ledger alone, without loading a model: for listing entries."""
        meta = _read_meta(Path(path))
        if meta is None:
            raise EditError(f"no workspace at {path}: make an edit first, or pass --workspace")
        return cls(Path(path), None, None, meta["base"])

    def _ensure_created(self) -> None:
        meta_file = self.path / "workspace.json"
        if meta_file.is_file():
            return
        (self.path / "edits").mkdir(parents=True, exist_ok=True)
        write_bytes(
            meta_file,
            json.dumps({"format": FORMAT, "base": self.base, "created": _now()}, indent=2).encode(),
        )

    # ------------------------------------------------------------------ reading

    def entries(self, folder: str = "edits") -> list[Entry]:
        d = self.path / folder
        if not d.is_dir():
            return []
        return [read_entry(p) for p in sorted(d.glob("*.safetensors"))]

    def entry(self, entry_id: str) -> Entry:
        for e in self.entries():
            if e.id == entry_id.zfill(4):
                return e
        known = ", ".join(e.id for e in self.entries()) or "none"
        raise EditError(
            f"no edit with id {entry_id!r} in {self.path} (active edits: {known}); see 'edit log'"
        )

    # ------------------------------------------------------------------ changing

    def history(self) -> dict[str, torch.Tensor]:
        """Per module, the keys (m, d_in) written by the active edits, in ledger order:
        what AlphaEdit keeps later batches from overwriting."""
        keys: dict[str, list[torch.Tensor]] = {}
        for entry in self.entries():
            for module, k in entry.update.keys.items():
                keys.setdefault(module, []).append(k)
        return {m: torch.cat(ks) for m, ks in keys.items()}

    def default_method(self, batch: bool) -> str:
        """ROME for one fact; for a batch, MEMIT on a workspace without edits and AlphaEdit
        (which keeps earlier edits intact) on one that has some."""
        if not batch:
            return "rome"
        return "alphaedit" if self.entries() else "memit"

    def add(
        self, request: str | Fact | dict | list, method: str | None = None, **kwargs
    ) -> tuple[Entry, EditResult]:
        """Edit the model (see :func:`edit.apply`) and record the edit: a list of requests
        is one batch, one entry. If recording fails, the edit is undone. The default method
        is :meth:`default_method`.
        """
        method = method or self.default_method(isinstance(request, list | tuple))
        result = apply(
            self.model, self.tok, request, method=method, history=self.history(), **kwargs
        )
        result.handle.undo()  # re-applied below through the ledger path, from pristine copies
        entry = self._record_once(result, result.update)
        self._apply(entry.update)
        return entry, result

    def erase(self, request: str | Fact | dict, **kwargs) -> tuple[Entry, EditResult]:
        return self.add(request, erase=True, **kwargs)

    def forget(self, corpus, retain=None, *, holdout=None, progress: bool = True, **settings):
        """Unlearn a corpus with a LoRA adapter (see ``edit.methods.unlearn``) and record it
        as one entry. ``corpus``/``retain``/``holdout``: a JSON Lines path or a list of
        ``edit.corpus.Example``; without ``retain``, slices of the shipped WikiText-2 text.
        ``holdout``: never-seen examples of the same kind; training stops once the corpus's
        NLL reaches theirs. ``settings`` override ``UnlearnConfig`` (method, epochs, lr,
        lora_rank, ...). Returns (entry, LoraResult)."""
        return self._train("forget", corpus, retain, progress, settings, holdout)

    def learn(self, corpus, *, progress: bool = True, **settings):
        """Fine-tune a LoRA adapter on a corpus (plain NLL) and record it as one entry."""
        return self._train("learn", corpus, None, progress, settings)

    def revert(self, entry_id: str) -> Entry:
        """Remove an edit; the weights become the base plus the remaining edits, exactly."""
        entry = self.entry(entry_id)
        (self.path / "reverted").mkdir(exist_ok=True)
        os.replace(entry.path, self.path / "reverted" / entry.path.name)
        self._rebuild()
        return entry

    def export(self, out_dir: str | os.PathLike) -> Path:
        """Write the edited model as a plain Hugging Face folder (safetensors)."""
        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise EditError(f"{out} already exists and is not empty: choose a new folder")
        with new_folder(out) as tmp:
            self.model.save_pretrained(tmp)
            if self.tok is not None:
                self.tok.save_pretrained(tmp)
            ledger = {"base": self.base, "edits": [_entry_json(e) for e in self.entries()]}
            (tmp / "edit_ledger.json").write_text(json.dumps(ledger, indent=2))
        return out

    @contextmanager
    def without(self, entry_id: str) -> Iterator[nn.Module]:
        """The model as it would be without one entry (every other one applied), for
        comparisons such as an audit; the weights are rebuilt exactly on exit.

            with ws.without("0003") as before:
                measure(before)
        """
        skip = self.entry(entry_id).id
        try:
            self._rebuild(skip=skip)
            yield self.model
        finally:
            self._rebuild()

    # ------------------------------------------------------------------ internals

    def _train(self, objective, corpus, retain, progress: bool, settings: dict, holdout=None):
        from edit.config import resolve
        from edit.corpus import read_corpus, wikitext_retain
        from edit.methods.unlearn import (
            UnlearnConfig,
            answer_nll,
            for_objective,
            lora_update,
            train_lora,
        )

        def examples(x):
            return read_corpus(x) if isinstance(x, str | os.PathLike) else list(x)

        data = examples(corpus)  # every line checked before anything is trained
        unseen = examples(holdout) if holdout is not None else None
        if retain is not None:
            kept = examples(retain)
        else:
            kept = wikitext_retain(self.tok) if objective == "forget" else []
        config = resolve("unlearn", UnlearnConfig, self.model, **settings)
        config = for_objective(config, objective, retain=bool(kept))
        stop_source = ("never-seen set" if unseen is not None and config.stop_nll is None
                       else "stop_nll" if config.stop_nll is not None else None)  # fmt: skip
        learned_by = None
        if objective == "forget" and stop_source is None and config.stop_at_learned:
            learned_by = self._learned_by(data)
            if learned_by is not None:  # the corpus's level as text this model never saw
                with self.without(learned_by.id):
                    level = answer_nll(self.model, self.tok, data, max_len=config.max_len)
                config = dataclasses.replace(config, stop_nll=level)
                stop_source = f"its NLL without entry {learned_by.id}, which learned it"
        res = train_lora(self.model, self.tok, data, kept, config, objective=objective,
                         progress=progress, holdout=unseen)  # fmt: skip
        update = lora_update(res)
        if not update.is_finite():
            raise EditFailed(f"{objective} produced a non-finite adapter; nothing was recorded")
        prefix = arch_table.lookup(self.model).layers + "."
        layers = sorted({int(n[len(prefix) :].split(".")[0]) for n in res.target_modules})
        info = {
            "corpus": str(corpus) if isinstance(corpus, str | os.PathLike) else "(in memory)",
            "examples": len(data),
            "retain": (str(retain) if isinstance(retain, str | os.PathLike) else
                       "(in memory)" if retain is not None else "wikitext2 (shipped)"),
            "retain_examples": len(kept),
            "holdout": (str(holdout) if isinstance(holdout, str | os.PathLike) else
                        "(in memory)" if holdout is not None else None),
            "losses": res.losses,
            "seconds": res.seconds,
            "tokens": res.tokens,
            "tokens_per_second": res.tokens_per_second,
            "target_modules": res.target_modules,
            "lora_config": res.lora_config,
            "stop_source": stop_source,
            "learned_by": learned_by.id if learned_by is not None else None,
        }  # fmt: skip
        if objective == "learn":  # lets a later forget find the entry that learned its corpus
            info["example_hashes"] = [ex.fingerprint() for ex in data]
        method = config.method if objective == "forget" else "lora"
        result = EditResult(objective, method, [], update, layers, config, res.metrics, info)
        entry = self._record_once(result, update)
        self._apply(entry.update)
        return entry, res

    def _record_once(self, result: EditResult, update: Update) -> Entry:
        """Record ``result`` (on failure nothing is written, the model unchanged). Under a
        launcher only the main process writes; the others wait for the entry, then check
        that it holds the update they computed (the processes did not diverge)."""
        if distributed.is_main():
            entry = self._record(result)
        distributed.wait_for_everyone()
        if distributed.is_main():
            return entry
        entry = self.entries()[-1]
        mine = update.tensors()
        theirs = entry.update.tensors()
        same = set(mine) == set(theirs) and all(torch.equal(mine[k], v) for k, v in theirs.items())
        if not same:
            raise EditFailed(
                f"process {distributed.rank_and_size()[0]} computed another update than the "
                f"main process: the processes diverged (entry {entry.id} holds the main one)"
            )
        return entry

    def _learned_by(self, examples) -> Entry | None:
        """The latest ``learn`` entry that learned every one of ``examples``, if any."""
        wanted = {ex.fingerprint() for ex in examples}
        for entry in reversed(self.entries()):
            learned = set(entry.info.get("example_hashes") or ())
            if wanted and entry.kind == "learn" and wanted <= learned:
                return entry
        return None

    @torch.no_grad()
    def _apply(self, update: Update) -> None:
        for name in update.factors:
            if name not in self._base_weights:
                self._base_weights[name] = read_weight(self.model, name).detach().clone()
        update.apply(self.model)

    @torch.no_grad()
    def _rebuild(self, skip: str | None = None) -> None:
        """Base weights plus every entry (but ``skip``), applied in order."""
        for name, w in self._base_weights.items():
            write_weight(self.model, name, w)
        for entry in self.entries():
            if entry.id != skip:
                self._apply(entry.update)

    def _record(self, result: EditResult) -> Entry:
        self._ensure_created()
        tensors = result.update.tensors()
        meta = {
            "edit.format": str(FORMAT),
            "kind": result.kind,
            "method": result.method,
            "facts": json.dumps([f.to_dict() for f in result.facts]),
            "layers": json.dumps(result.layers),
            "config": json.dumps(result.config_dict()),
            "metrics": json.dumps(result.metrics),
            "info": json.dumps(result.info),
            "created": _now(),
            "base_hash": self.base["hash"],
            "checksum": _checksum(tensors),
        }
        edits = self.path / "edits"
        fd, tmp = tempfile.mkstemp(dir=edits, prefix=".edit-", suffix=".safetensors")
        os.close(fd)
        try:
            while True:  # the next free id; link() fails rather than overwrite a concurrent one
                taken = [
                    int(p.stem)
                    for d in ("edits", "reverted")
                    for p in (self.path / d).glob("*.safetensors")
                    if p.stem.isdigit()
                ]
                meta["id"] = f"{max(taken, default=0) + 1:04d}"
                save_file(tensors, tmp, metadata=meta)
                path = edits / f"{meta['id']}.safetensors"
                try:
                    os.link(tmp, path)
                    break
                except FileExistsError:
                    continue
        finally:
            Path(tmp).unlink(missing_ok=True)
        return read_entry(path)


def _read_meta(path: Path) -> dict | None:
    meta_file = path / "workspace.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        meta["base"]["hash"], meta["base"]["source"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise EditError(f"{meta_file} is corrupt: restore it or start a new workspace") from None
    return meta


def read_entry(path: Path) -> Entry:
    """Read and verify one edit file; a damaged file gets a one-line error naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("checksum") != _checksum(tensors):
            raise ValueError("checksum mismatch")
        entry = Entry(
            id=meta["id"],
            kind=meta["kind"],
            method=meta["method"],
            facts=[Fact.from_dict(d) for d in json.loads(meta["facts"])],
            layers=json.loads(meta["layers"]),
            config=json.loads(meta["config"]),
            metrics=json.loads(meta["metrics"]),
            info=json.loads(meta.get("info", "{}")),
            created=meta["created"],
            update=Update.from_tensors(tensors),
            path=path,
        )
    except Exception as e:  # safetensors raises several types on damaged files
        raise EditError(
            f"edit file {path} is corrupt or truncated ({type(e).__name__}: {str(e)[:80]}): "
            f"restore it, or move it out of the workspace to drop that edit"
        ) from None
    return entry


def _entry_json(e: Entry) -> dict:
    return {
        "id": e.id,
        "kind": e.kind,
        "method": e.method,
        "layers": e.layers,
        "facts": [f.to_dict() for f in e.facts],
        "config": e.config,
        "metrics": e.metrics,
        "created": e.created,
    }


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

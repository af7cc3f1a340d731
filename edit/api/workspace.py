"""A workspace: a model kept in step with its ledger (``edit.ledger``), the folder that
records a base model and every change made to it.

    ws = Workspace.open("edit-workspace")          # loads the recorded base model + edits
    change = ws.add("Paris is capital of Italy")   # edit, check, record (atomically)
    ws.revert(change.entry.id)                     # weights equal the base again, bit for bit
    ws.export("merged/")                           # a plain Hugging Face model folder

Layout::

    workspace.json            {"format": 2, "base": {"source": ..., "hash": "sha256:..."}}
    manifest.jsonl            every add and revert, hash-chained (see ``edit.ledger``)
    edits/0001.safetensors    one file per edit: the low-rank factors as tensors, and in the
                              header metadata the id, request, config, layers, metrics
    reverted/0001.safetensors reverted edits, kept for the record
    .lock                     the writers' lock (``edit.lock``)
    signature.json            the head signed with the user's key, where there is one
                              (``edit.ledger.sign``)

The model is the base plus the active entries of the manifest, applied in order. Opening
checks everything first: the base model's identity (a hash of its weights as stored, so the
dtype and device it is loaded in do not matter), the manifest's chain, every entry's
content hash, and that every factor is finite and fits the model's weights; any problem is
refused in one line before anything is applied. Writes are atomic and serialized
(``edit.ledger.write``): one writer at a time, and a writer commits only on top of the
ledger it opened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edit import distributed, lm, neurons
from edit.api.edits import EditResult, apply
from edit.atomic import check_new_folder, new_folder
from edit.errors import EditError, EditFailed, InvalidRequest
from edit.facts import Fact
from edit.ledger import META, Entry, Ledger, header, read_ledger, read_meta, unborn
from edit.ledger import sign as signing
from edit.ledger import write as writer
from edit.lock import WorkspaceLock
from edit.models import DEFAULT_MODEL, load, skeleton, source_hash, weights_hash
from edit.placement import read_weight, write_weight
from edit.update import Update

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE = "edit-workspace"


@dataclass(frozen=True)
class Change:
    """A recorded change, as :meth:`Workspace.add`, :meth:`~Workspace.erase`,
    :meth:`~Workspace.forget` and :meth:`~Workspace.learn` return it: the ledger ``entry``,
    and what the method measured (``result``: an ``EditResult`` for an edit, the LoRA run's
    ``LoraResult`` for a forget or learn run)."""

    entry: Entry
    result: Any

    @property
    def health(self) -> dict | None:
        """The model's health before and after the change (WikiText-2 perplexity and the
        general-knowledge probe, ``edit.evals.knowledge.Guard``) when a guard measured it,
        as the entry records it; None otherwise."""
        return self.entry.info.get("guard")


class Workspace:
    def __init__(
        self, path: Path, model: nn.Module, tok, base: dict, ledger: Ledger | None = None
    ) -> None:
        self.path = path
        self.model = model
        self.tok = tok
        self.base = base
        self.lock = WorkspaceLock(path)
        self._made = False  # this process made the folder of a new workspace (see close)
        self._ledger = ledger if ledger is not None else Ledger(path, None)
        self._active = [Entry.from_data(e) for e in self._ledger.active]
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
        exclusive: bool = False,
        dropping: str | None = None,
        **load_kwargs,
    ) -> Workspace:
        """Open (or create) the workspace at ``path`` and bring ``model`` to base + edits.

        Without ``model``, the recorded base (or ``model_name``, or the default model) is
        loaded. The whole ledger is read and checked before any entry is applied. With
        ``exclusive``, this process is the workspace's only writer until :meth:`close`
        (or its exit); otherwise each change takes the lock while it writes. ``dropping``:
        the id of a broken entry (its file lost or damaged) that is about to be dropped
        (:meth:`drop`): its problem alone is let through, and it is not applied.
        """
        path = Path(path)
        meta = read_meta(path)
        # a writer's signing key that cannot be read: refused before any work
        key = signing.signing_key() if exclusive else None
        made = False
        if meta is None:
            if path.exists() and not unborn(path):
                raise EditError(f"{path} exists and is not an edit workspace (no {META})")
            if not create:
                raise EditError(f"no workspace at {path}: make an edit first, or pass --workspace")
            check_new_folder(path, may_exist=path.is_dir())  # known before any work is done
            if exclusive:  # its folder and lock now: a second writer is refused before loading
                try:
                    path.mkdir()
                    made = True
                except FileExistsError:
                    pass
                except OSError as e:
                    raise EditError(f"cannot make {path}: {e.strerror}") from None
        lock = WorkspaceLock(path)
        try:
            if exclusive:
                lock.acquire(exclusive=True)
        except BaseException:
            if made:  # another writer locked it first: the folder is theirs now
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        try:
            if meta is None and not exclusive:  # new: nothing to read, and its writer (the
                ledger = Ledger(path, None)  # main process of a parallel run) may hold the lock
            else:
                with lock.shared():
                    ledger = read_ledger(path)
            dropping = dropping.zfill(4) if dropping else None
            ledger.check(dropping)  # a damaged ledger is refused before loading a model
            signing.check_before_signing(ledger, key)  # and a forged signature, for a writer
            if model is None:
                source = model_name or (meta["base"]["source"] if meta else None)
                if meta is not None:
                    check_base(path, meta["base"], source_hash(source or DEFAULT_MODEL))
                model, tok = load(source, **load_kwargs)
            model_hash = getattr(model, "edit_hash", None) or weights_hash(model)
            if meta is not None:
                check_base(path, meta["base"], model_hash)
            source = getattr(model, "edit_source", None) or getattr(model, "name_or_path", "?")
            base = meta["base"] if meta else {"source": source, "hash": model_hash}
            ws = cls(path, model, tok, base, ledger)
            if dropping in ledger.broken:
                ws._active = [e for e in ws._active if e.id != dropping]
            for entry in list(ws._active):  # every entry must fit before any is applied
                problem = entry.update.misfit(model)
                if not problem:
                    continue
                problem = (
                    f"entry {entry.id} ({entry.path}) does not fit this model: {problem}: "
                    f"restore it from a backup"
                )
                ledger.flag(problem, entry.id)
                if entry.id != dropping:
                    raise EditError(f"workspace {path}: {ledger.broken[entry.id]}")
                ws._active.remove(entry)
        except BaseException:
            if exclusive:
                if meta is None and lock.held_exclusive:
                    writer.remove_unborn(path, made)
                lock.release()
            raise
        ws.lock, ws._made = lock, made
        for entry in ws._active:
            ws._apply(entry.update)
        return ws

    @classmethod
    def inspect(cls, path: str | os.PathLike = DEFAULT_WORKSPACE) -> Workspace:
        """The ledger alone, checked, without loading a model: for listing entries."""
        path = Path(path)
        meta = read_meta(path)
        if meta is None:
            raise EditError(f"no workspace at {path}: make an edit first, or pass --workspace")
        with WorkspaceLock(path).shared():
            ledger = read_ledger(path)
        check_shapes(ledger, meta["base"]["source"])
        ledger.check()
        return cls(path, None, None, meta["base"], ledger)

    def close(self) -> None:
        """Give up this process's writer lock (see ``open(exclusive=True)``); a new
        workspace in which nothing was recorded is removed again."""
        if self._ledger.meta is None and self.lock.held_exclusive:
            writer.remove_unborn(self.path, self._made)
        self.lock.release()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def entries(self, folder: str = "edits") -> list[Entry]:
        """The active entries in ledger order (``folder="reverted"``: the reverted ones)."""
        if folder == "reverted":
            return [Entry.from_data(e) for e in self._ledger.reverted]
        return list(self._active)

    def entry(self, entry_id: str) -> Entry:
        for e in self._active:
            if e.id == entry_id.zfill(4):
                return e
        known = ", ".join(e.id for e in self._active) or "none"
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
        """:func:`default_method` for this workspace."""
        return default_method(batch, bool(self.entries()), self.model)

    def add(
        self, request: str | Fact | dict | list, method: str | None = None, *, guard=None,
        **kwargs,
    ) -> Change:  # fmt: skip
        """Edit the model (see :func:`edit.apply`) and record the edit: a list of requests
        is one batch, one entry. If recording fails, the edit is undone. The default method
        is :meth:`default_method`. ``guard``: as for :meth:`forget`.
        """
        method = method or self.default_method(isinstance(request, list | tuple))
        result = apply(
            self.model, self.tok, request, method=method, history=self.history(), **kwargs
        )
        try:
            self._check_health(guard, result.info)
            entry = self._record_once(result, result.update)
        except BaseException:
            result.handle.undo()
            raise
        # the update on the model is the one recorded; a weight it is the first to change
        # keeps its pristine copy for revert and rebuild
        for name, weight in result.handle.originals.items():
            self._base_weights.setdefault(name, weight)
        return Change(entry, result)

    def erase(self, request: str | Fact | dict, **kwargs) -> Change:
        return self.add(request, erase=True, **kwargs)

    def forget(self, corpus, retain=None, *, holdout=None, reference=None, progress: bool = True,
               guard=None, **settings) -> Change:  # fmt: skip
        """Unlearn a corpus with a LoRA adapter (see ``edit.methods.unlearn``) and record it
        as one entry. ``corpus``/``retain``/``holdout``: a JSON Lines path, an
        ``edit.corpus.Corpus`` (``read_corpus``) or a list of ``Example``; without
        ``retain``, slices of the shipped WikiText-2 text.
        ``holdout``: never-seen examples of the same kind; training stops once the corpus's
        NLL reaches theirs. ``reference``: a model that never saw the corpus (a model, or a
        path or id :func:`load_reference` opens), such as the base model this one was
        fine-tuned from: training aims every token of the corpus at its distribution
        (method ``distill`` unless another is set) and stops at its NLL on the corpus.
        ``settings`` override ``UnlearnConfig`` (method, epochs, lr,
        lora_rank, ...). ``guard``: called with the changed model before anything is recorded;
        it refuses the change by raising, and what it returns (if not None) is recorded as the
        entry's ``info["guard"]`` (``edit.evals.knowledge.Guard``: perplexity and a
        general-knowledge probe within bounds) and read as :attr:`Change.health`."""
        if isinstance(reference, str | os.PathLike):
            reference, ref_tok = load_reference(reference, device=str(lm.device_of(self.model)))
            check_same_vocabulary(self.tok, ref_tok)
        return self._train("forget", corpus, retain, progress, settings, holdout, guard,
                           reference)  # fmt: skip

    def learn(self, corpus, *, holdout=None, progress: bool = True, guard=None,
              **settings) -> Change:  # fmt: skip
        """Teach a corpus with a LoRA adapter and record it as one entry: plain NLL on the
        corpus and, by default, on restatements and questions of its facts
        (``edit.methods.unlearn.augment``), with KL to the base model on retained text.
        ``holdout``: never-seen examples of the same kind, scored before and after (a corpus
        that is learned, not only its form, moves them much less). ``guard``: as for
        :meth:`forget`."""
        return self._train("learn", corpus, None, progress, settings, holdout, guard)

    def revert(self, entry_id: str) -> Entry:
        """Remove an edit; the weights become the base plus the remaining edits, exactly."""
        entry = self.entry(entry_id)
        self._set_ledger(writer.revert(self._ledger, self.lock, entry.id))
        self._rebuild()
        return Entry.from_data(next(e for e in self._ledger.reverted if e.id == entry.id))

    def drop(self, entry_id: str) -> str:
        """Give up an entry whose file was lost or damaged (open the workspace with
        ``dropping=entry_id``): the manifest records the drop, what is left of the file goes
        to ``reverted/<id>.damaged``. Returns the problem the entry had."""
        entry_id = entry_id.zfill(4)
        problem = self._ledger.broken.get(entry_id)
        if problem is None:
            raise EditError(f"entry {entry_id} is not broken: revert it instead")
        self._set_ledger(writer.drop(self._ledger, self.lock, entry_id))
        self._rebuild()
        return problem

    @property
    def head(self) -> str:
        """The ledger's head: the hash of the last manifest line, which covers every line and
        entry before it (the base model's identity while there is none). A user who keeps it
        can check later that nothing up to it was rewritten: ``edit verify --head HASH``."""
        return self._ledger.head

    def signature(self) -> signing.Signature | None:
        """``signature.json`` checked with the user's signing key (:mod:`edit.ledger.sign`);
        None where signing is not in use here (no signature, no key)."""
        return signing.check(self._ledger, signing.signing_key())

    @property
    def broken(self) -> dict[str, str]:
        """Active entries that cannot be applied (id -> problem): see :meth:`drop`."""
        return dict(self._ledger.broken)

    def export(self, out_dir: str | os.PathLike) -> Path:
        """Write the edited model as a plain Hugging Face folder (safetensors), whole or not
        at all; the partial folder of an interrupted export is removed by the next one."""
        out = Path(out_dir)
        check_new_folder(out)
        check_outside(out, self.path)
        try:
            with new_folder(out) as tmp:
                neurons.save(self.model, tmp)
                if self.tok is not None:
                    self.tok.save_pretrained(tmp)
                ledger = {"base": self.base, "edits": [e.to_json() for e in self._active]}
                (tmp / "edit_ledger.json").write_text(json.dumps(ledger, indent=2))
        except OSError as e:
            raise EditError(f"cannot write {out}: {e.strerror or e}") from None
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

    def _train(self, objective, corpus, retain, progress: bool, settings: dict, holdout=None,
               guard=None, reference=None):  # fmt: skip
        """Run the unlearning package's forget / learn policy, let ``guard`` see the changed
        model, then record its adapter."""
        from edit.methods.unlearn import at_learned, learned_by, plan_corpus, train_plan

        plan = plan_corpus(self.model, self.tok, objective, corpus, retain, holdout,
                           settings=settings, reference=reference)  # fmt: skip
        # the ledger's own level: the corpus without the entry that learned all of it
        if plan.wants_learned_level and (learner := learned_by(plan.data, self.entries())):
            with self.without(learner.id) as unseen:
                plan = at_learned(plan, unseen, self.tok, learner.id, settings)
        run = train_plan(self.model, self.tok, plan, progress=progress)
        if guard is not None:
            applied = run.update.apply(self.model)
            try:
                self._check_health(guard, run.info)
            finally:
                applied.undo()
        result = EditResult(objective, run.method, [], run.update, run.layers, run.config,
                            run.result.metrics, run.info)  # fmt: skip
        entry = self._record_once(result, run.update)
        self._apply(entry.update)
        return Change(entry, run.result)

    def _check_health(self, guard, info: dict) -> None:
        """Let ``guard`` see the changed model (it refuses by raising); what it returns goes
        into the entry's ``info["guard"]``."""
        if guard is not None and (verdict := guard(self.model)) is not None:
            info["guard"] = verdict

    def _record_once(self, result: EditResult, update: Update) -> Entry:
        """Record ``result`` (on failure nothing is written, the model unchanged). Under a
        launcher only the main process writes; the others wait for the entry, then check
        that it holds the update they computed (the processes did not diverge)."""
        if distributed.is_main():
            entry = self._record(result)
        distributed.wait_for_everyone()
        if distributed.is_main():
            return entry
        self._set_ledger(writer.reread(self.path))  # the entry the main process wrote
        entry = self._active[-1]
        mine = update.tensors()
        theirs = entry.update.tensors()
        same = set(mine) == set(theirs) and all(torch.equal(mine[k], v) for k, v in theirs.items())
        if not same:
            raise EditFailed(
                f"process {distributed.rank_and_size()[0]} computed another update than the "
                f"main process: the processes diverged (entry {entry.id} holds the main one)"
            )
        return entry

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
        neurons.clear(self.model)
        for entry in self.entries():
            if entry.id != skip:
                self._apply(entry.update)

    def _set_ledger(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._active = [Entry.from_data(e) for e in ledger.active]

    def _record(self, result: EditResult) -> Entry:
        meta = header(
            result.kind,
            result.method,
            result.facts,
            result.layers,
            result.config_dict(),
            result.metrics,
            result.info,
            created=writer.timestamp(),
            base_hash=self.base["hash"],
        )
        if self._ledger.meta is None:
            self._ledger = writer.create(self.path, self.base, self.lock)
        self._set_ledger(writer.add(self._ledger, self.lock, result.update.tensors(), meta))
        return self._active[-1]


def default_method(batch: bool, has_edits: bool, model: nn.Module | str) -> str:
    """The method of an edit that names none: ROME for one fact. For a batch, ROME as well
    where its tuned config for ``model`` (loaded, or the source that names it) writes each
    fact as its own added neuron: one batch touches no weight, so earlier edits stay as they
    were (1,000 CounterFact facts in ten batches: perplexity +3.5 %, against +36 % for
    AlphaEdit's rank-one updates; benchmarks/results/lifelong_b100_rome). Elsewhere MEMIT on
    a workspace without edits, and AlphaEdit (which keeps earlier edits intact) on one that
    has some."""
    if not batch or neuron_batches(model):
        return "rome"
    return "alphaedit" if has_edits else "memit"


def neuron_batches(model: nn.Module | str) -> bool:
    """Whether ROME's tuned config for ``model`` (a loaded model or a source) takes a batch
    of facts, one neuron each."""
    from edit import methods
    from edit.config import config_file, source_config_file

    found = config_file("rome", model) if isinstance(model, nn.Module) else (
        source_config_file("rome", model))  # fmt: skip
    return found is not None and methods.get("rome").config_class(**found[1]).takes_batches


def check_base(path: Path, base: dict, model_hash: str | None) -> None:
    """Refuse a model whose weights hash is not the recorded base's (None: not known yet)."""
    if model_hash is not None and model_hash != base["hash"]:
        raise EditError(
            f"workspace {path} was made for base model {base['source']!r} "
            f"({base['hash'][:19]}…), but this model's weights hash is "
            f"{model_hash[:19]}…: use that base model or another --workspace"
        )


def check_outside(out: str | os.PathLike, workspace: str | os.PathLike) -> None:
    """Refuse a folder to write inside the workspace (links resolved): the ledger would
    read the files as damage, and every later command would refuse the workspace."""
    target, folder = Path(out).resolve(), Path(workspace).resolve()
    if target == folder or folder in target.parents:
        raise EditError(f"{out} is inside the workspace {workspace}: write to a folder outside it")


def load_reference(path: str | os.PathLike | None, device: str | None = None):
    """(model, tokenizer) of a reference that never saw some data: a workspace folder (its
    base plus its ledger) or anything :func:`edit.load` reads; (None, None) without one."""
    if not path:
        return None, None
    if (Path(path) / META).is_file():
        ws = Workspace.open(path, create=False, device=device)
        return ws.model, ws.tok
    return load(path, device=device)


def check_same_vocabulary(tok, other) -> None:
    """Refuse a reference whose tokenizer maps text to other ids than ``tok``."""
    if tok is None or other is None or tok.get_vocab() == other.get_vocab():
        return
    raise InvalidRequest(
        f"the reference's tokenizer ({len(other)} tokens) is not this model's ({len(tok)}): "
        "give the model this one was fine-tuned from"
    )


def check_shapes(ledger: Ledger, source: str) -> bool:
    """Add to ``ledger.problems`` the active entries that do not fit the base model's
    weights, judged from its config alone (no weights are loaded). False: the config is not
    at hand; the shapes are checked when the model is loaded."""
    model = skeleton(source)
    if model is None:
        return False
    for e in ledger.active:
        try:
            problem = Update.from_tensors(e.tensors).misfit(model)
        except (ValueError, EditError) as err:
            problem = str(err)
        if problem:
            ledger.flag(
                f"entry {e.id} ({e.path}) does not fit the base model: {problem}: restore it "
                f"from a backup",
                e.id,
            )
    return True

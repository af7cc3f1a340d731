"""Writing a workspace's ledger: making it, and the three-step add, revert and drop (see
:mod:`edit.ledger`). Every write happens under the writer's lock, on top of the manifest
this process read, and returns the ledger read again, its head signed where the user has a
signing key (:mod:`edit.ledger.sign`)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save as serialize

from edit.atomic import new_folder, write_bytes
from edit.errors import EditError
from edit.ledger.read import (
    ENTRY_SUFFIX,
    FORMAT,
    MANIFEST,
    META,
    Ledger,
    manifest_line,
    read_ledger,
    sha256,
    unborn,
)
from edit.ledger.sign import check_before_signing, sign, signing_key
from edit.lock import LOCK_FILE, WorkspaceLock


def timestamp() -> str:
    """Now, in UTC, as the ledger records times."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def reread(path: Path) -> Ledger:
    """The ledger at ``path`` read again and checked (one line naming the first problem)."""
    ledger = read_ledger(path)
    ledger.check()
    return ledger


def create(path: Path, base: dict, lock: WorkspaceLock) -> Ledger:
    """Make the workspace folder whole: its files are written beside it, then renamed; in a
    folder that an exclusive open made and locked, in place, ``workspace.json`` last (the
    files before it are what :func:`edit.ledger.unborn` accepts)."""
    meta = {"format": FORMAT, "base": base, "created": timestamp()}
    if lock.held_exclusive:
        try:
            (path / "edits").mkdir(exist_ok=True)
            write_bytes(path / MANIFEST, b"")
            write_bytes(path / META, json.dumps(meta, indent=2).encode())
        except OSError as e:
            raise EditError(f"cannot create workspace {path}: {e.strerror or e}") from None
        return read_ledger(path)
    try:
        with new_folder(path) as tmp:
            (tmp / META).write_text(json.dumps(meta, indent=2))
            (tmp / MANIFEST).write_bytes(b"")
            (tmp / LOCK_FILE).write_bytes(b"")
            (tmp / "edits").mkdir()
    except OSError as e:
        if path.is_dir() and any(path.iterdir()):
            raise EditError(
                f"workspace {path} was created by another process since it was opened: "
                f"nothing was recorded; run the command again"
            ) from None
        raise EditError(f"cannot create workspace {path}: {e.strerror or e}") from None
    return read_ledger(path)


def remove_unborn(path: Path, made: bool) -> None:
    """Undo what a writer's open of a new workspace made, if nothing was recorded in it:
    the lock (removed while still held) and the folder when this process made it."""
    if (path / META).exists() or not unborn(path):
        return
    with contextlib.suppress(OSError):
        (path / LOCK_FILE).unlink(missing_ok=True)
        if made:
            path.rmdir()


@contextmanager
def committing(ledger: Ledger, lock: WorkspaceLock
               ) -> Iterator[tuple[Ledger, Callable[[], Ledger]]]:  # fmt: skip
    """The writer's lock, on a ledger that is still the one this process read (a change
    that another process committed meanwhile refuses this one: nothing is written); yields
    the ledger with the renames of an interrupted write finished, and ``done``, which the
    writer calls after its commit: the ledger read again, its head signed with the user's
    key (a key that cannot be read, or a forged signature, is refused before anything is
    written)."""
    key = signing_key()
    with lock.exclusive():
        try:
            now = (ledger.path / MANIFEST).read_bytes()
        except FileNotFoundError:
            now = None
        if ledger.meta is None or now != ledger.manifest:
            raise EditError(
                f"workspace {ledger.path} was changed by another process since it was "
                f"opened: nothing was recorded; run the command again"
            )
        now = finish_interrupted(ledger)
        check_before_signing(now, key)
        yield now, lambda: sign(reread(ledger.path), key)


def finish_interrupted(ledger: Ledger) -> Ledger:
    """Complete the renames of an interrupted add or revert; drop stale temporaries."""
    for src, dst in ledger.repairs:
        if src.is_file():
            dst.parent.mkdir(exist_ok=True)
            os.replace(src, dst)
    for p in ledger.leftovers:
        p.unlink(missing_ok=True)
    return reread(ledger.path) if ledger.repairs or ledger.leftovers else ledger


def add(ledger: Ledger, lock: WorkspaceLock, tensors: dict[str, torch.Tensor],
        meta: dict[str, str]) -> Ledger:  # fmt: skip
    """Record one entry (``meta`` gains its id): the pending file, the manifest line (the
    commit), the rename into place."""
    with committing(ledger, lock) as (now, done):
        meta["id"] = now.next_id()
        data = serialize(tensors, metadata=meta)
        pending = now.path / "edits" / f".{meta['id']}.pending"
        write_bytes(pending, data)
        line = manifest_line(now, "add", meta["id"], sha256(data))
        write_bytes(now.path / MANIFEST, now.manifest + line)  # the commit
        os.replace(pending, now.path / "edits" / f"{meta['id']}{ENTRY_SUFFIX}")
        return done()


def revert(ledger: Ledger, lock: WorkspaceLock, entry_id: str) -> Ledger:
    """Move an active entry to ``reverted/``: the manifest line (the commit), the move."""
    with committing(ledger, lock) as (now, done):
        entry = next(e for e in now.active if e.id == entry_id)  # where it is now
        line = manifest_line(now, "revert", entry.id, entry.hash)
        write_bytes(now.path / MANIFEST, now.manifest + line)  # the commit
        (now.path / "reverted").mkdir(exist_ok=True)
        os.replace(entry.path, now.path / "reverted" / f"{entry.id}{ENTRY_SUFFIX}")
        return done()


def drop(ledger: Ledger, lock: WorkspaceLock, entry_id: str) -> Ledger:
    """Give up an active entry whose file was lost or damaged: the manifest line (the
    commit), then what is left of its file moved to ``reverted/<id>.damaged``."""
    line = next(x for x in ledger.lines if x["op"] == "add" and x["id"] == entry_id)
    with committing(ledger, lock) as (now, done):
        commit = manifest_line(now, "drop", entry_id, line["hash"])
        write_bytes(now.path / MANIFEST, now.manifest + commit)  # the commit
        names = (f"{entry_id}{ENTRY_SUFFIX}", f".{entry_id}.pending")
        left = [p for n in names if (p := now.path / "edits" / n).is_file()]
        if left:
            (now.path / "reverted").mkdir(exist_ok=True)
            os.replace(left[0], now.path / "reverted" / f"{entry_id}.damaged")
        return done()

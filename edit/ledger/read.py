"""Reading a workspace's ledger: ``workspace.json``, the manifest and every entry file,
checked in full (see :mod:`edit.ledger` for the format); reading changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors

from edit.errors import EditError
from edit.lock import LOCK_FILE

FORMAT = 2  # workspace.json's "format": what this version reads and writes
MANIFEST = "manifest.jsonl"
META = "workspace.json"
ENTRY_SUFFIX = ".safetensors"


@dataclass
class EntryData:
    """One entry file as read and checked: its header metadata and tensors."""

    id: str
    hash: str
    path: Path
    meta: dict[str, str]
    tensors: dict[str, torch.Tensor]


@dataclass
class Ledger:
    path: Path
    meta: dict | None  # workspace.json; None: no workspace here yet
    manifest: bytes = b""  # the manifest as read: a writer commits only on top of it
    lines: list[dict] = field(default_factory=list)
    active: list[EntryData] = field(default_factory=list)
    reverted: list[EntryData] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # active entry id -> its problem
    # (from, to) renames that finish an interrupted add or revert, and stale temporaries
    repairs: list[tuple[Path, Path]] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)

    @property
    def head(self) -> str:
        """The hash the next manifest line chains to."""
        if self.lines:
            return self.lines[-1]["_line_hash"]
        return self.meta["base"]["hash"] if self.meta else ""

    def pinned_at(self, head: str) -> int | None:
        """How many manifest lines the chain had when ``head`` (a full hash, or its first 12
        hex digits or more) was its head; 0: the base alone. None: no point of the chain has
        that hash, so the ledger was rewritten since it was pinned (or the hash is another
        workspace's). A line's hash covers the lines and entry hashes before it."""
        want = head.removeprefix("sha256:")
        heads = [self.meta["base"]["hash"] if self.meta else ""]
        heads += [line["_line_hash"] for line in self.lines]
        for n, h in enumerate(heads):
            if h.removeprefix("sha256:").startswith(want):
                return n
        return None

    def next_id(self) -> str:
        ids = [int(line["id"]) for line in self.lines if line.get("op") == "add"]
        return f"{max(ids, default=0) + 1:04d}"

    def flag(self, problem: str, entry_id: str | None = None) -> None:
        """Record a problem; one of an active entry says how to drop that entry."""
        if entry_id is not None:
            problem += f", or drop entry {entry_id} with 'edit revert {entry_id}'"
            self.broken.setdefault(entry_id, problem)
        self.problems.append(problem)

    def check(self, dropping: str | None = None) -> None:
        """Raise one line naming the first problem (and how many more there are), but for
        the problem of the entry ``dropping``, which is about to be dropped."""
        problems = [p for p in self.problems if p != self.broken.get(dropping or "")]
        if not problems:
            return
        more = len(problems) - 1
        tail = f" ({more} more problem{'s' * (more != 1)}: run 'edit verify -w {self.path}')"
        raise EditError(f"workspace {self.path}: {problems[0]}" + (tail if more else ""))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_line(ledger: Ledger, op: str, entry_id: str, entry_hash: str) -> bytes:
    """The next manifest line (with its newline), chained to the last one."""
    line = {"seq": len(ledger.lines) + 1, "op": op, "id": entry_id, "hash": entry_hash,
            "prev": ledger.head}  # fmt: skip
    return (json.dumps(line, sort_keys=True) + "\n").encode()


def unborn(path: Path) -> bool:
    """Whether ``path`` holds no ledger without its ``workspace.json``: nothing, or only what
    a new workspace's writer makes before that file (the lock, an empty manifest, an empty
    ``edits/``), as one killed there leaves it."""
    if not path.is_dir():
        return not path.exists()
    try:
        names = set(os.listdir(path))
        if MANIFEST in names and (path / MANIFEST).stat().st_size:
            return False
        if "edits" in names and any((path / "edits").iterdir()):
            return False
    except OSError:
        return False
    return names <= {LOCK_FILE, MANIFEST, "edits"}


def read_meta(path: Path) -> dict | None:
    """``workspace.json`` checked for its fields and format version; None: no workspace."""
    meta_file = path / META
    try:
        if not meta_file.is_file():
            ledger_parts = (path / MANIFEST).is_file() or (path / "edits").is_dir()
            if ledger_parts and not unborn(path):
                raise EditError(
                    f"{meta_file} is missing, but {path} holds a ledger: restore it from a backup"
                )
            return None
        meta = json.loads(meta_file.read_text())
        if not all(isinstance(meta["base"][k], str) for k in ("hash", "source")):
            raise TypeError
        version = meta["format"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise EditError(f"{meta_file} is corrupt: restore it or start a new workspace") from None
    except OSError as e:
        raise EditError(f"cannot read {meta_file}: {e.strerror}") from None
    if version != FORMAT:
        newer = isinstance(version, int) and version > FORMAT
        raise EditError(
            f"{meta_file} has format {version!r}, and this version of edit reads format "
            f"{FORMAT}: "
            + (
                "upgrade edit to open it"
                if newer
                else "open it with the edit that wrote it, or start a new workspace"
            )  # fmt: skip
        )
    return meta


def read_ledger(path: Path) -> Ledger:
    """Read ``path``'s workspace.json, manifest and every entry file, and check them all."""
    ledger = Ledger(path, read_meta(path))
    if ledger.meta is None:
        return ledger
    _read_manifest(ledger)
    files = {folder: _listing(ledger, folder) for folder in ("edits", "reverted")}
    active, reverted, dropped = _replay(ledger.lines)
    used: set[Path] = set()

    def find(entry_id: str, places: list[tuple[str, str]]) -> Path | None:
        """The first of ``places`` (folder, file name) that holds the entry; the others,
        when present, are the targets of an interrupted rename."""
        found = [path / d / n for d, n in places if n in files[d]]
        if found:
            target = path / places[0][0] / places[0][1]
            if found[0] != target:
                ledger.repairs.append((found[0], target))
            used.add(found[0])
            return found[0]
        return None

    for entry_id, want in active.items():
        name = entry_id + ENTRY_SUFFIX
        where = find(entry_id, [("edits", name), ("edits", f".{entry_id}.pending")])
        if where is None:
            ledger.flag(
                f"entry {entry_id} is missing: {path / 'edits' / name} was deleted or moved "
                f"(the manifest records it as active): restore it from a backup",
                entry_id,
            )
            continue
        entry = _read_entry(ledger, entry_id, want, where, active=True)
        if entry is not None:
            ledger.active.append(entry)
    for entry_id in dropped:  # its damaged file, if any, is kept aside, never read
        find(entry_id, [("reverted", f"{entry_id}.damaged"), ("edits", entry_id + ENTRY_SUFFIX)])
    for entry_id, want in reverted.items():
        name = entry_id + ENTRY_SUFFIX
        where = find(entry_id, [("reverted", name), ("edits", name)])
        if where is None:
            ledger.problems.append(
                f"reverted entry {entry_id} is missing: {path / 'reverted' / name} was deleted "
                f"or moved: restore it from a backup"
            )
            continue
        entry = _read_entry(ledger, entry_id, want, where)
        if entry is not None:
            ledger.reverted.append(entry)

    for folder, names in files.items():
        for name in sorted(names):
            p = path / folder / name
            if p in used:
                continue
            if name.startswith("."):  # a temporary of an interrupted write
                ledger.leftovers.append(p)
            else:
                ledger.problems.append(
                    f"{p} is not in the manifest (an entry copied or written by hand?): "
                    f"move it out of the workspace"
                )
    _find_duplicates(ledger)
    return ledger


def active_count(path: Path) -> int:
    """How many entries the manifest records as active (0 without a workspace), from the
    manifest alone: no entry file is read or checked (:func:`read_ledger` does that)."""
    ledger = Ledger(path, read_meta(path))
    if ledger.meta is None:
        return 0
    _read_manifest(ledger)
    return len(_replay(ledger.lines)[0])


def _replay(lines: list[dict]) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """The manifest's lines played in order: (active id -> hash, reverted id -> hash, dropped
    ids)."""
    active = {line["id"]: line["hash"] for line in lines if line["op"] == "add"}
    reverted = {}
    dropped = []
    for line in lines:
        if line["op"] == "revert":
            reverted[line["id"]] = active.pop(line["id"])
        elif line["op"] == "drop":
            dropped.append(line["id"])
            active.pop(line["id"])
    return active, reverted, dropped


def _read_manifest(ledger: Ledger) -> None:
    manifest = ledger.path / MANIFEST
    try:
        if manifest.is_symlink() or not manifest.is_file():
            raise FileNotFoundError
        ledger.manifest = manifest.read_bytes()
    except OSError:
        ledger.problems.append(
            f"{manifest} is missing: the list of entries is lost; restore it from a backup"
        )
        return
    prev = ledger.head
    seen: dict[str, str] = {}  # id -> "add" or "revert": its state so far
    for n, text in enumerate(ledger.manifest.decode(errors="replace").splitlines(), 1):
        where = f"{manifest} line {n}"
        try:
            line = json.loads(text)
            op, entry_id, entry_hash = line["op"], line["id"], line["hash"]
            ok = isinstance(entry_id, str) and isinstance(entry_hash, str)
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            ledger.problems.append(f"{where} is damaged: restore the manifest from a backup")
            return
        if n == 1 and line.get("prev") != prev:
            ledger.problems.append(
                f"{where} does not start from the base model that {META} records (its base "
                f"hash was changed?): restore {META} from a backup"
            )
            return
        if line.get("seq") != n or line.get("prev") != prev:
            ledger.problems.append(
                f"{where} does not follow the line before it (lines removed, reordered or "
                f"edited): restore the manifest from a backup"
            )
            return
        if op == "add":
            last = max((int(i) for i in seen), default=0)
            if not entry_id.isdigit() or int(entry_id) <= last or entry_id in seen:
                ledger.problems.append(f"{where} adds entry {entry_id!r} out of order")
                return
        elif op not in ("revert", "drop") or seen.get(entry_id) != "add":
            ledger.problems.append(f"{where} reverts entry {entry_id!r}, which is not active")
            return
        seen[entry_id] = op
        line["_line_hash"] = prev = sha256(text.encode())
        ledger.lines.append(line)


def _listing(ledger: Ledger, folder: str) -> set[str]:
    """The names in ``edits/`` or ``reverted/``; a folder that is a link, or entries that
    are not plain files, are problems (a workspace holds plain files only)."""
    d = ledger.path / folder
    try:
        if stat.S_ISLNK(os.lstat(d).st_mode):
            ledger.problems.append(f"{d} is a symbolic link: a workspace holds plain folders")
            return set()
        names = set(os.listdir(d))
    except FileNotFoundError:
        return set()
    except OSError as e:
        ledger.problems.append(f"cannot read {d}: {e.strerror}")
        return set()
    for name in sorted(names):
        mode = os.lstat(d / name).st_mode
        if not stat.S_ISREG(mode):
            what = "a symbolic link" if stat.S_ISLNK(mode) else "not a plain file"
            ledger.problems.append(f"{d / name} is {what}: move it out of the workspace")
            names.discard(name)
    return names


def _read_entry(
    ledger: Ledger, entry_id: str, want: str, path: Path, active: bool = False
) -> EntryData | None:
    problem = None
    try:
        data = path.read_bytes()
    except OSError as e:
        ledger.flag(f"cannot read {path}: {e.strerror}", entry_id if active else None)
        return None
    got = sha256(data)
    if got != want:
        problem = (
            f"edit file {path} is corrupt or truncated, or was changed after it was recorded "
            f"(its content hash is {got[:19]}…, the manifest recorded {want[:19]}…): restore "
            f"it from a backup"
        )
    else:
        try:
            meta, tensors = parse_entry(data)
        except ValueError as e:
            problem = f"edit file {path} is corrupt ({e}): restore it from a backup"
        else:
            if meta.get("id") != entry_id:
                problem = (
                    f"edit file {path} holds entry {meta.get('id')!r}, not {entry_id}: restore "
                    f"it from a backup"
                )
            elif not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
                problem = (
                    f"edit file {path} holds non-finite values (inf or NaN): restore it from a "
                    f"backup"
                )
    if problem:
        ledger.flag(problem, entry_id if active else None)
        return None
    return EntryData(entry_id, got, path, meta, tensors)


def parse_entry(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The header metadata and tensors of a safetensors file's bytes."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        meta = header.get("__metadata__") or {}
        tensors = load_tensors(data)
    except Exception as e:  # safetensors raises several types on damaged bytes
        raise ValueError(f"{type(e).__name__}: {str(e)[:80]}") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("its header metadata is not a string table")
    return meta, tensors


def _find_duplicates(ledger: Ledger) -> None:
    """Two active entries with the same tensors: one is a copy of the other."""
    seen: dict[str, str] = {}
    for entry in ledger.active:
        h = hashlib.sha256()
        for k in sorted(entry.tensors):
            h.update(k.encode() + entry.tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
        digest = h.hexdigest()
        if digest in seen:
            ledger.flag(
                f"entry {entry.id} holds the same update as entry {seen[digest]} (a copy)",
                entry.id,
            )
        seen.setdefault(digest, entry.id)

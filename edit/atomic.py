"""Files and folders that appear whole or not at all.

Everything ``edit`` writes (ledger entries, caches, result folders) is first written under a
temporary name in the destination's folder and then renamed into place, which is atomic on
POSIX: a crash or an interrupt never leaves half a file that looks complete.

    write_bytes(path, data)                    # also write_json(path, obj)
    save_tensors(path, {"x": t}, {"k": "v"})   # safetensors
    with new_folder(out) as tmp:               # fill tmp; renamed to ``out`` on success
        ...
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from edit.errors import EditError


@contextmanager
def _temporary_file(path: Path) -> Iterator[tuple[int, str]]:
    """A new file beside ``path`` (its descriptor and name), renamed onto ``path`` at the
    end. Neither step follows a link: ``mkstemp`` creates the file (O_EXCL), and the rename
    replaces a link at ``path`` instead of writing where it points."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        yield fd, tmp
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    with _temporary_file(path) as (fd, _):  # written through the descriptor mkstemp made
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    return path


def write_json(path: str | os.PathLike, obj, indent: int | None = 1, **kwargs) -> Path:
    return write_bytes(path, json.dumps(obj, indent=indent, **kwargs).encode())


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    with _temporary_file(path) as (_, tmp):
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            tmp,
            metadata={k: str(v) for k, v in (metadata or {}).items()},
        )
    return path


def check_new_folder(out: str | os.PathLike, may_exist: bool = False) -> None:
    """Refuse, in one line, a result folder that cannot be made: one that exists and is not
    empty (unless ``may_exist``), a path under a file, a place this process may not write."""
    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise EditError(f"{out} already exists and is not a folder: choose a new folder")
        if out.exists() and not may_exist and any(out.iterdir()):
            raise EditError(f"{out} already exists and is not empty: choose a new folder")
        if may_exist and out.is_dir():
            if not os.access(out, os.W_OK | os.X_OK):
                raise EditError(f"cannot write in {out}: it is not writable")
            return
        parent = out.absolute().parent
        while not parent.exists():
            parent = parent.parent
    except OSError as e:
        raise EditError(f"cannot use {out} as a new folder: {e.strerror or e}") from None
    if not parent.is_dir():
        raise EditError(f"cannot make {out}: {parent} is a file, not a folder")
    _remove_dead(parent, ".edit-probe-")
    try:  # a probe: access() says yes to root even where nothing can be made (/proc)
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=f".edit-probe-{os.getpid()}-"))
    except OSError as e:
        raise EditError(f"cannot make {out}: {parent} is not writable ({e.strerror})") from None


@contextmanager
def new_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` when the block ends without an
    error (``out`` may exist only as an empty folder); removed otherwise. The temporary's
    name holds this process's id: one left by a process that died (``kill -9``) is removed
    by the next ``new_folder`` for the same ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
    try:
        yield tmp
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the partial folders for ``out`` that processes no longer running left."""
    return _remove_dead(out.parent, f".{out.name}.partial-")


def _remove_dead(folder: Path, prefix: str) -> list[Path]:
    """Remove the ``<prefix><pid>-*`` folders in ``folder`` whose process is gone."""
    removed = []
    for p in folder.glob(f"{glob.escape(prefix)}*"):
        pid = p.name.removeprefix(prefix).split("-")[0]
        if p.is_dir() and not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

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

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def _temporary_file(path: Path) -> Iterator[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    with _temporary_file(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


def write_json(path: str | os.PathLike, obj, indent: int | None = 1, **kwargs) -> Path:
    return write_bytes(path, json.dumps(obj, indent=indent, **kwargs).encode())


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    with _temporary_file(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            tmp,
            metadata={k: str(v) for k, v in (metadata or {}).items()},
        )
    return path


@contextmanager
def new_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` when the block ends without an
    error (``out`` may exist only as an empty folder); removed otherwise."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield tmp
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

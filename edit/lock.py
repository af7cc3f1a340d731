"""One writer at a time: an advisory lock on a workspace folder.

    lock = WorkspaceLock(Path("edit-workspace"))
    with lock.exclusive():      # a writer; a second one is refused in one line
        ...
    with lock.shared():         # a reader: never sees a writer's half-done change
        ...

The lock is ``flock(2)`` on ``<workspace>/.lock``. The kernel drops it when the process
ends, however it ends (exit, Ctrl-C, ``kill -9``), so a lock left by a crash is never in
force: the file stays, the lock does not. The holder writes its pid into the file, and a
refused command names it. Locks nest: a holder may take it again (a shared request inside
an exclusive hold is a no-op). The lock file is never followed: a link, a folder, a device
or a file with other names (hard links) in its place is refused, so that a neighbour who
shares the folder cannot make the pid land in a file of theirs choosing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from edit.errors import EditError

LOCK_FILE = ".lock"


class WorkspaceBusy(EditError):
    """Another process holds the workspace."""


class WorkspaceLock:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.file = folder / LOCK_FILE
        self._fd: int | None = None
        self._mode: int | None = None  # fcntl.LOCK_EX or LOCK_SH while held
        self._depth = 0

    @property
    def held_exclusive(self) -> bool:
        return self._mode == fcntl.LOCK_EX

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire(exclusive=True)
        try:
            yield
        finally:
            self.release()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        self.acquire(exclusive=False)
        try:
            yield
        finally:
            self.release()

    def acquire(self, exclusive: bool) -> None:
        """Take the lock now or raise :class:`WorkspaceBusy`. A folder that does not exist
        yet needs none (it is created whole, see ``Workspace``); once it exists, the next
        (nested) acquire takes the real lock, kept until the outermost release."""
        if self._depth and (self._fd is not None or not self.folder.is_dir()):
            if exclusive and self._fd is not None and not self.held_exclusive:
                raise RuntimeError("cannot upgrade a shared workspace lock to an exclusive one")
            self._depth += 1
            return
        if not self.folder.is_dir():
            self._depth = 1
            return
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        fd = self._open(exclusive)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise WorkspaceBusy(
                f"workspace {self.folder} is in use by another edit command{holder}: "
                f"wait for it to finish, then run this one again"
            ) from None
        if exclusive:  # name the holder for whoever is refused
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd, self._mode = fd, mode
        self._depth += 1

    def _open(self, exclusive: bool) -> int:
        """The lock file's descriptor, opened without following a link (O_NOFOLLOW) nor
        waiting on a FIFO (O_NONBLOCK); anything but a regular file of one name is refused."""
        flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            try:
                fd = os.open(self.file, flags | os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:  # a read-only workspace: readers may still lock it
                if exclusive:
                    raise EditError(
                        f"workspace {self.folder} is read-only: cannot change it"
                    ) from None
                fd = os.open(self.file, flags | os.O_RDONLY)
        except OSError as e:
            if self.file.is_symlink() or (self.file.exists() and not self.file.is_file()):
                raise self._not_a_file() from None
            raise EditError(f"cannot lock workspace {self.folder}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise self._not_a_file()
        return fd

    def _not_a_file(self) -> EditError:
        return EditError(
            f"workspace lock {self.file} is not a plain file (a link, a folder, a device or a "
            f"file with another name): remove it, then run this again"
        )

    def release(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = self._mode = None


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""

"""One live process per output folder: a lock that a crash can never leave stuck.

The lock is an advisory `flock` on FOLDER/.lock, which the operating system drops when its process
dies (even by `kill -9`), so there is no stale lock to clean up by hand; the file also records who
holds it, for the message that refuses a second process. Where `fcntl` is missing (Windows), the
file is created exclusively instead and a holder that is no longer running is taken over.

`taking_turns` is the waiting kind, for a cache that several processes may want made at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from core.cli import launched_rank
from core.errors import ExistsError, UserError
from core.runtime import is_temporary, process_alive

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK_NAME = ".lock"
UNFINISHED = ".unfinished"  # see OutputFolder
_HELD: set[int] = set()  # the descriptors of the locks this process holds


def _drop_locks_in_child() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors. A flock belongs to the
    open file, shared by every copy of its descriptor, so a worker that outlives a killed parent (until its
    watchdog notices, seconds later) would otherwise keep the folder locked; the parent's lock is unaffected."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_drop_locks_in_child)


class FolderInUse(ExistsError):
    """Another live process holds the folder."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


# How long a refused process waits for a lock's new holder to write who it is (it locks, then writes).
HOLDER_WAIT_S = 1.0


def _current_holder(path: Path) -> dict:
    """The holder of a lock that another process holds: read again for a moment while the file is still empty
    or half written, the instant between its holder's lock and its write."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while not (holder := _holder(path)).get("pid") and time.monotonic() < deadline:
        time.sleep(0.02)
    return holder


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder["started"])) if "started" in holder else "?"
    return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (started {started}: "
            f"{holder.get('command', '?')})")


class FolderLock:
    """Exclusive use of `folder` by this process for the duration of a `with` block.

    Creates the folder (and any missing parents) if needed, and removes them again on release if it
    made them and nothing else was written there (a run refused at start leaves no trace). A lock whose
    holder died is taken over with a note on stderr.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.created: list[Path] = []  # the folders this lock made, deepest first

    def __enter__(self) -> FolderLock:
        check_folder_path(self.folder, "The output folder")
        self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # no permission, a read-only or full disk
            raise UserError(f"Cannot make the folder {self.folder} ({err.strerror}); choose another place for the "
                            f"output.") from None
        try:
            self._acquire()
        except BaseException:
            self._remove_folder_if_unused()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:  # pragma: no cover - not POSIX
                os.close(fd)
                return self._acquire_without_flock()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _describe(_current_holder(self.path))
                raise FolderInUse(f"{self.folder} is in use by {holder}; wait for it to end, or choose another "
                                  f"folder.") from None
            # The holder before us may have unlinked the file after we opened it: lock the file that is there.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        _HELD.add(fd)
        previous = _holder(self.path)
        if previous.get("pid") not in (None, os.getpid()):
            print(f"Note: taking over {self.path} from {_describe(previous)}, which ended without releasing it.",
                  file=sys.stderr, flush=True)
        self._write_holder()

    def _acquire_without_flock(self) -> None:  # pragma: no cover - not POSIX
        previous = _holder(self.path)
        if previous.get("pid") is not None and process_alive(int(previous["pid"])):
            raise FolderInUse(f"{self.folder} is in use by {_describe(previous)}; wait for it to end, or choose "
                              f"another folder.")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._write_holder()

    def _write_holder(self) -> None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        # Unlink before unlocking, so no one can lock the file we are about to let go of and think it current.
        self.path.unlink(missing_ok=True)
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        _HELD.discard(self.fd)
        os.close(self.fd)
        self.fd = None
        self._remove_folder_if_unused()

    def _remove_folder_if_unused(self) -> None:
        """Remove the folders this lock made (the parents too, from the deepest) while they are empty."""
        for folder in self.created:
            if not folder.is_dir() or any(folder.iterdir()):
                return
            folder.rmdir()


@contextlib.contextmanager
def taking_turns(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (made if missing) for the body, waiting while another process
    holds it: for `what` (a simulated dataset, a download) that the processes of a torchrun job, or two runs
    sharing a cache, would otherwise all make at once into the same files. The one that waited then finds it
    made. Released by the operating system if its holder dies. A no-op where `fcntl` is missing."""
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock_current_file(path, what)
    except OSError:  # a read-only cache: the body says what is missing there, in its own words
        yield
        return
    try:
        yield
    finally:
        # Removed by its holder, so a cache folder keeps only what it caches: one that waited on it finds the
        # file gone and locks a new one (`_lock_current_file`), then re-checks for what it wanted and finds it
        # made; one that comes later makes a new lock file and finds the same.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)  # drops the lock


def _lock_current_file(path: Path, what: str) -> int:
    """A descriptor of the file at `path` (made if missing), locked exclusively, waiting for it if need be.

    A lock is only good on the file that is at `path` once we hold it: its holder removes the file before
    releasing it, so one that waited may be granted the lock of a removed file while a newcomer has already
    locked a new one at the same path, and both would go on at once. So after each wait, the inode locked
    must still be the one at `path`; if not, lock the current file instead."""
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not told and launched_rank() == 0:  # torchrun's other ranks wait on rank 0 without a word
                    print(f"Waiting for another process that is making {what} ...", file=sys.stderr, flush=True)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            locked = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
            return fd
        os.close(fd)  # the lock of a file its holder removed: take the one at `path` now


def holds_files(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds anything besides a lock file (an output folder that is not fresh)."""
    folder = Path(folder)
    return folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir())


def check_own_folder(folder: str | os.PathLike, own: Iterable[str], option: str) -> None:
    """Refuse, before any work, an output folder that holds anything but the names in `own` (what the command
    writes there), its lock and temporary files of interrupted writes: a dataset named by a typo would get
    the command's files written into it, and read them as data next time."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    stray = sorted(p.name for p in folder.iterdir() if p.name not in own and p.name != LOCK_NAME
                   and not is_temporary(p.name))
    if stray:
        raise ExistsError(f"{option} {folder} already holds files that are not this command's ({', '.join(stray[:3])}"
                          f"{', ...' if len(stray) > 3 else ''}); choose an empty or new folder.")


def check_folder_path(folder: str | os.PathLike, option: str) -> None:
    """Refuse, before any work, an output folder that cannot be made: a file, or a path under a file."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise ExistsError(f"{option} {folder} lies at or under the file {path}, not a folder; choose a folder.")
            return


class OutputFolder(FolderLock):
    """`FolderLock` for a command that writes its results into a fresh --out (see `check_output_folder`).

    While it writes, the folder holds UNFINISHED, removed when the block ends without an error. A command
    stopped midway (a signal, a full disk) leaves the mark, and `check_output_folder` then lets the next
    command write there without --overwrite: what a stopped command left is no result to protect, and the
    advice it printed is to run the same command again."""

    def __enter__(self) -> OutputFolder:
        super().__enter__()
        try:
            if (self.folder / UNFINISHED).is_file():  # told now that it is ours, not while another writes there
                print(f"Note: {self.folder} holds the output of a command that was stopped before it finished; "
                      f"writing it again.", file=sys.stderr, flush=True)
            (self.folder / UNFINISHED).touch()
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, failed, *exc) -> None:
        mark = self.folder / UNFINISHED
        if not failed or not any(p.name not in (UNFINISHED, LOCK_NAME) for p in self.folder.iterdir()):
            mark.unlink(missing_ok=True)  # done, or refused before it wrote anything (a folder it made goes too)
        super().__exit__(failed, *exc)


def check_output_folder(folder: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an --out folder that is a file or lies under one, or that already holds results unless `overwrite`
    (or they are what a command writing it left when it was stopped: see `OutputFolder`)."""
    folder = Path(folder)
    check_folder_path(folder, "--out")
    if holds_files(folder) and not overwrite and not (folder / UNFINISHED).is_file():
        raise ExistsError(f"{folder} already holds files; choose another --out or pass --overwrite.")


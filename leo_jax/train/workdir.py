"""The work directory's guards: one trainer per directory (a lock file) and storage errors that name the path.

The lock is an exclusive `flock` on WORKDIR/.lock holding the owner's host and pid. The kernel drops it when the
owner dies, so a lock file left by a killed run is stale by construction and is taken over (with a log line naming
the old owner); a live owner makes the second trainer fail at once, before it writes anything. Locks are re-entrant
within a process (the CLI holds it while writing the synthetic set, the Trainer while training).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
import time

logger = logging.getLogger("leo_jax.train")

LOCK_NAME = ".lock"


class StorageError(OSError):
    """A directory cannot be written (read-only, no space, missing permission); the message names path and cause."""


class WorkdirLockedError(RuntimeError):
    """Another live trainer holds the work directory."""


def storage_error(path: str, error: OSError, what: str) -> StorageError:
    """A StorageError naming `what` at `path` and the OS cause (e.g. 'Read-only file system')."""
    cause = error.strerror or str(error)
    hints = {errno.EROFS: "mount it read-write or choose another directory",
             errno.ENOSPC: "free space there or choose another directory",
             errno.EACCES: "fix its permissions or choose another directory"}
    hint = hints.get(error.errno, "choose another directory")
    return StorageError(error.errno, f"{what} {path} is not writable ({cause}); {hint}")


def check_writable(directory: str, what: str) -> None:
    """Creates `directory` and writes and removes a probe file there; raises StorageError on failure."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-probe-{socket.gethostname()}-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise storage_error(directory, e, what) from None


def check_free_space(directory: str, needed_bytes: int, what: str) -> None:
    """Raises StorageError when the filesystem of `directory` reports less than `needed_bytes` free."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # the filesystem cannot tell (e.g. some network mounts): the write itself will report
    if free < needed_bytes:
        raise StorageError(errno.ENOSPC, f"{what} {directory}: {free / 2**20:.1f} MiB free, about "
                                         f"{needed_bytes / 2**20:.1f} MiB needed (No space left on device); free "
                                         "space there or choose another directory")


_held: dict[str, list] = {}  # real path -> [open lock file, re-entry count]


class WorkdirLock:
    """`with WorkdirLock(workdir):` or acquire()/release(); a no-op when `primary` is False (processes > 0) or for
    remote paths (gs://...), which have no file locks."""

    def __init__(self, workdir: str, primary: bool = True):
        self.active = primary and "://" not in str(workdir)
        self.path = os.path.realpath(os.path.join(workdir, LOCK_NAME)) if self.active else ""
        self._acquired = False

    def acquire(self) -> WorkdirLock:
        if not self.active or self._acquired:
            return self
        if self.path in _held:
            _held[self.path][1] += 1
            self._acquired = True
            return self
        directory = os.path.dirname(self.path)
        check_writable(directory, "the work directory")
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "an unknown process"
            f.close()
            raise WorkdirLockedError(f"the work directory {directory} is in use by {owner} (lock file {self.path}); "
                                     "wait for that run to end or stop it, or give another --workdir") from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            logger.warning("taking over the stale lock of a run that ended without releasing it (%s)", previous)
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        _held[self.path] = [f, 1]
        self._acquired = True
        return self

    def release(self) -> None:
        if not self._acquired:
            return
        self._acquired = False
        entry = _held[self.path]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self.path]
            entry[0].truncate(0)  # an empty file: released cleanly (a non-empty one left behind was not)
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            entry[0].close()

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

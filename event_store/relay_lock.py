"""One relay per SQLite file: an exclusive ``flock`` on a lock file beside the database.

The SQLite claim reads without the write lock and marks rows afterwards (see
:mod:`event_store.outbox_store`), so two relays on one file would publish the
same rows. The relay that holds ``<database>-relay.lock`` publishes; any other
stands by and tries again on its next claim. The kernel releases the lock when
its holder closes it or dies, however it dies, so a standby takes over without
stale-lock clean-up. ``flock`` locks belong to an open file, not a process, so
two stores in one process exclude each other too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import weakref
from pathlib import Path

from conveyor import errors


def lock_path(database: str) -> Path:
    """The lock file of the SQLite database file ``database``, however the URL spells it.

    The path is resolved (relative to the working directory, as SQLite opens
    it, through symbolic links), so two relays naming one file differently
    take the same lock.
    """
    return Path(f"{os.path.realpath(database)}-relay.lock")


class RelayLock:
    """A non-blocking exclusive lock on ``path``, held from :meth:`acquire` to :meth:`release`.

    Args:
        path: the lock file; created if missing, never deleted (deleting it
            would let a second holder lock a new file while the first holds
            the old one).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._release: weakref.finalize[[int], RelayLock] | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._release is not None

    def acquire(self) -> bool:
        """Take the lock if it is free; return whether this object holds it.

        Raises:
            StoreError: the lock file cannot be opened (for instance, its
                directory is not writable).
        """
        if self._release is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise errors.StoreError(f"cannot open the relay lock file {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        with contextlib.suppress(OSError):  # the holder's pid, for operators; the lock is what counts
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        # Closing the descriptor releases the flock: on release(), or when a
        # store that was never closed is garbage-collected.
        self._release = weakref.finalize(self, os.close, fd)
        return True

    def release(self) -> None:
        """Release the lock; idempotent."""
        release, self._release = self._release, None
        if release is not None:
            release()

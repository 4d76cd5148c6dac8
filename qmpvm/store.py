"""The config store's SQLite adapter: documents in, documents out.

One row per configuration document (see ``Config.documents``).  A command's
change is written as one transaction; on disk the database runs in WAL mode
with ``synchronous=FULL``, so a commit that returned is on disk and survives
``kill -9`` of the process.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from qmpvm.errors import StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "config.sqlite3"


def _create_private(directory: Path, name: str) -> None:
    """Make ``directory`` (0700) and ``name`` in it (0600) if they are not there:
    the configuration names paths and secrets, whatever the umask says.  What
    exists is left as it is until it has proved usable."""
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        os.close(os.open(directory / name, flags, 0o600))
    except FileExistsError:
        if not os.access(directory / name, os.R_OK | os.W_OK):
            raise PermissionError(f"{name} is not readable and writable") from None


class Store:
    """Keeps the last committed documents; ``commit`` writes only the delta."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.path = state_dir / DB_NAME if state_dir is not None else None
        self._lock: int | None = None
        try:
            if state_dir is not None:
                _create_private(state_dir, DB_NAME)
            self._db = sqlite3.connect(self.path or ":memory:", isolation_level=None)
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS documents (key TEXT PRIMARY KEY, doc TEXT)"
            )
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema-version', ?)", (str(SCHEMA_VERSION),)
            )
            rows = self._db.execute("SELECT key, doc FROM documents").fetchall()
            if state_dir is not None and self.path is not None:  # usable: now it is ours
                self._lock = _lock(state_dir)
                self.path.chmod(0o600)  # SQLite gives its -wal and -shm files this mode
        except (OSError, sqlite3.Error) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise StoreError(f"state directory {state_dir} cannot be used: {reason}") from err
        self._committed: dict[str, str] = {}
        for key, doc in rows:
            if isinstance(key, str) and isinstance(doc, str):
                self._committed[key] = doc
            else:  # not written by qmpvm: left in the file, untouched
                log.warning("stored row %r is not text; left aside", key)

    @property
    def documents(self) -> Mapping[str, str]:
        return self._committed

    def commit(self, documents: Mapping[str, str]) -> None:
        """Make ``documents`` the stored state, atomically."""
        upserts = [(k, v) for k, v in documents.items() if self._committed.get(k) != v]
        deletes = [(k,) for k in self._committed if k not in documents]
        if not upserts and not deletes:
            return
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO documents VALUES (?, ?)", upserts)
            self._db.executemany("DELETE FROM documents WHERE key = ?", deletes)
        self._committed = dict(documents)
        log.debug("committed %d change(s), %d deletion(s)", len(upserts), len(deletes))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        self._db.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


LOCK_NAME = "lock"


def _lock(state_dir: Path) -> int:
    """One qmpvm per state directory: it owns the store and the engine there.
    The lock (flock) goes with the process, however it ends."""
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreError(
            f"state directory {state_dir} is in use by another qmpvm (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")

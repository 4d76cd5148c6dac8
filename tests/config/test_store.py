"""The SQLite store: transactional documents that survive a reopen."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

from qmpvm.config.model import Config
from qmpvm.store import DB_NAME, Store


def test_store_round_trips_and_writes_only_changes(tmp_path: Path) -> None:
    store = Store(tmp_path)
    config = Config().set_machine({"cpus": 4})
    store.commit(config.documents())
    store.close()
    reopened = Store(tmp_path)
    assert Config.from_documents(reopened.documents) == config
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_memory_store_without_state_dir() -> None:
    store = Store(None)
    assert store.path is None
    store.commit({"a": "1"})
    store.commit({"b": "2"})
    assert dict(store.documents) == {"b": "2"}


def test_state_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """The configuration names paths and secrets: 0700 and 0600, even under umask 000."""
    old = os.umask(0)
    try:
        store = Store(tmp_path / "new" / "state")
        store.commit({"machine": "{}"})
    finally:
        os.umask(old)
    state = tmp_path / "new" / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
    assert modes["config.sqlite3"] == 0o600
    assert set(modes.values()) == {0o600}, modes  # -wal and -shm too
    store.close()

"""The SQLite store: transactional documents that survive a reopen."""

from __future__ import annotations

import sqlite3
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

"""Bad files in ``--state-dir``: qmpvm starts with what it can read, or exits
with one clear line (no traceback), and never damages what it could not read.

What is expected of each case:

* The database cannot be opened or is not a database (garbage, truncated,
  unreadable, read-only, a directory; the state directory a file, under a
  file, unreadable): exit status 1, the last line of stderr ``qmpvm: ...``
  naming the state directory, no traceback, the file as it was, and no
  socket file left behind.  Starting empty instead would lose the stored
  configuration at its next write.
* The database opens but parts of it are bad (SQLite's own -wal and -shm
  files as garbage, an empty file, rows qmpvm cannot load): qmpvm starts
  with the rest, as ``Config.from_documents`` promises ("loading a store
  never fails as a whole"), and keeps the bad rows in the store.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_qemu
from stress_support import SEED, RawClient, wait_until_sync

pytestmark = needs_qemu

DB = "config.sqlite3"
GOOD = {"id": "good", "backend": {"type": "null", "data": {}}}

NO_DAC_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
"""Root reads and writes anything; this root does not (mode bits apply)."""


def _start(
    tmp: Path, state: Path, *, as_user: bool = False
) -> tuple[subprocess.Popen[bytes], Path]:
    sock = tmp / "qmp.sock"
    argv = [sys.executable, "-m", "qmpvm", "-qmp", f"unix:{sock},server=on,wait=off",
            "--preconfig", "--state-dir", str(state)]  # fmt: skip
    if as_user and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: modes do not apply")
        argv = NO_DAC_OVERRIDE + argv
    with (tmp / "stderr").open("wb") as stderr:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr)
    return process, sock


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory holding one chardev, closed cleanly (no -wal left)."""
    tmp = tmp_path_factory.mktemp("stored")
    state = tmp / "state"
    process, sock = _start(tmp, state)
    try:
        wait_until_sync(sock.exists, "qmpvm listens")
        client = RawClient(sock)
        client.negotiate()
        assert client.call("chardev-add", GOOD) == {"return": {}}
        client.send(b'{"execute": "quit"}')
        assert process.wait(60) == 0
    finally:
        process.kill()
        process.wait()
    return state


def _garbage(state: Path) -> None:
    (state / DB).write_bytes(random.Random(SEED).randbytes(8192))


def _truncate(size: int) -> Callable[[Path], None]:
    def truncate(state: Path) -> None:
        os.truncate(state / DB, size)

    return truncate


def _mode(path: str, mode: int) -> Callable[[Path], None]:
    def chmod(state: Path) -> None:
        (state / path if path else state).chmod(mode)

    return chmod


def _state_is_a_file(state: Path) -> None:
    shutil.rmtree(state)
    state.write_text("not a directory\n")


def _db_is_a_directory(state: Path) -> None:
    (state / DB).unlink()
    (state / DB).mkdir()


EXITS: dict[str, tuple[Callable[[Path], None], bool]] = {
    "garbage database": (_garbage, False),
    "database truncated to 100 bytes": (_truncate(100), False),
    "database truncated to one page": (_truncate(4096), False),
    "state dir is a file": (_state_is_a_file, False),
    "state dir unreadable": (_mode("", 0), True),
    "database unreadable": (_mode(DB, 0), True),
    "database read-only": (_mode(DB, 0o400), True),
    "database is a directory": (_db_is_a_directory, False),
}
"""Case -> (how the state is spoilt, whether qmpvm must run without DAC override)."""


def _snapshot(path: Path) -> object:
    """Modes and contents, all the way down (we are root here, or it is ours)."""
    mode = stat.S_IMODE(path.lstat().st_mode)
    if path.is_dir():
        return mode, {p.name: _snapshot(p) for p in sorted(path.iterdir())}
    return mode, path.read_bytes() if path.is_file() else None


@pytest.mark.parametrize("case", list(EXITS))
def test_unusable_store_exits_with_one_clear_line(case: str, stored: Path, tmp_path: Path) -> None:
    spoil, as_user = EXITS[case]
    state = tmp_path / "state"
    shutil.copytree(stored, state)
    spoil(state)
    before = _snapshot(state)
    process, sock = _start(tmp_path, state, as_user=as_user)
    try:
        status = process.wait(60)
    except subprocess.TimeoutExpired:
        client = RawClient(sock)
        client.negotiate()
        export = client.call("config-export")
        raise AssertionError(f"{case}: qmpvm started, with {export}") from None
    finally:
        process.kill()
        process.wait()
    stderr = (tmp_path / "stderr").read_text(errors="replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 1, f"{case}: exit status {status}:\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, f"{case}: a traceback instead of one line:\n{stderr[-2000:]}"
    assert lines and lines[-1].startswith("qmpvm: ") and str(state) in lines[-1], (
        f"{case}: the last line should say what is wrong with {state}:\n{stderr[-2000:]}"
    )
    assert _snapshot(state) == before, f"{case}: qmpvm changed the state it could not use"
    assert not sock.exists(), f"{case}: the socket file was left behind"


def _rows(rows: list[tuple[object, object]]) -> Callable[[Path], None]:
    def insert(state: Path) -> None:
        with sqlite3.connect(state / DB) as db:
            db.executemany("INSERT OR REPLACE INTO documents VALUES (?, ?)", rows)
        db.close()

    return insert


def _junk_file(name: str, size: int) -> Callable[[Path], None]:
    def write(state: Path) -> None:
        (state / name).write_bytes(random.Random(SEED).randbytes(size))

    return write


def _empty(state: Path) -> None:
    (state / DB).write_bytes(b"")


MISSING_REFERENCE = '{"seq": 3, "args": {"driver": "raw", "node-name": "r", "file": "ghost"}}'
INFINITE_SEQ = '{"seq": 1e999, "args": {"id": "inf", "backend": {"type": "null", "data": {}}}}'

STARTS: dict[str, tuple[Callable[[Path], None], list[object]]] = {
    "empty database": (_empty, []),
    "garbage -wal": (_junk_file(f"{DB}-wal", 5000), [GOOD]),
    "garbage -shm": (_junk_file(f"{DB}-shm", 32768), [GOOD]),
    "a row of text": (_rows([("chardev/junk", "not json")]), [GOOD]),
    "a row that is NULL": (_rows([("chardev/null", None)]), [GOOD]),
    "a row that is a number": (_rows([("chardev/n", 5)]), [GOOD]),
    "a row of an unknown kind": (_rows([("gizmo/g", "{}")]), [GOOD]),
    "a row naming what is not there": (_rows([("block/r", MISSING_REFERENCE)]), [GOOD]),
    "machine settings of the wrong types": (
        _rows([("machine", '{"cpus": "many", "type": 5}')]),
        [GOOD],
    ),
    "a sequence number of 1e999": (_rows([("chardev/inf", INFINITE_SEQ)]), [GOOD]),
    "next-seq of 1e999": (_rows([("next-seq", "1e999")]), [GOOD]),
    "a row nested 100,000 deep": (
        _rows([("chardev/deep", "[" * 100_000 + "]" * 100_000)]),
        [GOOD],
    ),
    "a key that is a blob": (_rows([(b"chardev/\xff", '{"seq": 5, "args": {}}')]), [GOOD]),
}
"""Case -> (how the state is spoilt, the chardevs then exported)."""


@pytest.mark.parametrize("case", list(STARTS))
def test_readable_store_starts_with_the_rest(case: str, stored: Path, tmp_path: Path) -> None:
    spoil, chardevs = STARTS[case]
    state = tmp_path / "state"
    shutil.copytree(stored, state)
    spoil(state)
    keys_before = _keys(state)
    process, sock = _start(tmp_path, state)
    try:
        wait_until_sync(
            lambda: sock.exists() or process.poll() is not None, f"{case}: qmpvm listens"
        )
        client = RawClient(sock)
        client.negotiate()
        export = client.call("config-export")
        later = client.call("chardev-add", {"id": "later", "backend": {"type": "null", "data": {}}})
        client.send(b'{"execute": "quit"}')
        status = process.wait(60)
    except (OSError, AssertionError) as err:
        stderr = (tmp_path / "stderr").read_text(errors="replace")
        raise AssertionError(f"{case}: qmpvm did not start ({err}):\n{stderr[-2000:]}") from None
    finally:
        process.kill()
        process.wait()
    stderr = (tmp_path / "stderr").read_text(errors="replace")
    assert status == 0 and "Traceback" not in stderr, f"{case}:\n{stderr[-2000:]}"
    assert export == {"return": [{"execute": "chardev-add", "arguments": c} for c in chardevs]}, (
        f"{case}: {export}"
    )
    assert later == {"return": {}}, f"{case}: {later}"
    keys_after = _keys(state)
    assert "chardev/later" in keys_after, f"{case}: a change was not stored: {keys_after}"
    assert keys_before <= keys_after, (
        f"{case}: rows dropped by the next commit: {keys_before - keys_after}"
    )


def _keys(state: Path) -> set[object]:
    try:
        with sqlite3.connect(state / DB) as db:
            keys = {row[0] for row in db.execute("SELECT key FROM documents")}
        db.close()
    except sqlite3.DatabaseError:
        return set()
    return keys


def test_state_dir_is_private(tmp_path: Path) -> None:
    """The configuration names paths and holds secrets: a state directory qmpvm
    creates is 0700, its database files 0600, whatever the umask."""
    state = tmp_path / "state"
    old = os.umask(0o022)
    try:
        process, sock = _start(tmp_path, state)
    finally:
        os.umask(old)
    try:
        wait_until_sync(sock.exists, "qmpvm listens")
        client = RawClient(sock)
        client.negotiate()
        assert client.call("object-add", {"qom-type": "secret", "id": "s", "data": "x"}) == {
            "return": {}
        }
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in [state, *state.iterdir()]}
        client.send(b'{"execute": "quit"}')
        process.wait(60)
    finally:
        process.kill()
        process.wait()
    assert modes == {name: "0o700" if name == "state" else "0o600" for name in modes}, modes

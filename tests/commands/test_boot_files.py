"""Kernel and initrd paths: refused with the reason, not "no such file"."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qmpvm.commands.machine import boot_file_problem, check_boot_files
from qmpvm.errors import ConfigError


def test_each_kind_of_bad_boot_file_gets_its_own_reason(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.touch()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"MZ")
    assert boot_file_problem("") == "is empty: name a file"
    assert (
        boot_file_problem(str(tmp_path / "missing"))
        == "cannot be opened: No such file or directory"
    )
    assert boot_file_problem(str(tmp_path)) == "is not a regular file"
    assert boot_file_problem("/dev/zero") == "is not a regular file"
    assert boot_file_problem(str(fifo)) == "is not a regular file"  # and did not block
    assert boot_file_problem(str(empty)) == "is an empty file"
    assert boot_file_problem(str(kernel)) is None
    with pytest.raises(ConfigError, match=r"Parameter 'initrd': '/dev/zero' is not a regular file"):
        check_boot_files(str(kernel), "/dev/zero")

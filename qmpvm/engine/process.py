"""Starting engine processes that die with qmpvm, even when it is SIGKILLed.

Linux sends a child its parent-death signal (``PR_SET_PDEATHSIG``) when the
thread that started it exits.  Setting that signal takes code run in the
child between fork and exec, and a ``preexec_fn`` makes Python fork the
whole process instead of using vfork: 5-7 ms on machine-init's path here
(copying page tables is slow on this virtualised host), against under 1 ms.
So the engine runs under ``setpriv --pdeathsig KILL`` (util-linux), which
sets the signal and then execs the engine; the setting survives exec (an
engine is no set-user-ID binary), and Python can vfork.  Where setpriv is
missing, the ``preexec_fn`` remains.

Spawn from the event loop's thread (asyncio does), not from a short-lived one.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

SETPRIV = shutil.which("setpriv")
"""util-linux's setpriv, or None: then a ``preexec_fn`` sets the signal."""

_PR_SET_PDEATHSIG = 1


async def start(
    argv: Sequence[str], *, stdout: int, stderr: int, pass_fds: Sequence[int] = ()
) -> asyncio.subprocess.Process:
    """Start ``argv``, stdin from /dev/null, to be SIGKILLed when qmpvm exits.

    A missing or non-executable ``argv[0]`` raises OSError here, as exec
    would (setpriv could only print it).
    """
    binary = _executable(argv[0])
    if SETPRIV is None:
        _prctl()  # resolved in the parent: the child should not load anything
        return await asyncio.create_subprocess_exec(
            binary,
            *argv[1:],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=pass_fds,
            preexec_fn=die_with_parent,
        )
    return await asyncio.create_subprocess_exec(
        SETPRIV,
        "--pdeathsig",
        "KILL",
        "--",
        binary,
        *argv[1:],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        pass_fds=pass_fds,
    )


def _executable(name: str) -> str:
    """The file exec would run for ``name``, or the OSError it would raise."""
    found = shutil.which(name)
    if found is not None:
        return found
    code = errno.EACCES if os.sep in name and os.path.exists(name) else errno.ENOENT
    raise OSError(code, os.strerror(code), name)


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only without setpriv: ctypes costs milliseconds to import

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def die_with_parent() -> None:
    """``preexec_fn`` that makes the child die (SIGKILL) when its parent does.

    A no-op where prctl is unavailable.
    """
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

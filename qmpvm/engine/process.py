"""Starting engine processes that die with qmpvm, even when it is SIGKILLed,
or that outlive it (``--state-dir``), and watching one a previous qmpvm started.

Linux sends a child its parent-death signal (``PR_SET_PDEATHSIG``) when the
thread that started it exits.  Setting that signal takes code run in the
child between fork and exec, and a ``preexec_fn`` makes Python fork the
whole process instead of using vfork: 5-7 ms on machine-init's path here
(copying page tables is slow on this virtualised host), against under 1 ms.
So the engine runs under ``setpriv --pdeathsig KILL --no-new-privs``
(util-linux), which sets the signal (and that no exec may gain privileges)
and then execs the engine; the setting survives exec (an
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
from dataclasses import dataclass
from typing import Protocol

SETPRIV = shutil.which("setpriv")
"""util-linux's setpriv, or None: then a ``preexec_fn`` sets the signal."""

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class RunAs:
    """An engine that is not to run as qmpvm's user: its uid, gid and groups,
    and, for a root of its own (``own_root``), the host directories it still
    reaches there (besides ``/usr``, ``/proc`` and a few devices)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    own_root: bool = False
    shared: tuple[str, ...] = ()


ENGINE_ROOT = r"""
set -e
r=/mnt
mount -t tmpfs -o mode=0755,size=1m qmpvm-engine-root "$r"
mkdir -p "$r/usr" "$r/proc" "$r/dev" "$r/etc" "$r/var/tmp"
mount --bind /usr "$r/usr"
for l in lib lib32 lib64 libx32 bin sbin; do
  if [ -L "/$l" ]; then ln -s "usr/$l" "$r/$l"
  elif [ -d "/$l" ]; then mkdir "$r/$l"; mount --bind "/$l" "$r/$l"
  fi
done
mount --bind /proc "$r/proc"
mount --bind /dev "$r/dev"
mount --bind /var/tmp "$r/var/tmp"
for f in ld.so.cache resolv.conf hosts; do
  if [ -e "/etc/$f" ]; then touch "$r/etc/$f"; mount --bind "/etc/$f" "$r/etc/$f"; fi
done
while [ "$1" != "--" ]; do
  mkdir -p "$r$1"; mount --bind "$1" "$r$1"; shift
done
shift
exec chroot "$r" "$@"
"""
"""Run in a mount namespace of the engine's own, before it starts: an empty
root (a small tmpfs) with the host's ``/usr`` (the engine, its libraries,
firmware, keymaps and modules, which QEMU 7.2 opens by name), ``/proc`` (the
``/proc/self/fd`` names of what qmpvm opened), ``/dev`` without its submounts
(no ``/dev/shm``, ``/dev/pts``, ``/dev/mqueue``; the nodes keep their
permissions, which the engine's user does not pass but for ``null``,
``urandom``, ...), ``/var/tmp`` (for ``-snapshot``), ``/etc/ld.so.cache``,
``/etc/resolv.conf`` and ``/etc/hosts`` (the ``user`` netdev's DNS), and the
directories given as arguments before ``--``.  Ten mounts or so: each is a
``mount`` process, ~3 ms; nothing there is writable by the engine's user but
``/var/tmp`` and its FIFOs, so no read-only remounts."""


async def start(
    argv: Sequence[str],
    *,
    stdout: int,
    stderr: int,
    pass_fds: Sequence[int] = (),
    run_as: RunAs | None = None,
) -> asyncio.subprocess.Process:
    """Start ``argv``, stdin from /dev/null, to be SIGKILLed when qmpvm exits;
    ``run_as``: as that user (needs setpriv).

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
        *_confined(binary, die_with_qmpvm=True, run_as=run_as),
        *argv[1:],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        pass_fds=pass_fds,
    )


NAMESPACES = ("ipc", "uts")
"""Namespaces the engine gets of its own: no host resource it needs lives in
them (its files, sockets and network stay the host's until qmpvm opens
them for it)."""


@functools.cache
def namespaces_wrapper() -> tuple[str, ...]:
    """``unshare --ipc --uts --`` where this process may make namespaces (tried
    once: a container without CAP_SYS_ADMIN may not); else nothing."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    flags = tuple(f"--{ns}" for ns in NAMESPACES)
    try:
        subprocess.run([unshare, *flags, "true"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    return (unshare, *flags, "--")


def _confined(binary: str, *, die_with_qmpvm: bool, run_as: RunAs | None = None) -> list[str]:
    """``binary`` behind setpriv (no new privileges, the parent-death signal
    unless it is to outlive qmpvm, ``run_as``'s user) and, where allowed,
    unshare (which runs first: making namespaces needs qmpvm's privileges)."""
    if SETPRIV is None:
        return [binary]
    death = ["--pdeathsig", "KILL"] if die_with_qmpvm else []
    user: list[str] = []
    if run_as is not None:
        user = [f"--reuid={run_as.uid}", f"--regid={run_as.gid}"]
        groups = ",".join(map(str, run_as.groups))
        user += [f"--groups={groups}"] if groups else ["--clear-groups"]
    setpriv = [SETPRIV, *death, *user, "--no-new-privs", "--", binary]
    namespaces = namespaces_wrapper()
    if run_as is not None and run_as.own_root and namespaces:
        unshare, *flags, _end = namespaces
        root = ["sh", "-c", ENGINE_ROOT, "sh", *run_as.shared, "--"]
        return [unshare, "--mount", *flags, "--", *root, *setpriv]
    return [*namespaces, *setpriv]


def may_switch_user() -> bool:
    """Whether qmpvm can start the engine as another user (root, with setpriv)."""
    return SETPRIV is not None and os.geteuid() == 0


def may_give_own_root(binary: str) -> bool:
    """Whether qmpvm can give the engine a root of its own: it may make
    namespaces, the tools are there, and the engine lives under /usr."""
    try:
        under_usr = os.path.realpath(_executable(binary)).startswith("/usr/")
    except OSError:
        return False
    tools = ("sh", "mount", "chroot")
    setpriv_inside = SETPRIV is not None and os.path.realpath(SETPRIV).startswith("/usr/")
    return (
        under_usr
        and setpriv_inside
        and os.path.isdir("/mnt")  # where the new root is mounted, in its namespace
        and bool(namespaces_wrapper())
        and all(map(shutil.which, tools))
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


class EngineProcess(Protocol):
    """What ``EngineMachine`` uses of a process (``asyncio.subprocess.Process``
    has it); ``wait`` gives None when the exit status cannot be known."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


def spawn_outliving(
    argv: Sequence[str], *, stderr: int, pass_fds: Sequence[int], run_as: RunAs | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` to run on after qmpvm (``--state-dir``): no parent-death
    signal, a session of its own (a terminal's Ctrl-C to qmpvm's process
    group does not reach it), and not an asyncio child, which asyncio would
    kill when its transport is closed."""
    return subprocess.Popen(
        [*_confined(_executable(argv[0]), die_with_qmpvm=False, run_as=run_as), *argv[1:]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        pass_fds=pass_fds,
        start_new_session=True,
    )


class WatchedProcess:
    """A process watched through a pidfd: one ``spawn_outliving`` started
    (``child``: reaped here, its status known), or one an earlier qmpvm
    started (not our child: its exit status goes to its parent, unknown here)."""

    def __init__(self, pid: int, child: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._child = child
        self._pidfd = os.pidfd_open(pid)  # ProcessLookupError if it is gone already
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int | None] = self._loop.create_future()
        self._loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        self._release()
        code: int | None = None
        if self._child is not None:
            try:
                _pid, status = os.waitpid(self.pid, 0)
                code = os.waitstatus_to_exitcode(status)
                self._child.returncode = code
            except ChildProcessError:
                pass
        self.returncode = code if code is not None else UNKNOWN_EXIT
        if not self._exited.done():
            self._exited.set_result(code)

    def _release(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    async def wait(self) -> int | None:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self._pidfd >= 0:
            signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def copy_fd(self, number: int) -> int:
        """A copy of the process's descriptor ``number`` (pidfd_getfd, Linux
        5.6; qmpvm must be allowed to trace it: root is)."""
        import ctypes  # only here: ctypes costs milliseconds to import

        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.syscall(_SYS_PIDFD_GETFD, self._pidfd, number, 0))
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return fd

    def let_go(self) -> None:
        """Stop watching: the process runs on for the next qmpvm."""
        self._release()
        if self._child is not None:
            self._child.returncode = 0  # so Popen never waits for it


_SYS_PIDFD_GETFD = 438  # x86_64 and the other architectures with the common table

UNKNOWN_EXIT = -256
"""``returncode`` of a process that exited with a status this qmpvm cannot know."""

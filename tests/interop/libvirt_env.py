"""A private libvirt 9.0 (libvirtd + virtlogd) for tests, run as root without systemd.

libvirtd running as root is "privileged": its paths (/etc/libvirt,
/run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt) are
compiled in and no option or environment variable moves them.  So both
daemons start in a private mount namespace (``unshare --mount``) in which
those five directories are bind mounts of directories under one temporary
root.  Nothing of the host's libvirt is read or written, the paths libvirt
hands to the emulator stay short (socket paths), and a client outside the
namespace reaches the daemon with ``qemu:///system?socket=ROOT/run/libvirt-sock``.

Debian packages (no systemd, no polkit needed):
``libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients``.

Usage::

    with LibvirtEnv.start() as env:
        env.virsh("domcapabilities", "--emulatorbin", "/usr/bin/qemu-system-x86_64")

:func:`unavailable` returns the reason the environment cannot run here
(a test skips with it), or None.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOGD = "/usr/sbin/virtlogd"
VIRSH = "/usr/bin/virsh"
QEMU_DRIVER = Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so")

#: The directories a privileged libvirtd uses, and their names under the private root.
PRIVATE_DIRS: dict[str, str] = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/cache/libvirt": "cache",
    "/var/log/libvirt": "log",
}

#: Monitor traffic ("QEMU_MONITOR_SEND_MSG", "QEMU_MONITOR_RECV_REPLY") and the
#: qemu driver's decisions at debug level; everything else at warning.
DEFAULT_LOG_FILTERS = "1:qemu.qemu_monitor 1:qemu.qemu_process 1:qemu.qemu_capabilities 2:qemu"

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "logd"
"""


def unavailable() -> str | None:
    """Why a private libvirt cannot run here, or None when it can."""
    for path in (LIBVIRTD, VIRTLOGD, VIRSH, str(QEMU_DRIVER)):
        if not os.path.exists(path):
            return f"libvirt is not installed ({path} is missing)"
    if os.geteuid() != 0:
        return "a privileged libvirtd needs root"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        return "cannot make a mount namespace: " + probe.stderr.decode(errors="replace").strip()
    return None


class LibvirtError(RuntimeError):
    pass


def ensure_qemu_account() -> None:
    """The qemu driver resolves its compiled-in default account (Debian:
    libvirt-qemu:libvirt-qemu) before it reads qemu.conf, and fails to start
    without it, even with ``user = "root"``.  libvirt-daemon-system makes it
    (with systemd and polkit); without that package, make it as it does."""
    if subprocess.run(
        ["getent", "group", "libvirt-qemu"], capture_output=True, check=False
    ).returncode:
        subprocess.run(["groupadd", "--system", "libvirt-qemu"], check=True)
    if subprocess.run(
        ["getent", "passwd", "libvirt-qemu"], capture_output=True, check=False
    ).returncode:
        subprocess.run(
            ["useradd", "--system", "--gid", "libvirt-qemu", "--home-dir", "/var/lib/libvirt",
             "--no-create-home", "--shell", "/usr/sbin/nologin", "libvirt-qemu"],
            check=True,
        )  # fmt: skip


@dataclass
class LibvirtEnv:
    root: Path
    log_filters: str = DEFAULT_LOG_FILTERS
    qemu_conf_extra: str = ""
    libvirtd_pid: int = 0
    virtlogd_pid: int = 0
    _made_mountpoints: list[str] = field(default_factory=list)
    _namespace: str = ""

    # --- paths, as seen from outside the namespace ------------------------

    def private(self, system_path: str) -> Path:
        """Where ``system_path`` (under one of the private dirs) really is."""
        for top, name in PRIVATE_DIRS.items():
            if system_path == top or system_path.startswith(top + "/"):
                return self.root / name / system_path[len(top) + 1 :]
        raise ValueError(f"{system_path} is not in libvirt's private directories")

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def daemon_log(self) -> Path:
        return self.root / "libvirtd.log"

    @property
    def caps_cache(self) -> Path:
        return self.private("/var/cache/libvirt/qemu/capabilities")

    def domain_log(self, name: str) -> str:
        """libvirt's per-domain log: the command line it ran and the emulator's stderr."""
        path = self.private(f"/var/log/libvirt/qemu/{name}.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def clear_caps_cache(self) -> None:
        """Forget every probed emulator (libvirt re-probes at the next use)."""
        if self.caps_cache.is_dir():
            for entry in self.caps_cache.iterdir():
                entry.unlink()

    # --- the daemons -------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def start(
        cls,
        root: Path | None = None,
        *,
        log_filters: str = DEFAULT_LOG_FILTERS,
        qemu_conf_extra: str = "",
        timeout: float = 30,
    ) -> Iterator[LibvirtEnv]:
        reason = unavailable()
        if reason is not None:
            raise LibvirtError(reason)
        # short: the socket path must fit sun_path (108 bytes)
        root = root or Path(tempfile.mkdtemp(prefix="lv", dir="/tmp"))
        env = cls(root=root, log_filters=log_filters, qemu_conf_extra=qemu_conf_extra)
        try:
            env._launch(timeout)
            yield env
        finally:
            env.stop()

    def _write_config(self) -> None:
        for name in PRIVATE_DIRS.values():
            (self.root / name).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc"
        (etc / "libvirtd.conf").write_text(
            'unix_sock_group = "root"\n'
            'unix_sock_rw_perms = "0700"\n'
            'auth_unix_ro = "none"\n'
            'auth_unix_rw = "none"\n'
            "log_level = 3\n"
            f'log_filters = "{self.log_filters}"\n'
            f'log_outputs = "1:file:{self.daemon_log}"\n'
        )
        (etc / "virtlogd.conf").write_text(
            f'log_level = 3\nlog_outputs = "3:file:{self.root / "virtlogd.log"}"\n'
        )
        (etc / "qemu.conf").write_text(QEMU_CONF + self.qemu_conf_extra)

    def _launch(self, timeout: float) -> None:
        ensure_qemu_account()
        self._write_config()
        for top in PRIVATE_DIRS:
            if not os.path.isdir(top):
                os.makedirs(top)
                self._made_mountpoints.append(top)
        mounts = "".join(
            f"mount --bind {self.root / name} {top}\n" for top, name in PRIVATE_DIRS.items()
        )
        etc = self.root / "etc"
        script = (
            "set -e\n"
            + mounts
            + f"{VIRTLOGD} -d -f {etc / 'virtlogd.conf'} -p {self.root / 'virtlogd.pid'}\n"
            + f"{LIBVIRTD} -d -f {etc / 'libvirtd.conf'} -p {self.root / 'libvirtd.pid'}\n"
        )
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise LibvirtError(f"starting the daemons failed: {done.stderr.strip()}")
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                self.virtlogd_pid = int((self.root / "virtlogd.pid").read_text())
                self.libvirtd_pid = int((self.root / "libvirtd.pid").read_text())
                if self.socket.exists():
                    check = self.virsh("version", check=False, timeout=60)
                    if check.returncode == 0:
                        self._namespace = os.readlink(f"/proc/{self.libvirtd_pid}/ns/mnt")
                        return
            if time.monotonic() > deadline:
                raise LibvirtError(f"libvirtd did not answer on {self.socket}: {self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.daemon_log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def namespace_pids(self) -> set[int]:
        """Processes in the daemons' mount namespace: the daemons and their emulators."""
        pids: set[int] = set()
        if not self._namespace:
            return pids
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "ns" / "mnt") == self._namespace:
                        pids.add(int(entry.name))
        return pids

    def emulator_pids(self) -> set[int]:
        return self.namespace_pids() - {self.libvirtd_pid, self.virtlogd_pid}

    def stop(self) -> None:
        """Destroy every running domain, stop both daemons, end whatever is left
        in their namespace (by pid), and remove the private root."""
        if self.libvirtd_pid and _alive(self.libvirtd_pid):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                listed = self.virsh("list", "--name", check=False, timeout=15)
                for name in listed.stdout.split():
                    self.virsh("destroy", name, check=False, timeout=30)
        for pid in (self.libvirtd_pid, self.virtlogd_pid):
            _terminate(pid)
        for pid in self.emulator_pids():
            _terminate(pid)
        for top in reversed(self._made_mountpoints):
            with contextlib.suppress(OSError):
                os.rmdir(top)
        self._made_mountpoints.clear()
        self.libvirtd_pid = self.virtlogd_pid = 0
        if os.environ.get("QMPVM_KEEP_LIBVIRT_ROOT") is None:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- the client --------------------------------------------------------

    def virsh(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [VIRSH, "-q", "-c", self.uri, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if check and done.returncode != 0:
            raise LibvirtError(
                f"virsh {' '.join(args)} failed ({done.returncode}): "
                f"{done.stderr.strip() or done.stdout.strip()}"
            )
        return done

    def domstate(self, name: str) -> str:
        return self.virsh("domstate", name).stdout.strip()

    def wait_state(self, name: str, state: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (now := self.domstate(name)) != state:
            if time.monotonic() > deadline:
                raise LibvirtError(f"{name} is {now!r}, not {state!r} after {timeout} s")
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _terminate(pid: int, grace: float = 10) -> None:
    if not pid or not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)

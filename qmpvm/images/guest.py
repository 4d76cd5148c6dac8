"""Build a tiny bootable test guest from what the host already has installed.

The guest is the host's Debian cloud kernel (used in place, never copied)
plus a small initramfs: busybox-static, the handful of virtio modules the
cloud kernel ships as modules, and an ``/init`` script that prints
:data:`READY_MARKER` on the serial console and then serves a shell there.
Tests drive the guest by writing commands into the serial port.

Nothing is downloaded: the inputs come from the ``linux-image-cloud-amd64``
and ``busybox-static`` Debian packages. Builds are cached, keyed by a stamp
file of the inputs, so a repeated build only stats the inputs and re-reads
``modules.dep``.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmpvm.images.initramfs import CpioArchive

__all__ = [
    "BOOT_DIR",
    "BUSYBOX_CANDIDATES",
    "GUEST_MODULES",
    "MODULES_ROOT",
    "READY_MARKER",
    "GuestImage",
    "ImageError",
    "ModulePlan",
    "assemble_initramfs",
    "build_guest",
    "default_image_dir",
    "find_busybox",
    "find_kernel",
    "guest_cmdline",
    "host_tsc_khz",
    "is_static_elf",
    "read_module",
    "render_init",
    "resolve_modules",
]

READY_MARKER: str = "QMPVM-GUEST-READY"

#: Bump when the archive layout changes in a way the stamp would not notice.
FORMAT_VERSION = 1

BOOT_DIR = Path("/boot")
MODULES_ROOT = Path("/lib/modules")
BUSYBOX_CANDIDATES: tuple[Path, ...] = (Path("/bin/busybox"), Path("/usr/bin/busybox"))

#: Modules the guest loads, in any order: dependencies come from modules.dep.
GUEST_MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio-rng",
)

#: Without these the guest cannot see its disks on pc/q35 at all.
REQUIRED_MODULES: frozenset[str] = frozenset({"virtio_pci", "virtio_blk"})

INITRD_NAME = "initrd.img"
STAMP_NAME = "stamp.json"
LOCK_NAME = ".lock"

# Applets /init relies on; used only if ``busybox --list-full`` cannot run.
_FALLBACK_APPLETS: tuple[str, ...] = (
    "bin/sh", "bin/ash", "bin/cat", "bin/dmesg", "bin/echo", "bin/hostname",
    "bin/ls", "bin/mkdir", "bin/mount", "bin/setsid", "bin/stty", "bin/umount",
    "bin/uname", "sbin/insmod", "sbin/ip", "sbin/lsmod", "sbin/poweroff",
    "sbin/reboot", "usr/bin/md5sum", "usr/bin/sha256sum", "bin/cttyhack",
    "bin/ping", "bin/dd", "bin/sync", "bin/sleep",
)  # fmt: skip

_MODULE_SUFFIX = re.compile(r"\.ko(?:\.(xz|gz|zst))?$")


class ImageError(Exception):
    """The guest image cannot be built; the message says what to install or fix."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestImage:
    """A bootable guest: pass as ``-kernel``/``-initrd`` with ``console=ttyS0``."""

    kernel: Path
    initrd: Path
    kernel_version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ModulePlan:
    """Which module files go into the image, in ``insmod`` order."""

    load_order: tuple[str, ...]  # paths relative to /lib/modules/<ver>, as on the host
    builtin: tuple[str, ...]  # requested names compiled into this kernel
    missing: tuple[str, ...]  # requested names this kernel lacks entirely


def default_image_dir() -> Path:
    """Cache location: per user, so parallel users never share a half-written file."""
    explicit = os.environ.get("QMPVM_IMAGE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative values
        return Path(xdg) / "qmpvm" / "guest"
    return Path.home() / ".cache" / "qmpvm" / "guest"


def _version_key(version: str) -> list[tuple[int, int | str]]:
    return [
        (0, int(part)) if part.isdigit() else (1, part)
        for part in re.split(r"(\d+)", version)
        if part
    ]


def find_kernel(
    *, boot_dir: Path = BOOT_DIR, modules_root: Path = MODULES_ROOT
) -> tuple[Path, str]:
    """Newest installed kernel that has its modules; cloud kernels win.

    The cloud flavour is preferred because it boots fastest under TCG (few
    built-in drivers to probe) and keeps virtio as loadable modules of
    known names.
    """
    installed: list[tuple[Path, str]] = []
    for path in sorted(boot_dir.glob("vmlinuz-*")):
        version = path.name.removeprefix("vmlinuz-")
        if (modules_root / version / "modules.dep").is_file():
            installed.append((path, version))
    cloud = [item for item in installed if item[1].endswith("-cloud-amd64")]
    candidates = cloud or installed
    if not candidates:
        raise ImageError(
            f"no kernel with modules found (looked for {boot_dir}/vmlinuz-* with a "
            f"matching {modules_root}/<version>/modules.dep): "
            "install one with `apt-get install linux-image-cloud-amd64`"
        )
    kernel, version = max(candidates, key=lambda item: _version_key(item[1]))
    if not os.access(kernel, os.R_OK):
        raise ImageError(
            f"kernel {kernel} is not readable by this user, so QEMU could not load "
            f"it either: `chmod 0644 {kernel}` (as root) or run as root"
        )
    return kernel, version


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without PT_INTERP, i.e. runnable with no libc around."""
    try:
        with path.open("rb") as f:
            ident = f.read(16)
            if len(ident) < 16 or ident[:4] != b"\x7fELF":
                return False
            elf_class, data = ident[4], ident[5]
            if elf_class not in (1, 2) or data not in (1, 2):
                return False
            endian = "<" if data == 1 else ">"
            if elf_class == 2:
                f.seek(32)
                (phoff,) = struct.unpack(endian + "Q", f.read(8))
                f.seek(54)
            else:
                f.seek(28)
                (phoff,) = struct.unpack(endian + "I", f.read(4))
                f.seek(42)
            phentsize, phnum = struct.unpack(endian + "HH", f.read(4))
            if phnum == 0 or phentsize < 4:
                return False
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                raw = f.read(4)
                if len(raw) < 4:
                    return False
                (p_type,) = struct.unpack(endian + "I", raw)
                if p_type == 3:  # PT_INTERP
                    return False
            return True
    except (OSError, struct.error):
        return False


def find_busybox(candidates: Sequence[Path] = BUSYBOX_CANDIDATES) -> Path:
    """The host's static busybox; a dynamic one would die in the libc-less guest."""
    dynamic: list[Path] = []
    for candidate in candidates:
        if not candidate.is_file():
            continue
        if is_static_elf(candidate):
            return candidate.resolve()
        dynamic.append(candidate)
    if dynamic:
        found = ", ".join(str(p) for p in dynamic)
        raise ImageError(
            f"{found} is not statically linked and cannot run inside the guest: "
            "install `busybox-static` (apt-get install busybox-static)"
        )
    looked = ", ".join(str(p) for p in candidates)
    raise ImageError(
        f"busybox not found (looked at {looked}): "
        "install `busybox-static` (apt-get install busybox-static)"
    )


def _module_name(rel_path: str) -> str:
    base = rel_path.rsplit("/", 1)[-1]
    return _MODULE_SUFFIX.sub("", base).replace("-", "_")


def _parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Map normalized module name -> (path, dependency paths)."""
    modules: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        path = path.strip()
        if path:
            modules[_module_name(path)] = (path, deps.split())
    return modules


def _parse_builtin(modules_dir: Path) -> set[str]:
    try:
        text = (modules_dir / "modules.builtin").read_text()
    except FileNotFoundError:
        return set()
    return {_module_name(line.strip()) for line in text.splitlines() if line.strip()}


def resolve_modules(modules_dir: Path, names: Sequence[str] = GUEST_MODULES) -> ModulePlan:
    """Order modules so each follows its dependencies, per the kernel's modules.dep.

    Resolved at build time rather than hard-coded so that a kernel which
    splits or merges a module (virtio_pci_*_dev appeared in 5.14) still works.
    """
    try:
        dep_text = (modules_dir / "modules.dep").read_text()
    except FileNotFoundError as exc:
        raise ImageError(
            f"{modules_dir}/modules.dep is missing: reinstall the kernel package "
            "(apt-get install --reinstall linux-image-cloud-amd64) or run depmod"
        ) from exc
    by_name = _parse_modules_dep(dep_text)
    by_path = {path: deps for path, deps in by_name.values()}
    builtin_names = _parse_builtin(modules_dir)

    order: list[str] = []
    done: set[str] = set()
    active: set[str] = set()

    def visit(path: str) -> None:
        if path in done:
            return
        if path in active:
            raise ImageError(f"dependency cycle in {modules_dir}/modules.dep at {path}")
        active.add(path)
        for dep in by_path.get(path, []):
            visit(dep)
        active.discard(path)
        done.add(path)
        order.append(path)

    builtin: list[str] = []
    missing: list[str] = []
    for name in names:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key][0])
        elif key in builtin_names:
            builtin.append(name)
        else:
            missing.append(name)
    fatal = sorted(n for n in missing if n.replace("-", "_") in REQUIRED_MODULES)
    if fatal:
        raise ImageError(
            f"kernel modules {', '.join(fatal)} are neither in {modules_dir} nor built "
            "in; the guest could not see virtio disks: "
            "install linux-image-cloud-amd64"
        )
    return ModulePlan(load_order=tuple(order), builtin=tuple(builtin), missing=tuple(missing))


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox ``insmod`` only takes plain ELF."""
    data = path.read_bytes()
    suffix = path.suffix
    if suffix == ".xz":
        return lzma.decompress(data)
    if suffix == ".gz":
        return gzip.decompress(data)
    if suffix == ".zst":
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ImageError(
                f"{path} is zstd-compressed and Python 3.11's standard library cannot "
                "decompress it: install the `zstd` package (apt-get install zstd)"
            )
        result = subprocess.run([zstd, "-dc", "--", str(path)], capture_output=True, check=False)
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip()
            raise ImageError(f"zstd failed to decompress {path}: {err}")
        return result.stdout
    return data


def _strip_compression(rel_path: str) -> str:
    return re.sub(r"\.ko\.(?:xz|gz|zst)$", ".ko", rel_path)


_INIT_TEMPLATE = r"""#!/bin/sh
# qmpvm test guest init, generated by qmpvm.images.guest -- do not edit.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
umask 022
mkdir -p /proc /sys /dev /tmp /run /root
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec devpts /dev/pts 2>/dev/null
exec </dev/console >/dev/console 2>&1

read -r cmdline </proc/cmdline
set -f
set -- $cmdline
set +f
ipaddr=
gateway=
debug=
noecho=
for arg in "$@"; do
  case "$arg" in
    qmpvm.ip=*) ipaddr=${arg#qmpvm.ip=} ;;
    qmpvm.gw=*) gateway=${arg#qmpvm.gw=} ;;
    qmpvm.debug) debug=1 ;;
    qmpvm.echo=0) noecho=1 ;;
  esac
done
# Keep kernel chatter from interleaving with the output tests parse.
[ -n "$debug" ] || dmesg -n 1

for m in @MODULES@; do
  insmod "/lib/modules/@KVER@/$m" || echo "qmpvm-init: failed to load $m"
done

hostname qmpvm-guest
ip link set lo up
if [ -n "$ipaddr" ]; then
  if ip addr add "$ipaddr" dev eth0 && ip link set eth0 up; then
    if [ -n "$gateway" ]; then
      ip route add default via "$gateway" || echo "qmpvm-init: no route via $gateway"
    fi
  else
    echo "qmpvm-init: failed to configure eth0 with $ipaddr"
  fi
fi

# A serial line reports no size; ash would then wrap echoed input at 80 columns.
stty cols 1024 rows 64 2>/dev/null
# With echo off, ash reads plain lines: output is exactly prompt + command output.
[ -z "$noecho" ] || stty -echo

echo
echo @MARKER@

export HOME=/root PS1='guest# '
cd /
while true; do
  setsid cttyhack sh || sleep 1
done
"""


def render_init(kernel_version: str, load_order: Sequence[str]) -> str:
    """The /init script; its text is part of the cache key, so edits force a rebuild."""
    modules = " ".join(_strip_compression(p) for p in load_order)
    return (
        _INIT_TEMPLATE.replace("@MODULES@", modules)
        .replace("@KVER@", kernel_version)
        .replace("@MARKER@", READY_MARKER)
    )


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host's CPU clock in kHz, which is also the TSC rate a TCG guest sees."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.MULTILINE)
    if match is None:
        return None
    khz = round(float(match.group(1)) * 1000)
    return khz if khz > 0 else None


def guest_cmdline(
    machine: str = "q35",
    *,
    ip: str | None = None,
    gateway: str | None = None,
    echo: bool = True,
    quiet: bool = True,
    extra: Sequence[str] = (),
) -> str:
    """Kernel command line for this guest, so callers need not know /init's knobs.

    ``echo=False`` turns off serial echo, so the console carries exactly the
    prompt and command output. On microvm the kernel has neither HPET nor
    PM timer to calibrate the TSC against; under TCG the PIT calibration
    then often fails and boot hangs, so the host's rate is passed in.
    """
    args = ["console=ttyS0", "panic=-1"]
    if quiet:
        args.append("quiet")
    if machine.split(",", 1)[0] == "microvm" and not any(
        a.startswith("tsc_early_khz=") for a in extra
    ):
        khz = host_tsc_khz()
        if khz is not None:
            args.append(f"tsc_early_khz={khz}")
    if ip is not None:
        args.append(f"qmpvm.ip={ip}")
    if gateway is not None:
        args.append(f"qmpvm.gw={gateway}")
    if not echo:
        args.append("qmpvm.echo=0")
    args.extend(extra)
    return " ".join(args)


def _busybox_applets(busybox: Path) -> list[str]:
    """Applet paths (e.g. ``sbin/insmod``) from the binary itself, so all work in the guest."""
    try:
        result = subprocess.run(
            [str(busybox), "--list-full"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return list(_FALLBACK_APPLETS)
    applets = [
        line.strip().lstrip("/")
        for line in result.stdout.splitlines()
        if line.strip() and ".." not in line
    ]
    if result.returncode != 0 or "bin/sh" not in applets:
        return list(_FALLBACK_APPLETS)
    return applets


def assemble_initramfs(
    *,
    busybox: Path,
    modules_dir: Path,
    kernel_version: str,
    load_order: Sequence[str],
    init_text: str,
) -> CpioArchive:
    """Lay out the guest's root filesystem in memory."""
    archive = CpioArchive()
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys",
                      "tmp", "run", "root", "dev"):  # fmt: skip
        archive.add_dir(directory)
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    archive.add_chardev("dev/console", 5, 1, 0o600)
    archive.add_chardev("dev/null", 1, 3, 0o666)
    archive.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _busybox_applets(busybox):
        if applet != "bin/busybox" and applet not in archive:
            archive.add_symlink(applet, "/bin/busybox")
    for rel in load_order:
        archive.add_file(
            f"lib/modules/{kernel_version}/{_strip_compression(rel)}",
            read_module(modules_dir / rel),
            0o644,
        )
    archive.add_file("etc/hostname", b"qmpvm-guest\n")
    archive.add_file("init", init_text.encode(), 0o755)
    return archive


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Readers (a QEMU starting concurrently) see the old file or the new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize builders (e.g. pytest-xdist workers) sharing one cache dir."""
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _stamp_for(
    *, kernel: Path, kernel_version: str, busybox: Path, init_text: str
) -> dict[str, Any]:
    kst = kernel.stat()
    bst = busybox.stat()
    return {
        "format": FORMAT_VERSION,
        "kernel": str(kernel),
        "kernel_version": kernel_version,
        "kernel_size": kst.st_size,
        "kernel_mtime_ns": kst.st_mtime_ns,
        "busybox": str(busybox),
        "busybox_size": bst.st_size,
        "busybox_mtime_ns": bst.st_mtime_ns,
        "init_sha256": hashlib.sha256(init_text.encode()).hexdigest(),
    }


def _stamp_matches(
    stamp: Mapping[str, Any] | None, wanted: Mapping[str, Any], initrd: Path
) -> bool:
    if stamp is None:
        return False
    try:
        size = initrd.stat().st_size
    except FileNotFoundError:
        return False
    recorded = dict(stamp)
    return recorded.pop("initrd_size", None) == size and recorded == dict(wanted)


def _write_image(
    *, initrd: Path, stamp_path: Path, stamp: Mapping[str, Any], archive: CpioArchive
) -> None:
    data = archive.to_gzip()
    # Drop the stamp first: a crash mid-build must not leave an old stamp
    # vouching for a new (or half-replaced) initrd.
    with contextlib.suppress(FileNotFoundError):
        stamp_path.unlink()
    _atomic_write(initrd, data)
    text = json.dumps(dict(stamp, initrd_size=len(data)), indent=2, sort_keys=True) + "\n"
    _atomic_write(stamp_path, text.encode())


def build_guest(dest: Path | None = None, *, force: bool = False) -> GuestImage:
    """Build (or reuse) the guest initramfs in ``dest``.

    Cheap when nothing changed: the inputs are only ``stat``-ed and compared
    with the stamp, and neither file is rewritten, so callers can invoke this
    at the start of every test session.
    """
    dest = default_image_dir() if dest is None else Path(dest)
    kernel, version = find_kernel()
    busybox = find_busybox()
    modules_dir = MODULES_ROOT / version
    plan = resolve_modules(modules_dir)
    init_text = render_init(version, plan.load_order)
    wanted = _stamp_for(kernel=kernel, kernel_version=version, busybox=busybox, init_text=init_text)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create image directory {dest}: {exc}") from exc
    initrd = dest / INITRD_NAME
    stamp_path = dest / STAMP_NAME
    image = GuestImage(kernel=kernel, initrd=initrd, kernel_version=version)
    try:
        with _locked(dest / LOCK_NAME):
            if not force and _stamp_matches(_read_stamp(stamp_path), wanted, initrd):
                return image
            _write_image(
                initrd=initrd,
                stamp_path=stamp_path,
                stamp=wanted,
                archive=assemble_initramfs(
                    busybox=busybox,
                    modules_dir=modules_dir,
                    kernel_version=version,
                    load_order=plan.load_order,
                    init_text=init_text,
                ),
            )
    except OSError as exc:
        raise ImageError(f"cannot write the guest image in {dest}: {exc}") from exc
    return image

"""Tests for the test-guest builder, ending with a real QEMU (TCG) boot.

The archive is read back with a reader written here, independently of
``qmpvm.images.initramfs``, so a symmetric bug in the writer cannot hide.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import selectors
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmpvm.images import (
    READY_MARKER,
    GuestImage,
    ImageError,
    build_guest,
    default_image_dir,
    guest_cmdline,
)
from qmpvm.images.cli import main as cli_main
from qmpvm.images.guest import (
    GUEST_MODULES,
    find_busybox,
    find_kernel,
    host_tsc_khz,
    is_static_elf,
    read_module,
    resolve_modules,
)
from qmpvm.images.initramfs import CpioArchive

QEMU = shutil.which("qemu-system-x86_64")


# --- an independent newc reader ------------------------------------------------


@dataclass(frozen=True)
class Member:
    mode: int
    data: bytes
    rdev: tuple[int, int]


def read_newc(blob: bytes) -> dict[str, Member]:
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    members: dict[str, Member] = {}
    pos = 0
    while True:
        assert blob[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = (
            fields[1],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        name_start = pos + 110
        name = blob[name_start : name_start + namesize - 1].decode()
        assert blob[name_start + namesize - 1] == 0
        data_start = (name_start + namesize + 3) & ~3
        data = blob[data_start : data_start + filesize]
        pos = (data_start + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return members
        assert name not in members, f"duplicate {name}"
        members[name] = Member(mode=mode, data=data, rdev=(rmaj, rmin))


def _parents_precede(names: list[str]) -> bool:
    seen: set[str] = set()
    for name in names:
        parent = name.rpartition("/")[0]
        if parent and parent not in seen:
            return False
        seen.add(name)
    return True


# --- pure unit tests -------------------------------------------------------------


def test_cpio_roundtrip_through_independent_reader() -> None:
    archive = CpioArchive()
    archive.add_file("/a/b/file.txt", b"hello", 0o640)
    archive.add_symlink("bin/sh", "/bin/busybox")
    archive.add_chardev("dev/console", 5, 1)
    archive.add_file("odd", b"123")  # lengths not multiple of 4 exercise padding
    members = read_newc(archive.to_gzip())
    assert list(members) == [
        "a",
        "a/b",
        "a/b/file.txt",
        "bin",
        "bin/sh",
        "dev",
        "dev/console",
        "odd",
    ]
    assert _parents_precede(list(members))
    assert members["a/b/file.txt"].data == b"hello"
    assert members["a/b/file.txt"].mode == stat.S_IFREG | 0o640
    assert stat.S_ISDIR(members["a/b"].mode)
    assert stat.S_ISLNK(members["bin/sh"].mode) and members["bin/sh"].data == b"/bin/busybox"
    assert stat.S_ISCHR(members["dev/console"].mode) and members["dev/console"].rdev == (5, 1)
    assert members["odd"].data == b"123"


def test_cpio_output_is_reproducible() -> None:
    def make() -> bytes:
        archive = CpioArchive()
        archive.add_file("x", b"data", 0o755)
        return archive.to_gzip()

    assert make() == make()


def test_cpio_rejects_duplicates_and_dotdot() -> None:
    archive = CpioArchive()
    archive.add_file("x", b"")
    with pytest.raises(ValueError, match="duplicate"):
        archive.add_file("/x", b"")
    with pytest.raises(ValueError, match=r"\.\."):
        archive.add_file("../etc/passwd", b"")


def _fake_modules_dir(root: Path) -> Path:
    mdir = root / "lib/modules/9.9.9-cloud-amd64"
    (mdir / "kernel/drivers/virtio").mkdir(parents=True)
    (mdir / "kernel/drivers/block").mkdir(parents=True)
    (mdir / "kernel/drivers/char").mkdir(parents=True)
    (mdir / "kernel/drivers/virtio/virtio_ring.ko").write_bytes(b"\x7fELFring")
    (mdir / "kernel/drivers/virtio/virtio.ko.xz").write_bytes(lzma.compress(b"\x7fELFvirtio"))
    (mdir / "kernel/drivers/virtio/virtio_pci.ko.gz").write_bytes(gzip.compress(b"\x7fELFpci"))
    (mdir / "kernel/drivers/block/virtio_blk.ko").write_bytes(b"\x7fELFblk")
    (mdir / "kernel/drivers/char/virtio-rng.ko").write_bytes(b"\x7fELFrng")
    (mdir / "modules.dep").write_text(
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko.xz"
        " kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_pci.ko.gz: kernel/drivers/virtio/virtio.ko.xz"
        " kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/char/virtio-rng.ko: kernel/drivers/virtio/virtio.ko.xz\n"
    )
    (mdir / "modules.builtin").write_text("kernel/net/core/failover.ko\n")
    return mdir


def test_resolve_modules_puts_dependencies_first(tmp_path: Path) -> None:
    mdir = _fake_modules_dir(tmp_path)
    plan = resolve_modules(mdir, ["virtio_blk", "virtio_rng", "failover", "virtio_pci", "nope"])
    names = [p.rsplit("/", 1)[-1] for p in plan.load_order]
    assert names == [
        "virtio_ring.ko",
        "virtio.ko.xz",
        "virtio_blk.ko",
        "virtio-rng.ko",
        "virtio_pci.ko.gz",
    ]
    assert plan.builtin == ("failover",)
    assert plan.missing == ("nope",)
    assert read_module(mdir / "kernel/drivers/virtio/virtio.ko.xz") == b"\x7fELFvirtio"
    assert read_module(mdir / "kernel/drivers/virtio/virtio_pci.ko.gz") == b"\x7fELFpci"


def test_resolve_modules_requires_virtio_blk(tmp_path: Path) -> None:
    mdir = _fake_modules_dir(tmp_path)
    (mdir / "modules.dep").write_text("kernel/drivers/virtio/virtio_ring.ko:\n")
    with pytest.raises(ImageError, match="linux-image-cloud-amd64"):
        resolve_modules(mdir, GUEST_MODULES)


def test_find_kernel_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/vmlinuz-1.0-cloud-amd64").write_bytes(b"k")  # no modules dir
    with pytest.raises(ImageError, match="apt-get install linux-image-cloud-amd64"):
        find_kernel(boot_dir=tmp_path / "boot", modules_root=tmp_path / "modules")


def test_find_kernel_prefers_newest_cloud(tmp_path: Path) -> None:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for version in ("6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", "6.9.0-1-amd64"):
        (boot / f"vmlinuz-{version}").write_bytes(b"k")
        (mods / version).mkdir(parents=True)
        (mods / version / "modules.dep").write_text("")
    (boot / "vmlinuz-7.0.0-1-cloud-amd64").write_bytes(b"k")  # modules not installed
    assert find_kernel(boot_dir=boot, modules_root=mods) == (
        boot / "vmlinuz-6.1.0-56-cloud-amd64",
        "6.1.0-56-cloud-amd64",
    )
    for cloud in boot.glob("*cloud*"):
        cloud.unlink()
    assert find_kernel(boot_dir=boot, modules_root=mods)[1] == "6.9.0-1-amd64"


def test_dynamic_busybox_is_rejected(tmp_path: Path) -> None:
    dynamic = Path(sys.executable).resolve()
    if is_static_elf(dynamic):
        pytest.skip(f"{dynamic} is static; need a dynamically linked ELF")
    fake = tmp_path / "busybox"
    shutil.copyfile(dynamic, fake)
    with pytest.raises(ImageError, match="busybox-static"):
        find_busybox([fake])
    with pytest.raises(ImageError, match="busybox-static"):
        find_busybox([tmp_path / "absent"])
    not_elf = tmp_path / "script"
    not_elf.write_text("#!/bin/sh\n")
    assert not is_static_elf(not_elf)


def test_default_image_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QMPVM_IMAGE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_image_dir() == tmp_path / "explicit"
    monkeypatch.delenv("QMPVM_IMAGE_DIR")
    assert default_image_dir() == tmp_path / "xdg/qmpvm/guest"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_image_dir() == tmp_path / "home/.cache/qmpvm/guest"


def test_guest_cmdline(tmp_path: Path) -> None:
    assert guest_cmdline() == "console=ttyS0 panic=-1 quiet"
    line = guest_cmdline("q35", ip="10.0.0.2/24", gateway="10.0.0.1", echo=False, extra=["x=1"])
    assert line.split()[-4:] == ["qmpvm.ip=10.0.0.2/24", "qmpvm.gw=10.0.0.1", "qmpvm.echo=0", "x=1"]
    micro = guest_cmdline("microvm,acpi=on", extra=["tsc_early_khz=1"])
    assert micro.count("tsc_early_khz=") == 1
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2445.430\n")
    assert host_tsc_khz(cpuinfo) == 2445430
    assert host_tsc_khz(tmp_path / "absent") is None


# --- against the host's kernel and busybox ---------------------------------------


def _build_or_skip(dest: Path, *, force: bool = False) -> GuestImage:
    try:
        return build_guest(dest, force=force)
    except ImageError as exc:
        pytest.skip(f"cannot build the guest on this host: {exc}")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    return _build_or_skip(tmp_path_factory.mktemp("guest"))


def test_build_is_idempotent(tmp_path: Path) -> None:
    first = _build_or_skip(tmp_path)
    stamp = tmp_path / "stamp.json"
    before = (first.initrd.stat(), stamp.stat())
    second = build_guest(tmp_path)
    after = (second.initrd.stat(), stamp.stat())
    assert second == first
    for old, new in zip(before, after, strict=True):
        assert (new.st_ino, new.st_mtime_ns) == (old.st_ino, old.st_mtime_ns)

    content = first.initrd.read_bytes()
    build_guest(tmp_path, force=True)
    assert first.initrd.stat().st_ino != before[0].st_ino  # replaced by rename
    assert first.initrd.read_bytes() == content  # and reproducible


def test_changed_inputs_trigger_rebuild(tmp_path: Path) -> None:
    image = _build_or_skip(tmp_path)
    stamp_path = tmp_path / "stamp.json"
    good = json.loads(stamp_path.read_text())
    ino = image.initrd.stat().st_ino
    stale = dict(good, init_sha256="0" * 64)  # as if the init script had changed
    stamp_path.write_text(json.dumps(stale))
    build_guest(tmp_path)
    assert image.initrd.stat().st_ino != ino
    assert json.loads(stamp_path.read_text()) == good

    content = image.initrd.read_bytes()
    image.initrd.unlink()  # the inode may be reused, so compare contents
    build_guest(tmp_path)
    assert image.initrd.read_bytes() == content


def test_archive_contents(image: GuestImage) -> None:
    members = read_newc(image.initrd.read_bytes())
    names = list(members)
    assert _parents_precede(names)

    init = members["init"]
    assert stat.S_ISREG(init.mode) and init.mode & 0o111
    script = init.data.decode()
    assert script.startswith("#!/bin/sh\n")
    assert READY_MARKER in script

    busybox = members["bin/busybox"]
    assert busybox.data == find_busybox().read_bytes()
    assert busybox.mode & 0o111
    for applet in ("sh", "insmod", "cttyhack", "setsid", "poweroff", "ip", "md5sum"):
        paths = [f"{d}/{applet}" for d in ("bin", "sbin", "usr/bin", "usr/sbin")]
        links = [members[p] for p in paths if p in members]
        assert links, f"no {applet} applet link"
        assert stat.S_ISLNK(links[0].mode) and links[0].data == b"/bin/busybox", applet
    assert members["dev/console"].rdev == (5, 1)

    prefix = f"lib/modules/{image.kernel_version}/"
    modules = {
        name.rsplit("/", 1)[-1].removesuffix(".ko").replace("-", "_"): name
        for name in names
        if name.startswith(prefix) and name.endswith(".ko")
    }
    for module in GUEST_MODULES:
        key = module.replace("-", "_")
        assert key in modules, f"{module} missing from the initramfs"
        assert members[modules[key]].data[:4] == b"\x7fELF"
    # The init script must insmod each module after what it depends on.
    order = [modules[k].removeprefix(prefix) for k in ("virtio_ring", "virtio", "virtio_blk")]
    positions = [script.index(p) for p in order]
    assert positions == sorted(positions)
    assert script.index("virtio_net.ko") > script.index("net_failover.ko")
    assert len(modules) <= 16  # stays small


def test_cli_build_prints_paths(image: GuestImage, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["build", str(image.initrd.parent)]) == 0
    out = capsys.readouterr().out
    assert f"kernel: {image.kernel}" in out
    assert f"initrd: {image.initrd}" in out


# --- the real proof: boot it -----------------------------------------------------


class Console:
    """Expect-style access to a QEMU whose serial port is on stdio."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None and proc.stdin is not None
        self.proc = proc
        self.buffer = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(proc.stdout, selectors.EVENT_READ)

    def expect(self, needle: bytes, timeout: float) -> bytes:
        """Return everything up to and including ``needle``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while needle not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out waiting for {needle!r}; got {self.buffer[-2000:]!r}"
                )
            if self._selector.select(min(remaining, 0.5)):
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(
                        f"QEMU exited waiting for {needle!r}: {self.buffer[-2000:]!r}"
                    )
                self.buffer += chunk
        end = self.buffer.index(needle) + len(needle)
        out, self.buffer = self.buffer[:end], self.buffer[end:]
        return out

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


@pytest.mark.engine
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize(
    ("machine", "disk_device"),
    [("q35", "virtio-blk-pci"), ("microvm", "virtio-blk-device")],
)
def test_boot_tcg_reads_virtio_disk(
    image: GuestImage, tmp_path: Path, machine: str, disk_device: str
) -> None:
    assert QEMU is not None
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(1 << 20))
    expected = hashlib.md5(disk.read_bytes()).hexdigest()
    cmd = [
        QEMU, "-M", machine, "-accel", "tcg", "-m", "256", "-nodefaults", "-no-user-config",
        "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", guest_cmdline(machine, echo=False),
        "-drive", f"file={disk},if=none,format=raw,id=d0",
        "-device", f"{disk_device},drive=d0",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        console = Console(proc)
        console.expect(READY_MARKER.encode() + b"\r\n", timeout=60)
        boot_seconds = time.monotonic() - started
        console.send("md5sum /dev/vda; ls /sys/block; echo rc=$?")
        out = console.expect(b"rc=0", timeout=30).decode(errors="replace")
        assert f"{expected}  /dev/vda" in out
        assert "vda" in out.split()
        console.send("poweroff -f")
        assert proc.wait(timeout=30) == 0
        print(f"{machine}/TCG boot to {READY_MARKER}: {boot_seconds:.2f}s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()

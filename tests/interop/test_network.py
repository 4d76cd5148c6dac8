"""A real network: a tap in a private network namespace, passed to qmpvm as a descriptor.

qmpvm and its QEMU engine run in the host's network namespace; the tap
device, its address and every packet stay inside a namespace the test
creates and deletes (``qmpvm-test-<pid>-<n>``).  The test opens the tap
itself, from a thread that has joined that namespace, and hands the open
descriptor to qmpvm with SCM_RIGHTS (``getfd``): the engine never needs to
see the namespace, which is what qmpvm's descriptor ownership is for.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import itertools
import os
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import QmpvmProcess, connect, needs_qemu, next_event, quit_and_disconnect
from qemu.qmp import ExecuteError, QMPClient

from qmpvm.images import READY_MARKER, GuestImage, guest_cmdline
from qmpvm.tools.console import SocketConsole

pytestmark = needs_qemu
MiB = 1024 * 1024
BOOT_TIMEOUT = 60

HOST_IP, GUEST_IP, PREFIX = "10.77.0.1", "10.77.0.2", 24
GUEST_MAC = "52:54:00:12:34:56"
TAP = "tap0"

# <linux/if_tun.h>, <sched.h>
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000

_counter = itertools.count()


def _ping_argv() -> list[str] | None:
    """A ping that runs inside the namespace: iputils' if installed, else busybox's."""
    if shutil.which("ping") is not None:
        return ["ping"]
    busybox = shutil.which("busybox")
    if busybox is not None:
        return [busybox, "ping"]
    return None


@dataclass
class NetNs:
    name: str

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def check(self, *argv: str) -> str:
        result = self.exec(*argv)
        assert result.returncode == 0, (
            f"in netns {self.name}: {' '.join(argv)} exited {result.returncode}: "
            f"{result.stdout}{result.stderr}"
        )
        return result.stdout

    async def ping(self, address: str, count: int, wait: int) -> tuple[bool, str]:
        """Ping ``address`` from inside the namespace; (any reply, output)."""
        ping = _ping_argv()
        assert ping is not None, "no ping on this host (neither iputils-ping nor busybox)"
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            self.name,
            *ping,
            "-c",
            str(count),
            "-W",
            str(wait),
            address,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), count + wait + 10)
        return proc.returncode == 0, out.decode(errors="replace")

    def open_tap(self, ifname: str) -> int:
        """An open descriptor on tap ``ifname`` of this namespace (IFF_TAP | IFF_NO_PI).

        /dev/net/tun binds to the namespace of whoever opens it, so the open
        and TUNSETIFF run in a thread that has joined the namespace first;
        setns() moves only the calling thread, and the thread then ends.
        """
        opened: list[int] = []
        failed: list[BaseException] = []

        def worker() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                with open(f"/var/run/netns/{self.name}", "rb") as ns:
                    if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns into {self.name}: {os.strerror(err)}")
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
                try:
                    ifreq = struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI)
                    fcntl.ioctl(fd, TUNSETIFF, ifreq)
                except BaseException:
                    os.close(fd)
                    raise
                opened.append(fd)
            except BaseException as err:  # re-raised in the test's thread
                failed.append(err)

        thread = threading.Thread(target=worker, name=f"setns-{self.name}")
        thread.start()
        thread.join()
        if failed:
            raise AssertionError(f"cannot open {ifname} in netns {self.name}") from failed[0]
        return opened[0]


@pytest.fixture
def netns() -> Iterator[NetNs]:
    """A fresh namespace with tap0 at 10.77.0.1/24, deleted afterwards whatever happens."""
    if shutil.which("ip") is None:
        pytest.skip("`ip` (iproute2) is not installed: cannot create a network namespace")
    name = f"qmpvm-test-{os.getpid()}-{next(_counter)}"
    try:
        added = subprocess.run(
            ["ip", "netns", "add", name], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as err:
        pytest.skip(f"`ip netns add` cannot run here: {err}")
    if added.returncode != 0:
        pytest.skip(f"`ip netns add` is not permitted here: {added.stderr.strip()}")
    try:
        ns = NetNs(name)
        ns.check("ip", "tuntap", "add", "dev", TAP, "mode", "tap")
        ns.check("ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", TAP)
        ns.check("ip", "link", "set", TAP, "up")
        yield ns
    finally:
        subprocess.run(
            ["ip", "netns", "delete", name], capture_output=True, timeout=30, check=False
        )


async def boot_guest(
    client: QMPClient, guest: GuestImage, tmp: Path, *, ip: str | None
) -> SocketConsole:
    """Build the machine from what is configured so far, start it, wait for /init."""
    await client.execute("machine-set", {"type": "q35", "accel": "tcg", "memory": 256 * MiB})
    append = guest_cmdline("q35", ip=ip)
    await client.execute(
        "boot-set", {"kernel": str(guest.kernel), "initrd": str(guest.initrd), "append": append}
    )
    path = tmp / "ttyS0.sock"
    addr = {"type": "unix", "data": {"path": str(path)}}
    backend = {"type": "socket", "data": {"addr": addr, "server": True, "wait": False}}
    await client.execute("chardev-add", {"id": "ser0", "backend": backend})
    await client.execute("device_add", {"driver": "isa-serial", "chardev": "ser0", "id": "serial0"})
    await client.execute("machine-init")
    await client.execute("cont")
    console = await SocketConsole.connect(str(path))
    try:
        await console.expect(READY_MARKER, BOOT_TIMEOUT)
    except BaseException:
        await console.close()
        raise
    return console


async def query(client: QMPClient, command: str) -> dict[str, Any]:
    reply = await client.execute(command)
    assert isinstance(reply, dict), f"{command} returned {reply!r}"
    return reply


async def pass_tap(client: QMPClient, netns: NetNs, fdname: str) -> None:
    """Open the namespace's tap and give it to qmpvm as ``fdname``; keep no copy."""
    fd = netns.open_tap(TAP)
    try:
        client.send_fd_scm(fd)
        await client.execute("getfd", {"fdname": fdname})
    finally:
        os.close(fd)


def tun_fds_of(pid: int) -> int:
    """How many descriptors on /dev/net/tun process ``pid`` holds."""
    count = 0
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(entry) == "/dev/net/tun":
                count += 1
        except OSError:
            continue
    return count


async def wait_reader_closed(write_end: int, timeout: float = 10) -> None:
    """Wait until nobody holds the read end of the pipe ``write_end`` belongs to."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                os.write(write_end, b"x")
            except BrokenPipeError:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("qmpvm kept a descriptor its disconnected client owned")
    finally:
        os.close(write_end)


async def guest_ping(console: SocketConsole, address: str) -> str:
    """``rc=0`` when the guest got a reply from ``address``."""
    return await console.run(f"ping -c 1 -W 2 {address} >/dev/null 2>&1; echo rc=$?")


async def guest_carrier(console: SocketConsole, wanted: str) -> str:
    """eth0's carrier in the guest, after waiting up to 5 s for it to read ``wanted``."""
    carrier = "/sys/class/net/eth0/carrier"
    return await console.run(
        f"for i in $(seq 25); do [ $(cat {carrier}) = {wanted} ] && break; sleep 0.2; done;"
        f" cat {carrier}"
    )


async def test_cold_plugged_tap_pings_both_ways_and_follows_set_link(
    tmp_path: Path, guest: GuestImage, netns: NetNs, qmpvm: QmpvmProcess
) -> None:
    client = await connect(qmpvm)
    await pass_tap(client, netns, "tap0fd")
    await client.execute("netdev_add", {"type": "tap", "id": "net0", "fd": "tap0fd"})
    await client.execute(
        "device_add",
        {"driver": "virtio-net-pci", "netdev": "net0", "mac": GUEST_MAC, "id": "nic0"},
    )
    console = await boot_guest(client, guest, tmp_path, ip=f"{GUEST_IP}/{PREFIX}")
    try:
        assert "failed to configure eth0" not in console.transcript, console.transcript[-400:]

        ok, out = await netns.ping(GUEST_IP, count=3, wait=2)
        assert ok, f"host -> guest ping through the passed tap failed:\n{out}"
        assert GUEST_MAC in netns.check("ip", "neigh", "show", GUEST_IP), (
            "the reply came from the guest's NIC"
        )
        assert await guest_ping(console, HOST_IP) == "rc=0", "guest -> host ping failed"

        await client.execute("set_link", {"name": "nic0", "up": False})
        links = (await query(client, "query-machine"))["links"]
        assert links == [{"name": "nic0", "up": False}], f"query-machine links: {links}"
        assert await guest_carrier(console, "0") == "0", "the guest sees its link go down"
        ok, out = await netns.ping(GUEST_IP, count=2, wait=1)
        assert not ok, f"host -> guest ping succeeded with nic0's link down:\n{out}"

        await client.execute("set_link", {"name": "nic0", "up": True})
        links = (await query(client, "query-machine"))["links"]
        assert all(link["up"] for link in links if link["name"] == "nic0"), (
            f"query-machine links after up: {links}"
        )
        assert await guest_carrier(console, "1") == "1", "the guest sees its link come back"
        ok, out = await netns.ping(GUEST_IP, count=3, wait=2)
        assert ok, f"host -> guest ping failed after set_link up:\n{out}"
        assert await guest_ping(console, HOST_IP) == "rc=0", "guest -> host ping after link up"
    finally:
        await console.close()
    # A descriptor nothing uses marks when qmpvm has processed the disconnect.
    spare_read, spare_write = os.pipe()
    client.send_fd_scm(spare_read)
    await client.execute("getfd", {"fdname": "spare"})
    os.close(spare_read)
    await client.disconnect()
    await wait_reader_closed(spare_write)
    assert tun_fds_of(qmpvm.pid) == 1, "the tap outlives its connection: the machine owns it"
    client = await connect(qmpvm)
    await quit_and_disconnect(client)
    qmpvm.process.wait(15)


async def test_hot_plugged_tap_is_forwarded_to_the_running_engine(
    tmp_path: Path, guest: GuestImage, netns: NetNs, qmpvm: QmpvmProcess
) -> None:
    client = await connect(qmpvm)
    console = await boot_guest(client, guest, tmp_path, ip=None)
    try:
        assert "eth0" not in await console.run("ls /sys/class/net"), "booted without a NIC"

        await pass_tap(client, netns, "hotfd")
        assert tun_fds_of(qmpvm.pid) == 1, "qmpvm holds the passed tap"
        await client.execute("netdev_add", {"type": "tap", "id": "net1", "fd": "hotfd"})
        await client.execute(
            "device_add",
            {"driver": "virtio-net-pci", "netdev": "net1", "mac": GUEST_MAC, "id": "nic1"},
        )
        engine_pid = (await query(client, "query-machine"))["engine"]["pid"]
        assert tun_fds_of(engine_pid) == 1, "qmpvm forwarded the tap to the engine"
        configured = await console.run(
            "for i in $(seq 40); do [ -e /sys/class/net/eth0 ] && break; sleep 0.25; done;"
            f" ip addr add {GUEST_IP}/{PREFIX} dev eth0 && ip link set eth0 up && echo configured"
        )
        assert configured.endswith("configured"), f"no hot-plugged eth0: {configured!r}"

        ok, out = await netns.ping(GUEST_IP, count=3, wait=2)
        assert ok, f"host -> guest ping through the hot-plugged tap failed:\n{out}"
        assert GUEST_MAC in netns.check("ip", "neigh", "show", GUEST_IP), (
            "the reply came from the guest's NIC"
        )
        assert await guest_ping(console, HOST_IP) == "rc=0", "guest -> host ping failed"

        with pytest.raises(ExecuteError, match="'hotfd' is in use by the configuration"):
            await client.execute("closefd", {"fdname": "hotfd"})
        await client.execute("device_del", {"id": "nic1"})
        await next_event(client, "DEVICE_DELETED", device="nic1")
        await client.execute("netdev_del", {"id": "net1"})
        assert tun_fds_of(engine_pid) == 0, "the engine closes the tap with its netdev"
        assert tun_fds_of(qmpvm.pid) == 1, "the tap is the connection's again, until closefd"
        await client.execute("closefd", {"fdname": "hotfd"})
        assert tun_fds_of(qmpvm.pid) == 0, "closefd closes qmpvm's copy"
        assert "NO-CARRIER" in netns.check("ip", "link", "show", TAP), (
            "nobody holds the tap any more"
        )
    finally:
        await console.close()
    await quit_and_disconnect(client)
    qmpvm.process.wait(15)

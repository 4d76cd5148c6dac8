"""qmpvm builds the machine QEMU builds from the same command line.

Each real command line of ``tests/data/cli-sample`` is started twice, with
plain QEMU and through qmpvm (which turns it into QMP commands, records them
and builds the machine with ``machine-init``), both paused; then the engine
is asked what it built (``info qtree``, ``query-pci``, ``query-block``,
``query-chardev``, ``query-cpus-fast``, ``query-memdev``) and the answers
must be equal.  A line that QEMU itself refuses on this host (KVM-only CPU
features, host devices, network disks) is skipped with QEMU's reason.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import connect, needs_qemu, quit_and_disconnect, start_qmpvm
from faithful import (
    MappedLine,
    describe,
    differences,
    explain,
    qemu_command,
    qmpvm_command,
    sample_argv,
)
from faithful import start as start_engine
from qemu.qmp import QMPClient

SAMPLES = sorted((Path(__file__).parent.parent / "data" / "cli-sample").glob("*.args"))

pytestmark = needs_qemu


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.name.removesuffix(".args") for p in SAMPLES])
async def test_qmpvm_builds_what_qemu_builds(sample: Path, tmp_path: Path) -> None:
    line = MappedLine.make(sample_argv(sample), tmp_path)
    try:
        qemu = start_engine(qemu_command(line.argv), tmp_path, "qemu", line.fds)
        try:
            expected = await describe(qemu)
        finally:
            qemu.stop()
        if isinstance(expected, str):
            pytest.skip(f"QEMU refuses this line here: {expected.splitlines()[-1][:200]}")
        ours = start_engine(qmpvm_command(line.argv), tmp_path, "qmpvm", line.fds)
        try:
            built = await describe(ours)
        finally:
            ours.stop()
        assert isinstance(built, dict), f"qmpvm refused a line QEMU accepts: {built}"
        assert list(differences(expected, built)) == [], explain(expected, built)
    finally:
        line.release()


HAND_WRITTEN = {
    "defaults-pc": "-M pc -accel tcg -m 128",
    "defaults-q35": "-M q35 -accel tcg -m 128 -vga std -drive file=/var/q0,format=raw "
    "-drive file=/var/q1,format=raw -cdrom /var/q.iso",
    "drives": "-M pc -accel tcg -nodefaults -drive file=/var/d0,format=raw,if=virtio "
    "-drive file=/var/d1,format=raw,if=ide,cache=none,media=disk,index=1 "
    "-cdrom /var/cd.iso -device lsi -drive file=/var/d2,format=raw,if=none,id=d2,werror=stop,"
    "rerror=report -device scsi-hd,drive=d2 "
    "-drive file=/var/d3,format=raw,if=floppy -hdd /var/d4 -drive file=/var/d5,if=none,id=x",
    "device-order": "-M pc -accel tcg -nodefaults -drive file=/var/o0,format=raw,if=virtio "
    '-device {"driver":"virtio-rng-pci"} -device virtio-balloon-pci '
    '-device {"driver":"virtio-rng-pci","addr":48}',
    "nics": "-M q35 -accel tcg -nic user,model=virtio-net-pci,mac=52:54:00:12:34:56 "
    "-net nic,model=e1000 -net user -netdev user,id=n1,hostfwd=tcp::0-:22 "
    "-device e1000e,netdev=n1",
    "machine-settings": "-M pc,usb=on,dump-guest-core=off -accel tcg,tb-size=32 "
    "-cpu qemu64,+ssse3,-sse4a -smp 4,sockets=2,cores=2,threads=1,maxcpus=4 "
    "-m size=256M,slots=2,maxmem=1G -object memory-backend-ram,id=ram0,size=128M "
    "-object memory-backend-ram,id=ram1,size=128M -numa node,nodeid=0,cpus=0-1,memdev=ram0 "
    "-numa node,nodeid=1,cpus=2-3,memdev=ram1 -uuid 6f8a1c2e-1b2c-4d5e-8f90-123456789abc "
    "-smbios type=1,manufacturer=qmpvm -global PIIX4_PM.disable_s3=1 -boot order=dc,menu=on "
    "-rtc base=utc,clock=vm -no-shutdown -no-reboot -name guest=vm1,debug-threads=on "
    "-msg timestamp=on -overcommit mem-lock=off -nodefaults",
    "consoles": "-M pc -accel tcg -nodefaults -serial file:/var/serial.log -serial null "
    "-parallel null -chardev ringbuf,id=rb,size=4096 -device isa-serial,chardev=rb "
    "-chardev socket,id=sock,path=/var/c.sock,server=on,wait=off "
    "-device virtio-serial-pci -device virtconsole,chardev=sock",
    "objects": "-M q35 -accel tcg -nodefaults -object iothread,id=io0 "
    "-object rng-random,id=rng0,filename=/dev/urandom -device virtio-rng-pci,rng=rng0 "
    "-object secret,id=sec0,data=letmein -object throttle-group,id=tg0,x-iops-total=100 "
    "-blockdev driver=file,node-name=f0,filename=/var/t0 "
    "-blockdev driver=throttle,node-name=t0,throttle-group=tg0,file=f0 "
    "-device virtio-blk-pci,drive=t0,iothread=io0",
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
async def test_option_families_build_what_qemu_builds(name: str, tmp_path: Path) -> None:
    argv = [*HAND_WRITTEN[name].split(), "-S", "-display", "none", "-chardev",
            "socket,id=charmonitor,fd=1729,server=on,wait=off", "-mon",
            "chardev=charmonitor,mode=control"]  # fmt: skip
    sample = tmp_path / "line.args"
    sample.write_text(shlex.join(["/usr/bin/qemu-system-x86_64", *argv]))
    await test_qmpvm_builds_what_qemu_builds(sample, tmp_path)


async def inventory(client: QMPClient) -> dict[str, object]:
    """The machine's named parts, wherever they sit (hot-plugged into a root port
    or cold-plugged on the root bus)."""
    devices = await client.execute("qom-list", {"path": "/machine/peripheral"})
    objects = await client.execute("qom-list", {"path": "/objects"})
    blocks = await client.execute("query-named-block-nodes", {"flat": True})
    chardevs = await client.execute("query-chardev")
    return {
        "devices": sorted(
            (d["name"], d["type"]) for d in devices if d["type"].startswith("child<")
        ),
        "objects": sorted(o["name"] for o in objects if o["type"].startswith("child<")),
        # an inline child's name is the engine's counter ("#block037"): not compared
        "nodes": sorted((n["node-name"].rstrip("0123456789"), n["drv"], n["file"]) for n in blocks),
        "chardevs": sorted(c["label"] for c in chardevs if c["label"] != "qmpvm-link"),
    }


async def test_a_changed_machine_exported_and_replayed_has_the_same_devices(
    tmp_path: Path,
) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    first = start_qmpvm(  # a command line adds no spare root ports unless asked, as QEMU
        tmp_path, "-M", "q35,accel=tcg", "-nodefaults", "-hotplug-ports", "2", "-S", name="first"
    )
    client = await connect(first)
    await client.execute("object-add", {"qom-type": "iothread", "id": "io1"})
    await client.execute(
        "object-add", {"qom-type": "memory-backend-ram", "id": "mem1", "size": 1 << 20}
    )
    await client.execute("chardev-add", {"id": "rb1", "backend": {"type": "ringbuf", "data": {}}})
    await client.execute(
        "blockdev-add",
        {"driver": "raw", "node-name": "disk1", "file": {"driver": "file", "filename": str(image)}},
    )
    await client.execute(
        "device_add", {"driver": "virtio-blk-pci", "id": "vd1", "drive": "disk1", "iothread": "io1"}
    )
    await client.execute("netdev_add", {"type": "user", "id": "net1"})
    await client.execute("device_add", {"driver": "virtio-net-pci", "id": "nic1", "netdev": "net1"})
    before = await inventory(client)
    export = await client.execute("config-export", {"diff": True})
    await quit_and_disconnect(client)
    assert ("vd1", "child<virtio-blk-pci>") in before["devices"]  # type: ignore[operator]

    replay = tmp_path / "export.json"
    replay.write_text(json.dumps(export))
    second = start_qmpvm(tmp_path, "--config", str(replay), "-S", "-nodefaults", name="second")
    client = await connect(second)
    after = await inventory(client)
    await quit_and_disconnect(client)
    assert after == before

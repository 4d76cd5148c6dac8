"""Opening the host files a configuration names, for one engine.

The I/O half of ``qmpvm.host.engine_files``: images go into fdsets of
qmpvm's own (one descriptor each: read-write unless read-only), the kernel and
initrd are inherited (copied into a memfd first when the engine's user could
not open the file by its ``/proc/self/fd`` name), and the FIFOs of each
console qmpvm serves are made the engine's user's.  A file the host refuses is an
EngineError naming it, with everything opened so far closed again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qmpvm.config.chardev import backend_of
from qmpvm.config.machine import as_object
from qmpvm.config.model import Config
from qmpvm.config.resource import Kind, Resource
from qmpvm.engine.process import RunAs
from qmpvm.errors import ConfigError, EngineError
from qmpvm.fds import RESERVED_FDSETS, open_nonblocking
from qmpvm.host.console_wiring import engine_chardev, served
from qmpvm.host.consoles import Console
from qmpvm.host.engine_files import HostFile, engine_config, plan

if TYPE_CHECKING:
    from qmpvm.engine.machine import EngineMachine

ENGINE_IDS = 2_100_000_000
ENGINE_ID_SPAN = 1 << 24
"""An unprivileged engine gets a uid and gid of its own from this range (no
account needs to exist), so that engines cannot reach one another."""
KVM_DEVICE = "/dev/kvm"


@dataclass(slots=True)
class EngineFiles:
    """What qmpvm opened for one engine start; closed once the engine has them."""

    config: Config  # as the engine is given it
    fdsets: dict[int, list[int]] = field(default_factory=dict)
    inherited: list[int] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # engine name -> the user's path
    run_as: RunAs | None = None
    serves_consoles: bool = False  # some of its chardevs are qmpvm's
    user_why: str | None = None  # why the engine keeps qmpvm's user
    root_why: str | None = None  # why it sees the host's file system
    consoles_dir: str | None = None  # the consoles' FIFOs, for a later takeover

    def close(self) -> None:
        for fd in [*self.inherited, *(fd for fds in self.fdsets.values() for fd in fds)]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.inherited.clear()
        self.fdsets.clear()


def open_for_engine(
    config: Config,
    consoles: Sequence[Console],
    *,
    unprivileged: bool = True,
    own_root: bool = True,
    shared: tuple[str, ...] = (),
) -> EngineFiles:
    """Open what ``config`` names for a new engine; ``unprivileged``: qmpvm may
    run it as a user of its own (it is root, and setpriv is there); ``own_root``:
    it may give it a root of its own, where it reaches ``shared`` directories
    (the first, the consoles' FIFO directory, also names its user)."""
    found = plan(config)
    opened = EngineFiles(config, consoles_dir=shared[0] if shared else None)
    try:
        images, blockers = _open_images(found.files, opened.fdsets, RESERVED_FDSETS)
        blockers = [*found.blockers, *blockers]
        paths = _fdset_names(images, RESERVED_FDSETS)
        console_args = {c.id: engine_chardev(c.args, c.fifo_stem) for c in consoles}
        opened.serves_consoles = bool(console_args)
        opened.user_why = _user_why(config, blockers, unprivileged)
        opened.root_why = _root_why(config, opened.user_why, own_root)
        if opened.user_why is None and opened.root_why is not None and console_args:
            hidden = [d for d in shared if not _reachable_by_others(d)]
            if hidden:
                opened.user_why = (
                    f"the consoles' FIFO directory {hidden[0]} is not reachable by other "
                    "users (its temporary directory is private), and the engine has no "
                    "root of its own"
                )
        private = opened.user_why is None
        engine_id = _engine_id(shared[0] if shared else "/")
        for console in consoles if private else ():
            console.give_to(engine_id, engine_id)
        for path in found.boot:
            fd = _open_boot_file(path, private=private)
            opened.inherited.append(fd)
            paths[path] = f"/proc/self/fd/{fd}"
        if private:
            opened.run_as = RunAs(
                engine_id,
                engine_id,
                groups=_engine_groups(config),
                own_root=opened.root_why is None,
                shared=shared,
            )
        opened.aliases = {name: path for path, name in paths.items()}
        opened.config = engine_config(config, paths, console_args)
    except BaseException:
        opened.close()
        raise
    return opened


def _open_images(
    files: Sequence[HostFile], into: dict[int, list[int]], first: int
) -> tuple[list[tuple[HostFile, list[int]]], list[str]]:
    """Each image once (two nodes may name one file), its descriptors also put
    in ``into`` under fdset ``first`` + its index (so that the caller closes
    them on failure); and what their headers say the engine would open itself."""
    images: list[tuple[HostFile, list[int]]] = []
    blockers: list[str] = []
    for image in files:
        if any(image.path == known.path for known, _fds in images):
            continue
        fds = into[first + len(images)] = _open_image(image)
        images.append((image, fds))
        blockers += _image_blockers(image, fds[0])
    return images, blockers


def _fdset_names(images: Sequence[tuple[HostFile, list[int]]], first: int) -> dict[str, str]:
    """Each image's path -> the fdset name the engine opens it by."""
    return {image.path: f"/dev/fdset/{first + n}" for n, (image, _fds) in enumerate(images)}


def _open_image(image: HostFile) -> list[int]:
    """One descriptor: read-write unless the image is read-only or the host
    refuses that (as QEMU's auto-read-only falls back), else read-only.  One
    only: QEMU's image locks belong to the open file, and a second one in
    the set would keep the locks of the first against the engine itself."""
    kinds = ("file", "block")
    try:
        if not image.read_only:
            try:
                return [_blocking(open_nonblocking(image.path, os.O_RDWR, kinds=kinds))]
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
        return [_blocking(open_nonblocking(image.path, os.O_RDONLY, kinds=kinds))]
    except OSError as err:
        raise EngineError(
            f"{image.what}: cannot open '{image.path}': {err.strerror or err}"
        ) from err


def _blocking(fd: int) -> int:
    """The engine's descriptor as QEMU opens it (it sets what it needs)."""
    os.set_blocking(fd, True)
    return fd


QCOW2_MAGIC, QED_MAGIC, VMDK_MAGIC = b"QFI\xfb", b"QED\x00", b"KDMV"


def _image_blockers(image: HostFile, fd: int) -> list[str]:
    """Files an image's header names, which the engine would open by name."""
    try:
        header = os.pread(fd, 104, 0)
    except OSError:
        return []
    qcow2 = header.startswith(QCOW2_MAGIC)
    if qcow2 and int.from_bytes(header[8:16], "big") != 0 and not image.backing_given:
        return [f"{image.what}: '{image.path}' names a backing file the engine opens itself"]
    version3 = qcow2 and int.from_bytes(header[4:8], "big") >= 3
    if version3 and int.from_bytes(header[72:80], "big") & 4:  # incompatible: data file
        return [f"{image.what}: '{image.path}' has an external data file the engine opens"]
    if header.startswith(QED_MAGIC) and int.from_bytes(header[56:60], "little") != 0:
        return [f"{image.what}: '{image.path}' names a backing file the engine opens itself"]
    if header.startswith(VMDK_MAGIC) or header.startswith(b"# Disk DescriptorFile"):
        return [f"{image.what}: '{image.path}' is a VMDK, whose extents the engine opens"]
    return []


def _open_boot_file(path: str, *, private: bool) -> int:
    """The kernel or initrd, inheritable; for an unprivileged engine, a copy
    in a memfd if others may not read the file (its name would not open)."""
    try:
        fd = _blocking(open_nonblocking(path, os.O_RDONLY, kinds=("file",)))
    except OSError as err:
        raise EngineError(f"boot file: cannot open '{path}': {err.strerror or err}") from err
    if not private or os.fstat(fd).st_mode & stat.S_IROTH:
        os.set_inheritable(fd, True)
        return fd
    try:
        try:
            copy = os.memfd_create(os.path.basename(path), 0)
        except OSError as err:
            raise EngineError(f"boot file '{path}': cannot copy it: {err.strerror}") from err
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            sent = os.sendfile(copy, fd, offset, size - offset)
            if sent == 0:
                break
            offset += sent
        os.lseek(copy, 0, os.SEEK_SET)
        os.set_inheritable(copy, True)
        return copy
    finally:
        os.close(fd)


def _user_why(config: Config, blockers: list[str], allowed: bool) -> str | None:
    if as_object(config.machine.get("confine")).get("user", True) is False:
        return 'machine-set {"confine": {"user": false}} lifted it'
    if not allowed:
        return "qmpvm is not root, or setpriv (util-linux) is missing, so it cannot switch user"
    if blockers:
        more = f" (and {len(blockers) - 1} more)" if len(blockers) > 1 else ""
        return f"{blockers[0]}{more}"
    return None


def _root_why(config: Config, user_why: str | None, allowed: bool) -> str | None:
    if as_object(config.machine.get("confine")).get("root", True) is False:
        return 'machine-set {"confine": {"root": false}} lifted it'
    if user_why is not None:
        return "the engine runs as qmpvm's user, and opens host paths itself"
    ptys = [r.key for r in config.of_kind(Kind.CHARDEV)
            if backend_of(r.args)[0] == "pty" and not served(config, r.args)]  # fmt: skip
    if ptys:
        return f"chardev '{ptys[0]}' is the engine's pty, whose terminal must be the host's"
    if not allowed:
        return (
            "qmpvm cannot make it one here (no mount namespace, sh, mount or chroot, "
            "or the engine is not under /usr)"
        )
    return None


def _engine_id(directory: str) -> int:
    """The uid and gid of an engine whose FIFO directory is ``directory``:
    one per directory (its inode), one directory per engine at a time."""
    return ENGINE_IDS + os.stat(directory).st_ino % ENGINE_ID_SPAN


def _reachable_by_others(directory: str) -> bool:
    """Whether every directory on the way to ``directory`` lets others through."""
    path = Path(directory).resolve()
    for each in (path, *path.parents):
        try:
            if not each.stat().st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _engine_groups(config: Config) -> tuple[int, ...]:
    """Supplementary groups the unprivileged engine needs: /dev/kvm's, for KVM."""
    if "kvm" not in str(config.machine.accel or ""):
        return ()
    try:
        return (os.stat(KVM_DEVICE).st_gid,)
    except OSError:
        return ()


async def hand_over(
    machine: EngineMachine, resource: Resource, console: Console | None
) -> Mapping[str, object]:
    """The arguments the running engine gets for an item hot-plugged: the
    files it names opened here and passed over the private link as fdsets
    (``console``: the console qmpvm serves for a chardev).  Refused if the
    engine runs unprivileged and the item needs it to open host paths itself."""
    item = Config(resources=(resource,))
    found = plan(item)
    private = machine.user_why is None
    if private and found.blockers:
        raise ConfigError(f"the engine runs unprivileged, and {found.blockers[0]}")
    opened: dict[int, list[int]] = {}
    try:
        images, blockers = _open_images(found.files, opened, 0)  # the ids come later
        if private and blockers:
            raise ConfigError(f"the engine runs unprivileged, and {blockers[0]}")
        console_args: dict[str, Mapping[str, object]] = {}
        if console is not None:
            console_args[console.id] = engine_chardev(console.args, console.fifo_stem)
            if private:
                owner = os.stat(f"/proc/{machine.pid}")
                console.give_to(owner.st_uid, owner.st_gid)
        if not opened:
            return engine_config(item, {}, console_args).resources[0].args
        known = await machine.execute("query-fdsets", {})
        used = [int(entry["fdset-id"]) for entry in known] if isinstance(known, list) else []
        first = max([RESERVED_FDSETS - 1, *used]) + 1
        for set_id, (_image, fds) in enumerate(images, start=first):
            for fd in fds:
                await machine.execute("add-fd", {"fdset-id": set_id}, fds=[fd])
    finally:
        for fd in (fd for fds in opened.values() for fd in fds):
            os.close(fd)
    paths = _fdset_names(images, first)
    machine.aliases.update({name: path for path, name in paths.items()})
    machine.save_record()
    return engine_config(item, paths, console_args).resources[0].args


async def with_output_file(
    machine: EngineMachine,
    command: str,
    arguments: Mapping[str, object],
    *,
    member: str,
    prefix: str,
    by_name: bool,
    mode: int,
) -> object:
    """Run ``command`` on the engine with the output file its ``member`` names
    (after ``prefix``) opened here (created or truncated, write-only, never
    waited for) and named as an fdset, or (``by_name``: the engine opens it
    with plain ``fopen``) as ``/proc/self/fd/N``, the file the engine user's
    while the command runs.  The fdset is removed again afterwards."""
    path = str(arguments[member]).removeprefix(prefix)
    try:
        fd = open_nonblocking(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    except OSError as err:
        raise ConfigError(f"Could not open '{path}': {err.strerror or err}") from err
    try:
        os.set_blocking(fd, True)
        known = await machine.execute("query-fdsets", {})
        used = [int(entry["fdset-id"]) for entry in known] if isinstance(known, list) else []
        set_id = max([RESERVED_FDSETS - 1, *used]) + 1
        added = await machine.execute("add-fd", {"fdset-id": set_id}, fds=[fd])
        owner = os.fstat(fd)
        if by_name:  # the engine reopens the file itself: lend it to the engine's user
            engine = os.stat(f"/proc/{machine.pid}")
            os.fchown(fd, engine.st_uid, engine.st_gid)
    except BaseException:
        os.close(fd)
        raise
    number = added.get("fd") if isinstance(added, dict) else None
    name = f"/proc/self/fd/{number}" if by_name else f"/dev/fdset/{set_id}"
    machine.aliases[name] = path
    try:
        return await machine.execute(command, {**arguments, member: prefix + name})
    finally:
        if by_name:
            with contextlib.suppress(OSError):
                os.fchown(fd, owner.st_uid, owner.st_gid)
        os.close(fd)
        machine.aliases.pop(name, None)
        with contextlib.suppress(EngineError):
            await machine.execute("remove-fd", {"fdset-id": set_id})

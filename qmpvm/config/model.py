"""The whole configuration as one immutable value, and its pure updates.

Every change returns a new ``Config`` or raises ConfigError, so a refused
change cannot have altered anything.  The invariants live here: ids unique
per kind, references resolve, nothing in use is deleted.  ``documents`` and
``from_documents`` are what the store keeps; ``export`` is what another
qmpvm replays.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from qmpvm.config import block, chardev, device, netdev
from qmpvm.config.boot import BootConfig, BootSet
from qmpvm.config.machine import MachineConfig, MachineSet
from qmpvm.config.resource import Kind, Resource
from qmpvm.errors import ConfigError, NotFoundError
from qmpvm.schema import check, to_json

_NOUNS = {
    Kind.CHARDEV: "Chardev",
    Kind.BLOCK: "Block node",
    Kind.NETDEV: "Netdev",
    Kind.DEVICE: "Device",
}

CREATE_COMMAND = {
    Kind.CHARDEV: "chardev-add",
    Kind.BLOCK: "blockdev-add",
    Kind.NETDEV: "netdev_add",
    Kind.DEVICE: "device_add",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    machine: MachineConfig = field(default_factory=MachineConfig)
    boot: BootConfig = field(default_factory=BootConfig)
    resources: tuple[Resource, ...] = ()  # in creation order
    links: Mapping[str, bool] = field(default_factory=dict)  # set_link name -> up
    next_seq: int = 1

    # -- lookups ---------------------------------------------------------

    def find(self, kind: Kind, key: str) -> Resource | None:
        for resource in self.resources:
            if resource.kind is kind and resource.key == key:
                return resource
        return None

    def of_kind(self, kind: Kind) -> list[Resource]:
        return [r for r in self.resources if r.kind is kind]

    def users_of(self, kind: Kind, key: str) -> list[Resource]:
        return [r for r in self.resources if (kind, key) in r.refs]

    # -- updates ---------------------------------------------------------

    def set_machine(self, change: MachineSet) -> Config:
        return dataclasses.replace(self, machine=self.machine.update(change))

    def set_boot(self, change: BootSet) -> Config:
        return dataclasses.replace(self, boot=self.boot.update(change))

    def add(self, resource: Resource) -> Config:
        """Add ``resource``, made with sequence number ``self.next_seq``."""
        if self.find(resource.kind, resource.key) is not None:
            raise ConfigError(f"{_NOUNS[resource.kind]} '{resource.key}' already exists")
        for kind, key in resource.refs:
            if self.find(kind, key) is None:
                raise NotFoundError(f"{_NOUNS[kind]} '{key}' not found")
        return dataclasses.replace(
            self, resources=(*self.resources, resource), next_seq=self.next_seq + 1
        )

    def remove(self, kind: Kind, key: str) -> Config:
        if self.find(kind, key) is None:
            raise NotFoundError(f"{_NOUNS[kind]} '{key}' not found")
        users = self.users_of(kind, key)
        if users:
            user = users[0]
            raise ConfigError(
                f"{_NOUNS[kind]} '{key}' is in use by {_NOUNS[user.kind].lower()} '{user.key}'"
            )
        kept = tuple(r for r in self.resources if not (r.kind is kind and r.key == key))
        links = {name: up for name, up in self.links.items() if name != key}
        return dataclasses.replace(self, resources=kept, links=links)

    def set_link(self, name: str, up: bool) -> Config:
        if self.find(Kind.NETDEV, name) is None and self.find(Kind.DEVICE, name) is None:
            raise NotFoundError(f"Device '{name}' not found")
        links = dict(self.links)
        if up:
            links.pop(name, None)
        else:
            links[name] = False
        return dataclasses.replace(self, links=links)

    # -- views -----------------------------------------------------------

    def describe(self) -> dict[str, object]:
        """The configuration part of ``query-machine``."""
        machine = to_json(self.machine)
        machine.setdefault("accel", None)
        return {
            "machine": machine,
            "boot": to_json(self.boot),
            "chardevs": [dict(r.args) for r in self.of_kind(Kind.CHARDEV)],
            "block-nodes": [dict(r.args) for r in self.of_kind(Kind.BLOCK)],
            "netdevs": [dict(r.args) for r in self.of_kind(Kind.NETDEV)],
            "devices": [dict(r.args) for r in self.of_kind(Kind.DEVICE)],
            "links": [{"name": n, "up": up} for n, up in sorted(self.links.items())],
        }

    def export(self, *, diff: bool = True) -> list[dict[str, object]]:
        """QMP commands that rebuild this configuration on a fresh qmpvm."""
        commands: list[dict[str, object]] = []
        machine = to_json(self.machine)
        if diff:
            defaults = to_json(MachineConfig())
            machine = {k: v for k, v in machine.items() if defaults.get(k) != v}
        if machine:
            commands.append({"execute": "machine-set", "arguments": machine})
        if self.boot.kernel is not None:
            commands.append({"execute": "boot-set", "arguments": to_json(self.boot)})
        for resource in self.resources:
            commands.append(
                {"execute": CREATE_COMMAND[resource.kind], "arguments": dict(resource.args)}
            )
        for name, up in sorted(self.links.items()):
            commands.append({"execute": "set_link", "arguments": {"name": name, "up": up}})
        return commands

    # -- persistence -----------------------------------------------------

    def documents(self) -> dict[str, str]:
        """The store's rows: one JSON document per item, so a change rewrites
        only what it touched."""
        docs = {
            "machine": _dump(to_json(self.machine)),
            "boot": _dump(to_json(self.boot)),
            "links": _dump(dict(self.links)),
            "next-seq": _dump(self.next_seq),
        }
        for r in self.resources:
            docs[f"{r.kind}/{r.key}"] = _dump({"seq": r.seq, "args": r.args})
        return docs

    @classmethod
    def from_documents(cls, docs: Mapping[str, str]) -> Config:
        """Rebuild from stored rows through the same checks the API applies."""
        config = cls()
        if "machine" in docs:
            config = config.set_machine(check(MachineSet, json.loads(docs["machine"])))
        boot = json.loads(docs.get("boot", "{}"))
        if boot.get("kernel"):
            config = config.set_boot(check(BootSet, boot))
        stored = []
        for key, text in docs.items():
            kind, _, _name = key.partition("/")
            if _name:
                doc = json.loads(text)
                stored.append((int(doc["seq"]), Kind(kind), doc["args"]))
        for seq, kind, args in sorted(stored, key=lambda item: item[0]):
            config = dataclasses.replace(config, next_seq=seq)
            config = config.add(make_from_args(kind, args, seq))
        links = json.loads(docs.get("links", "{}"))
        next_seq = max(json.loads(docs.get("next-seq", "1")), config.next_seq)
        return dataclasses.replace(config, links=links, next_seq=next_seq)


def make_from_args(kind: Kind, args: Mapping[str, object], seq: int) -> Resource:
    """A resource from QMP arguments, checked as the API checks them."""
    if kind is Kind.CHARDEV:
        return chardev.make(check(chardev.ChardevAdd, args), seq)
    if kind is Kind.BLOCK:
        return block.make(check(block.BlockdevOptions, args), seq)
    if kind is Kind.NETDEV:
        return netdev.make(check(netdev.Netdev, args), seq)
    return device.make(check(device.DeviceAdd, args), seq)


def _dump(value: object) -> str:
    return json.dumps(value, sort_keys=True)

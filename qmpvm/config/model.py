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
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from qmpvm.config import kinds
from qmpvm.config.boot import BootConfig, BootSet
from qmpvm.config.kinds import KINDS
from qmpvm.config.machine import MachineConfig
from qmpvm.config.resource import Kind, Resource
from qmpvm.errors import ConfigError, NotFoundError, QmpvmError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    machine: MachineConfig = field(default_factory=MachineConfig)
    boot: BootConfig = field(default_factory=BootConfig)
    resources: tuple[Resource, ...] = ()  # in creation order
    links: Mapping[str, bool] = field(default_factory=dict)  # set_link name -> up
    next_seq: int = 1
    set_aside: Mapping[str, str] = field(default_factory=dict)  # stored rows that did not load

    # -- lookups ---------------------------------------------------------

    def find(self, kind: Kind, key: str) -> Resource | None:
        for resource in self.resources:
            if resource.kind is kind and resource.key == key:
                return resource
        return None

    def of_kind(self, kind: Kind) -> list[Resource]:
        return [r for r in self.resources if r.kind is kind]

    def users_of(self, kind: Kind, key: str) -> list[Resource]:
        return [r for r in self.resources if any(kind in ks and k == key for ks, k in r.refs)]

    # -- updates ---------------------------------------------------------

    def set_machine(self, change: Mapping[str, object]) -> Config:
        return dataclasses.replace(self, machine=self.machine.update(change))

    def set_boot(self, change: BootSet) -> Config:
        return dataclasses.replace(self, boot=self.boot.update(change))

    def add(self, resource: Resource) -> Config:
        """Add ``resource``, made with sequence number ``self.next_seq``."""
        spec = KINDS[resource.kind]
        if self.find(resource.kind, resource.key) is not None:
            raise ConfigError(f"{spec.noun} '{resource.key}' already exists")
        for allowed, key in resource.refs:
            if not any(self.find(kind, key) for kind in allowed):
                raise NotFoundError(f"{KINDS[allowed[0]].noun} '{key}' not found")
        return dataclasses.replace(
            self, resources=(*self.resources, resource), next_seq=self.next_seq + 1
        )

    def remove(self, kind: Kind, key: str) -> Config:
        spec = KINDS[kind]
        if self.find(kind, key) is None:
            raise NotFoundError(f"{spec.noun} '{key}' not found")
        users = self.users_of(kind, key)
        if users:
            user = users[0]
            raise ConfigError(
                f"{spec.noun} '{key}' is in use by {KINDS[user.kind].noun.lower()} '{user.key}'"
            )
        settings = self.machine.values
        if any(kind in ks and name == key for ks, name in kinds.setting_references(settings)):
            raise ConfigError(f"{spec.noun} '{key}' is in use by the machine's settings")
        kept = tuple(r for r in self.resources if not (r.kind is kind and r.key == key))
        links = dict(self.links)
        if kind in (Kind.NETDEV, Kind.DEVICE):  # set_link names one of these
            links.pop(key, None)
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
        machine = self.machine.describe()
        machine.setdefault("accel", None)
        out: dict[str, object] = {"machine": machine, "boot": self.boot.describe()}
        for kind, spec in KINDS.items():
            out[_plural(spec.noun)] = [dict(r.args) for r in self.of_kind(kind)]
        out["links"] = [{"name": n, "up": up} for n, up in sorted(self.links.items())]
        if self.set_aside:
            out["set-aside"] = sorted(self.set_aside)
        return out

    def export(self, *, diff: bool = True) -> list[dict[str, object]]:
        """QMP commands that rebuild this configuration on a fresh qmpvm."""
        commands: list[dict[str, object]] = []
        machine = dict(self.machine.values) if diff else self.machine.describe()
        if machine:
            commands.append({"execute": "machine-set", "arguments": machine})
        if self.boot.kernel is not None:
            commands.append({"execute": "boot-set", "arguments": self.boot.describe()})
        for resource in self.resources:
            commands.append({"execute": KINDS[resource.kind].add, "arguments": dict(resource.args)})
        for name, up in sorted(self.links.items()):
            commands.append({"execute": "set_link", "arguments": {"name": name, "up": up}})
        return commands

    @classmethod
    def from_commands(cls, commands: Sequence[object]) -> Config:
        """The configuration ``export`` wrote, rebuilt in one piece (a snapshot's,
        replaced in one transaction); the first command that does not apply
        raises, naming it."""
        config = cls()
        adds = {spec.add: kind for kind, spec in KINDS.items()}
        for number, command in enumerate(commands, 1):
            if not isinstance(command, Mapping) or not isinstance(command.get("execute"), str):
                raise ConfigError(f"command {number} is not a QMP command")
            name, args = command["execute"], command.get("arguments", {})
            try:
                if not isinstance(args, Mapping):
                    raise ConfigError("its arguments are not an object")
                if name == "machine-set":
                    config = config.set_machine(args)
                elif name == "boot-set":
                    config = config.set_boot(BootSet(**args))
                elif name == "set_link":
                    config = config.set_link(str(args["name"]), bool(args["up"]))
                elif name in adds:
                    config = config.add(kinds.make(adds[name], args, config.next_seq))
                else:
                    raise ConfigError("it is not a configuration command")
            except _UNLOADABLE as err:
                raise ConfigError(f"command {number} ({name}) does not apply: {_why(err)}") from err
        return config

    # -- persistence -----------------------------------------------------

    def documents(self) -> dict[str, str]:
        """The store's rows: one JSON document per item, so a change rewrites
        only what it touched."""
        docs = {
            "machine": _dump(dict(self.machine.values)),
            "boot": _dump(self.boot.describe()),
            "links": _dump(dict(self.links)),
            "next-seq": _dump(self.next_seq),
        }
        for r in self.resources:
            docs[f"{r.kind}/{r.key}"] = _dump({"seq": r.seq, "args": r.args})
        docs.update(self.set_aside)
        return docs

    @classmethod
    def from_documents(cls, docs: Mapping[str, str]) -> Config:
        """Rebuild from stored rows, keeping the invariants the API keeps (names,
        references, settings' shapes); the engine's schema checked them when
        they were issued.

        A row that no longer loads (its reference is gone, it was written by
        a qmpvm that accepted what this one refuses) is logged and set aside,
        kept in the store under its key but out of the machine: loading a
        store never fails as a whole.
        """
        config = cls()
        aside: dict[str, str] = {}
        for key in ("machine", "boot"):
            if key not in docs:
                continue
            try:
                value = json.loads(docs[key])
                if key == "machine":
                    config = config.set_machine(value)
                elif value.get("kernel"):
                    config = config.set_boot(BootSet(**value))
            except _UNLOADABLE as err:
                log.warning("stored %s does not load (%s); set aside", key, _why(err))
                aside[key + ".set-aside"] = docs[key]
        stored = []
        for key, text in docs.items():
            kind_name, _, name = key.partition("/")
            if key in _SETTINGS_ROWS:
                continue
            if not name or kind_name not in Kind.__members__.values():
                log.warning("stored %s is of no kind qmpvm knows; set aside", key)
                aside[key] = text  # kept: a newer qmpvm may have written it
                continue
            try:
                doc = json.loads(text)
                stored.append((int(doc["seq"]), Kind(kind_name), doc["args"], key))
            except _UNLOADABLE as err:
                log.warning("stored %s does not load (%s); set aside", key, _why(err))
                aside[key] = text
        for seq, kind, args, key in sorted(stored, key=lambda item: item[0]):
            try:
                resource = kinds.make(kind, args, seq)
                config = dataclasses.replace(config, next_seq=seq).add(resource)
            except _UNLOADABLE as err:
                log.warning("stored %s does not load (%s); set aside", key, _why(err))
                aside[key] = docs[key]
        try:
            links = {str(k): bool(v) for k, v in json.loads(docs.get("links", "{}")).items()}
            next_seq = max(int(json.loads(docs.get("next-seq", "1"))), config.next_seq)
        except _UNLOADABLE:
            links, next_seq = {}, config.next_seq
        return dataclasses.replace(config, links=links, next_seq=next_seq, set_aside=aside)


_SETTINGS_ROWS = frozenset({"machine", "boot", "links", "next-seq"})
_UNLOADABLE = (
    QmpvmError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    OverflowError,
    RecursionError,
)
"""What a stored row that does not load raises: 1e999 where a number goes,
nesting deeper than the decoder recurses, a field of the wrong type..."""


def _why(err: Exception) -> str:
    return err.desc if isinstance(err, QmpvmError) else f"{type(err).__name__}: {err}"


def _plural(noun: str) -> str:
    return noun.lower().replace(" ", "-") + "s"


def _dump(value: object) -> str:
    return json.dumps(value, sort_keys=True)

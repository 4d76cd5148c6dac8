"""The command registry and the dispatcher: request -> checked call -> reply.

Each command is declared once (name, arguments, phases) with
``@registry.command``: an engine command's arguments are the engine's
(``ENGINE_ARGS``, checked by the engine's schema), qmpvm's own are declared in
``qmpvm.qapi.check.declare``'s form and checked by the same generic checker.
The dispatcher refuses, before any side effect, commands that do not exist,
are not allowed in the current phase, or whose arguments fail the schema;
relays every other engine command to the machine (but ``UNRECORDED``); and is
the one place where errors become QMP error replies.  Command code never sees
JSON framing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from qmpvm.config.programs import programs
from qmpvm.errors import CommandNotFoundError, ErrorClass, PhaseError, QmpvmError, error_reply
from qmpvm.monitor.protocol import Request

if TYPE_CHECKING:
    from qmpvm.monitor.client import Client
    from qmpvm.qapi.check import Schema, TypeDecl
    from qmpvm.vmm import Vmm

log = logging.getLogger(__name__)


class Phase(StrEnum):
    NO_MACHINE = "no-machine"
    MACHINE_READY = "machine-ready"


ALWAYS = frozenset(Phase)
BEFORE_INIT = frozenset({Phase.NO_MACHINE})
AFTER_INIT = frozenset({Phase.MACHINE_READY})


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """What a command handler receives."""

    vmm: Vmm
    client: Client
    args: Any  # the checked arguments (a dict)
    name: str


Handler = Callable[[Call], Awaitable[object]]
EventHook = Callable[["Vmm", dict[str, object]], None]


ENGINE_ARGS = "engine"
"""A command's ``args`` when its arguments are the engine's command's: the
engine's own schema checks them, and the handler receives the checked dict."""

_GRAPH = "it changes the block graph or a disk's medium, which the store records"
UNRECORDED: Mapping[str, str] = {
    **dict.fromkeys(
        ("chardev-change", "x-blockdev-change", "blockdev-reopen", "blockdev-snapshot-sync",
         "blockdev-snapshot", "blockdev-snapshot-internal-sync", "blockdev-mirror",
         "drive-mirror", "drive-backup", "blockdev-backup", "block-commit", "block-stream",
         "transaction", "blockdev-change-medium", "eject", "blockdev-insert-medium",
         "blockdev-remove-medium", "blockdev-open-tray", "blockdev-close-tray",
         "block_set_io_throttle", "block-latency-histogram-set", "x-blockdev-set-iothread",
         "x-blockdev-amend", "blockdev-create", "blockdev-amend"),
        _GRAPH,
    ),
    "watchdog-set-action": "the action is a machine setting: use set-action",
}  # fmt: skip
"""Engine commands that would change what the store records behind its back,
and why; every other engine command qmpvm does not declare is relayed to the
machine (queries, run state, migration, qom-get/qom-set, NBD exports, ...)."""


Declaration = Mapping[str, "TypeDecl"]
"""qmpvm's own command's arguments, in ``qmpvm.qapi.check.declare``'s form
(``{"kernel": "str", "*initrd": "str"}``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandSpec:
    name: str
    handler: Handler
    args: Declaration | str | None = None  # ENGINE_ARGS: the engine's schema checks them
    extra_members: bool = False  # QEMU's 'gen': false: members beyond the declared pass
    phases: frozenset[Phase] = ALWAYS


@dataclass(slots=True)
class Registry:
    commands: dict[str, CommandSpec] = field(default_factory=dict)
    events: dict[str, Declaration] = field(default_factory=dict)
    hooks: dict[str, list[EventHook]] = field(default_factory=dict)
    _schema: list[dict[str, object]] | None = field(default=None, init=False, repr=False)
    _checker: Schema | None = field(default=None, init=False, repr=False)

    def command(
        self,
        name: str,
        *,
        args: Declaration | str | None = None,
        extra_members: bool = False,
        phases: frozenset[Phase] = ALWAYS,
        aliases: Iterable[str] = (),
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            for each in (name, *aliases):
                if each in self.commands:
                    raise ValueError(f"command {each} declared twice")
                self.commands[each] = CommandSpec(
                    name=each,
                    handler=handler,
                    args=args,
                    extra_members=extra_members,
                    phases=phases,
                )
            return handler

        return register

    def event(self, name: str, data: Declaration | None = None) -> None:
        self.events[name] = data or {}

    def hook(self, event: str, hook: EventHook) -> None:
        """Run ``hook`` on every engine event ``event``, before clients hear it."""
        self.hooks.setdefault(event, []).append(hook)

    def schema(self) -> list[dict[str, object]]:
        """qmpvm's own commands and events as SchemaInfo entries (``declare``),
        for ``query-qmp-schema`` to merge into the engine's. Built once."""
        if self._schema is None:
            from qmpvm.qapi.check import CommandDecl, declare

            own = {
                name: CommandDecl(args=spec.args if isinstance(spec.args, Mapping) else {},
                                  ret="any")
                for name, spec in self.commands.items()
                if spec.args != ENGINE_ARGS
            }  # fmt: skip
            # an event is declared as a command with its data as arguments, then renamed
            events = {f"event {name}": CommandDecl(args=data) for name, data in self.events.items()}
            entries = declare({**own, **events})
            for entry in entries:
                name = str(entry["name"])
                if name.startswith("event "):
                    entry.pop("ret-type")
                    entry.update({"name": name.removeprefix("event "), "meta-type": "event"})
            self._schema = entries
        return self._schema

    def checker(self) -> Schema:
        """The one generic checker, over qmpvm's own declarations."""
        if self._checker is None:
            from qmpvm.qapi.check import Schema

            self._checker = Schema(self.schema())
        return self._checker


def phase_refusal(name: str, phase: Phase) -> str:
    if phase is Phase.NO_MACHINE:
        return f"The command '{name}' needs a machine: run machine-init first (phase is '{phase}')"
    return f"The command '{name}' is only allowed before machine-init (phase is '{phase}')"


class Dispatcher:
    def __init__(self, registry: Registry, vmm: Vmm) -> None:
        self.registry = registry
        self.vmm = vmm

    async def dispatch(self, request: Request, client: Client) -> dict[str, object]:
        try:
            return request.reply(await self._run(request, client))
        except QmpvmError as err:
            error = error_reply(err)
            return request.fail(str(error["class"]), str(error["desc"]))
        except Exception:
            log.exception("command %s failed unexpectedly", request.name)
            return request.fail(
                ErrorClass.GENERIC, f"internal error in '{request.name}'; see the log"
            )

    async def _run(self, request: Request, client: Client) -> object:
        spec = self.registry.commands.get(request.name)
        if spec is None:
            return await self._relay(request.name, request.arguments)
        phase = self.vmm.phase
        if phase not in spec.phases:
            raise PhaseError(phase_refusal(spec.name, phase))
        args: Any = await self._checked(spec, request.arguments)
        self._refuse_host_programs(request.name, args)
        return await spec.handler(Call(vmm=self.vmm, client=client, args=args, name=request.name))

    async def _checked(self, spec: CommandSpec, arguments: Mapping[str, object]) -> Any:
        """The arguments, checked by the engine's schema or qmpvm's declarations."""
        if spec.args is None:
            if arguments:
                raise QmpvmError(f"Parameter '{next(iter(arguments))}' is unexpected")
            return {}
        if spec.args == ENGINE_ARGS:
            schema = await self.vmm.engine_schema()
            if schema is None:
                raise QmpvmError(
                    f"The engine's schema is unavailable (is the engine installed?), so "
                    f"'{spec.name}' cannot be checked"
                )
        else:
            schema = self.registry.checker()
        given = dict(arguments)
        if spec.extra_members:  # only what is declared is checked; the rest passes
            arg_type = schema.arg_type(spec.name)
            members = schema.members(arg_type) if arg_type else None
            declared = {m.name for m in members or ()}
            schema.check_command(spec.name, {k: v for k, v in given.items() if k in declared})
            return given
        return schema.check_command(spec.name, given)

    async def _relay(self, name: str, arguments: Mapping[str, object]) -> object:
        """An engine command qmpvm does not declare: checked, then the machine answers."""
        schema = await self.vmm.engine_schema()
        if schema is None or not schema.has_command(name):
            raise CommandNotFoundError(f"The command {name} has not been found")
        if name in UNRECORDED:
            raise QmpvmError(
                f"The command '{name}' is not relayed to the engine: {UNRECORDED[name]}"
            )
        if self.vmm.machine is None:
            raise PhaseError(phase_refusal(name, Phase.NO_MACHINE))
        args = schema.check_command(name, dict(arguments))
        self._refuse_host_programs(name, args)
        return await self.vmm.forward(name, args)

    def _refuse_host_programs(self, name: str, args: Mapping[str, Any]) -> None:
        if self.vmm.settings.allow_host_programs:
            return
        found = programs(name, args)
        if found:
            raise QmpvmError(
                f"'{name}' would have the engine run {found[0]} on the host; qmpvm runs "
                "host programs only when started with --allow-host-programs"
            )

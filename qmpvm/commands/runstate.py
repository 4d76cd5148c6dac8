"""HMP through QMP, and the events qmpvm declares.

Run-state commands (``cont``, ``stop``, ...) need nothing of qmpvm: the
dispatcher relays them, checked against the engine's schema.
"""

from __future__ import annotations

import re
import typing

from qmpvm.commands.common import REGISTRY
from qmpvm.commands.consoles import query_chardev
from qmpvm.commands.session import quit_
from qmpvm.config.programs import programs
from qmpvm.errors import ConfigError
from qmpvm.monitor.dispatch import AFTER_INIT, ENGINE_ARGS, Call

HMP_ALLOWED = frozenset(
    {
        # read-only, or the run state and the guest's inputs
        "info", "help", "?", "cont", "c", "stop", "s", "system_reset", "system_powerdown",
        "system_wakeup", "nmi", "sendkey", "mouse_move", "mouse_button", "mouse_set", "x",
        "xp", "print", "p", "i", "o", "sum", "gpa2hpa", "gpa2hva", "gva2gpa", "qom-get",
        "qom-list", "chardev-send-break", "mce", "cpu",
        "quit", "q", "log", "trace-event", "sync-profile", "singlestep", "pcie_aer_inject_error",
        # what the same QMP command does, relayed
        "balloon", "announce_self", "block_resize", "calc_dirty_rate", "set_vcpu_dirty_limit",
        "cancel_vcpu_dirty_limit", "migrate", "migrate_cancel", "migrate_continue",
        "migrate_pause", "migrate_recover", "migrate_set_capability", "migrate_set_parameter",
        "migrate_start_postcopy", "client_migrate_info", "set_password", "expire_password",
        "screendump", "memsave", "pmemsave", "dump-guest-memory", "block_job_cancel",
        "block_job_complete", "block_job_pause", "block_job_resume", "block_job_set_speed",
        "nbd_server_start", "nbd_server_add", "nbd_server_remove", "nbd_server_stop",
    }
)  # fmt: skip
"""HMP commands relayed; every other one (``device_add``, ``object_add``,
``qom-set``, ``hostfwd_add``, ``savevm``, ``gdbserver``, ``logfile``, ...)
would change the configuration behind the store's back or open host files
and programs no QMP command qmpvm relays would; ``ringbuf_read``/``_write``
would reach the engine, where qmpvm's ringbufs are not (QMP's commands do)."""


def hmp_command_name(line: str) -> str:
    """The command name as QEMU's HMP reads it: after blanks, up to a blank or
    a ``/`` (``x/4x 0``, and ``drive_add/ ...`` too)."""
    return re.split(r"[\s/]", line.lstrip(), maxsplit=1)[0]


@REGISTRY.command("human-monitor-command", args=ENGINE_ARGS, phases=AFTER_INIT)
async def human_monitor_command(call: Call) -> object:
    """Forwarded if ``HMP_ALLOWED``; a ``migrate`` runs no shell command unless allowed."""
    line = str(call.args["command-line"])
    name = hmp_command_name(line)
    if name not in HMP_ALLOWED:
        raise ConfigError(
            f"HMP command '{name}' is not relayed: it would change the configuration "
            "without qmpvm recording it, or reach the host; use the QMP command instead"
        )
    if name == "migrate" and not call.vmm.settings.allow_host_programs:
        uri = next((word for word in line.split()[1:] if not word.startswith("-")), "")
        if programs("migrate", {"uri": uri}):
            raise ConfigError(
                "HMP 'migrate' to an exec: URI would run a shell command on the host; "
                "qmpvm runs host programs only when started with --allow-host-programs"
            )
    if name in ("quit", "q"):  # QEMU's HMP quit ends QEMU: here qmpvm, as QMP's quit
        await quit_(call)
        return ""
    if line.split() == ["info", "chardev"]:  # what the user asked for, not the engine's pipes
        found = typing.cast(list[dict[str, object]], await query_chardev(call))
        return "".join(f"{c['label']}: filename={c['filename']}\r\n" for c in found)
    return await call.vmm.forward("human-monitor-command", call.args)


for _event in ("STOP", "RESUME", "RESET", "SHUTDOWN", "POWERDOWN", "DEVICE_DELETED"):
    REGISTRY.event(_event)  # the engine's: its schema declares their data
REGISTRY.event(
    "ENGINE_EXIT",
    {"status": "str", "exit-code": "any", "signal": "any", "reason": "str", "stderr": "str"},
)

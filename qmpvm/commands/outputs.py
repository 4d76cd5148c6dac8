"""Commands that have the engine write a host file: qmpvm opens it.

``pmemsave``, ``memsave``, ``screendump`` and ``dump-guest-memory`` to a
``file:`` name a path the engine would create itself, which a confined
engine (a user and a root of its own) cannot.  qmpvm opens the file, as the
engine would (created or truncated, write-only), hands it over as an fdset
and names that instead; the engine's answer and errors name the path again.
QEMU 7.2 writes ``memsave`` and ``pmemsave`` with ``fopen``, which knows no
fdsets: those get the descriptor's ``/proc/self/fd/N`` name, the file lent to
the engine's user while it writes.
"""

from __future__ import annotations

from collections.abc import Mapping

from qmpvm.commands.common import REGISTRY
from qmpvm.monitor.dispatch import AFTER_INIT, ENGINE_ARGS, Call

OUTPUT_MEMBERS: Mapping[str, tuple[str, str, bool, int]] = {
    "pmemsave": ("filename", "", True, 0o666),
    "memsave": ("filename", "", True, 0o666),
    "screendump": ("filename", "", False, 0o666),
    "dump-guest-memory": ("protocol", "file:", False, 0o400),
}
"""Command -> the member naming its output file, the prefix before the path,
whether the engine opens it by plain ``fopen`` (no fdsets), and the mode QEMU
creates it with (less the umask)."""


async def write_through_qmpvm(call: Call) -> object:
    from qmpvm.host.opening import with_output_file

    member, prefix, by_name, mode = OUTPUT_MEMBERS[call.name]
    given = str(call.args[member])
    if not given.startswith(prefix):  # dump-guest-memory to fd:NAME: nothing to open
        return await call.vmm.forward(call.name, call.args)
    return await with_output_file(
        call.vmm.engine(), call.name, call.args,
        member=member, prefix=prefix, by_name=by_name, mode=mode,
    )  # fmt: skip


for _name in OUTPUT_MEMBERS:
    REGISTRY.command(_name, args=ENGINE_ARGS, phases=AFTER_INIT)(write_through_qmpvm)

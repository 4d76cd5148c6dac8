"""Hostile input on parallel connections while a well-behaved client checks every answer."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

from conftest import QmpvmProcess, connect, needs_qemu, start_qmpvm
from qemu.qmp import ExecuteError, QMPClient
from stress_support import (
    BASELINE,
    SEED,
    Findings,
    Hostile,
    RawClient,
    fd_targets,
    hostile_client,
    proc_status,
    server_side_connections,
    wait_until,
    wrong_type_cases,
)

pytestmark = needs_qemu  # the engine's schema checks most commands

HOSTILE_CONNECTIONS = 12
UNITS_PER_CONNECTION = 250
NEVER_NEGOTIATE = {3, 7, 11}
"""These connections send everything before ``qmp_capabilities``."""
RSS_BOUND_KIB = 192 << 10
"""Generous: the issue's goal (64 MiB) is the benchmark's to measure."""

STABLE_QUERIES = (
    "query-status", "query-version", "query-name", "query-chardev", "query-named-block-nodes",
    "query-machine", "query-fdsets", "query-kvm",
)  # fmt: skip


def server_log_problems(proc: QmpvmProcess) -> list[str]:
    log = proc.stderr()
    return [
        marker
        for marker in ("Traceback", "failed unexpectedly", "internal error", "is not JSON")
        if marker in log
    ]


async def check_forever(
    client: QMPClient,
    expected: dict[str, object],
    export: list[object],
    findings: Findings,
    stop: asyncio.Event,
) -> int:
    """Ask, and compare with what was answered before any hostile byte, until
    ``stop``; now and then add an item of our own and take it away again."""
    rng = random.Random(findings.seed)
    checks = 0
    own = {"id": "checker-chr", "backend": {"type": "null", "data": {}}}
    while not stop.is_set():
        checks += 1
        if checks % 10 == 0:
            await client.execute("chardev-add", own)
            got = await client.execute("config-export")
            with_own = [*export, {"execute": "chardev-add", "arguments": own}]
            if got != with_own:
                findings.add("config-export wrong", f"with the checker's item: {got!r}")
            await client.execute("chardev-remove", {"id": "checker-chr"})
            continue
        name = rng.choice([*expected, "config-export"])
        try:
            got = await client.execute(name)
        except ExecuteError as err:
            findings.add("checker refused", f"{name}: {err}")
            continue
        want: object = export if name == "config-export" else expected[name]
        if got != want:
            findings.add("checker got a wrong answer", f"{name}: {got!r} instead of {want!r}")
    return checks


async def test_hostile_input_on_parallel_connections(tmp_path: Path) -> None:
    proc = start_qmpvm(tmp_path)
    checker = await connect(proc, "checker")
    for command, arguments in BASELINE:
        await checker.execute(command, arguments)
    export = await checker.execute("config-export")
    assert isinstance(export, list)
    expected = {name: await checker.execute(name) for name in STABLE_QUERIES}
    schema = await checker.execute("query-qmp-schema")
    assert isinstance(schema, list)
    cases = wrong_type_cases(schema)
    assert len(cases) > 200, "the engine's schema gives the wrong-type cases"
    fds_before = len(fd_targets(proc.pid))
    findings = Findings(SEED)
    rng = random.Random(SEED)
    floods = [
        Hostile(random.Random(rng.random()), cases, tag=f"h{i}").units(UNITS_PER_CONNECTION)
        for i in range(HOSTILE_CONNECTIONS)
    ]
    stop = asyncio.Event()
    checking = asyncio.create_task(check_forever(checker, expected, export, findings, stop))
    results = await asyncio.gather(*(
        hostile_client(
            str(proc.socket), units, findings, tag=f"h{i}",
            negotiate=i not in NEVER_NEGOTIATE, split=random.Random(SEED + i),
        )
        for i, units in enumerate(floods)
    ))  # fmt: skip
    stop.set()
    checks = await checking

    assert proc.process.poll() is None, f"seed {SEED}: qmpvm died:\n{proc.stderr()[-3000:]}"
    assert await checker.execute("config-export") == export, f"seed {SEED}: config changed"
    for name, want in expected.items():
        assert await checker.execute(name) == want, f"seed {SEED}: {name} changed"
    unfinished = [i for i, result in enumerate(results) if not result.finished]
    assert not unfinished, (
        f"seed {SEED}: connections {unfinished} were not served to the end\n{findings.report()}"
    )
    assert checks > 1, f"seed {SEED}: the checker was not answered during the flood"
    assert not server_log_problems(proc), (
        f"seed {SEED}: {server_log_problems(proc)} in qmpvm's log:\n{proc.stderr()[-3000:]}"
    )
    await wait_until(
        lambda: server_side_connections(proc.pid) == 1,  # the checker's
        f"seed {SEED}: qmpvm ended every hostile session",
    )
    await wait_until(
        lambda: len(fd_targets(proc.pid)) <= fds_before,
        f"seed {SEED}: qmpvm's descriptors back to {fds_before}: {fd_targets(proc.pid)}",
    )
    status = proc_status(proc.pid)
    print(f"after the flood: VmRSS {status['VmRSS']} KiB, VmHWM {status['VmHWM']} KiB, "
          f"{sum(r.units for r in results)} units, {sum(r.bytes_sent for r in results)} bytes, "
          f"{checks} checks")  # fmt: skip
    assert status["VmHWM"] < RSS_BOUND_KIB, f"seed {SEED}: peak RSS {status['VmHWM']} KiB"
    await checker.disconnect()
    assert not findings, findings.report()


def _parse_errors(
    client: RawClient, messages: list[bytes], desc: Callable[[str], bool]
) -> list[str]:
    """What is wrong with the answers to ``messages``, each of which should be
    one GenericError whose description ``desc`` accepts, with no id."""
    wrong = []
    for message in messages:
        replies = client.replies_until_sync(message)
        error = replies[0].get("error") if len(replies) == 1 else None
        if (
            not isinstance(error, dict)
            or error.get("class") != "GenericError"
            or not desc(str(error.get("desc")))
            or "id" in replies[0]
        ):
            wrong.append(f"{message.decode(errors='replace')} -> {replies}")
    return wrong


DUPLICATES = [
    b'{"execute": "query-name", "id": 1, "id": 2}',
    b'{"execute": "query-status", "execute": "query-name"}',
    b'{"execute": "query-name", "arguments": {}, "arguments": {}}',
    b'{"execute": "machine-set", "arguments": {"name": "first", "name": "second"}}',
    b'{"execute": "chardev-add", "arguments": {"id": "dup", "id": "dup2",'
    b' "backend": {"type": "null", "data": {}}}}',
    b'{"execute": "query-name", "id": {"k": 1, "k": 1}}',
    b"{'execute': 'query-name', 'id': 1, \"id\": 2}",
]


def test_duplicate_keys_are_refused_like_qemu(tmp_path: Path) -> None:
    """QEMU 7.2: ``{"error": {"class": "GenericError", "desc": "JSON parse error,
    duplicate key"}}``, no id (the input was not parsed), nothing done."""
    proc = start_qmpvm(tmp_path)
    client = RawClient(proc.socket)
    client.negotiate()
    before = client.call("config-export")
    wrong = _parse_errors(client, DUPLICATES, "JSON parse error, duplicate key".__eq__)
    assert not wrong, "\n".join(wrong)
    assert client.call("config-export") == before
    client.close()


SURROGATES = [
    b'{"execute": "query-name", "id": "\\ud800"}',
    b'{"execute": "query-name", "id": {"\\udfff": 1}}',
    b'{"execute": "machine-set", "arguments": {"name": "vm\\udc00"}}',
    b'{"execute": "chardev-add", "arguments": {"id": "c\\ud800",'
    b' "backend": {"type": "null", "data": {}}}}',
    b'{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s\\ud800",'
    b' "data": "x"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n\\udbff"}}',
    b'{"execute": "chardev-remove", "arguments": {"id": "\\ud800\\ud800"}}',
]


def test_unpaired_surrogate_escapes_are_refused_like_qemu(tmp_path: Path) -> None:
    """``"\\ud800"`` is JSON grammar but no Unicode text: QEMU 7.2 answers
    "JSON parse error, \\ud800 is not a valid Unicode character".  Accepted, it
    cannot be stored (SQLite takes UTF-8), echoed, or put on the engine's
    command line; so: refused as a parse error, no id, nothing stored."""
    state = tmp_path / "state"
    proc = start_qmpvm(tmp_path, state_dir=state)
    client = RawClient(proc.socket)
    client.negotiate()
    before = client.call("config-export")
    wrong = _parse_errors(client, SURROGATES, lambda desc: desc.startswith("JSON parse error"))
    after = client.call("config-export")
    client.close()
    problems = server_log_problems(proc)
    assert not wrong, "\n".join(["refused otherwise or not at all:", *wrong, *problems])
    assert after == before
    assert not problems, proc.stderr()[-3000:]

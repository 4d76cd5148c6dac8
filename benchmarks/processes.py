"""What both benchmarks need to start, measure and always end processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_STARTED: list[subprocess.Popen[bytes]] = []


def spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group (so its children, such as
    qmpvm's engine, end with it); remembered until ``stop``."""
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=REPO,
        env=env,
    )
    _STARTED.append(process)
    return process


def stop(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group we created, then SIGKILL whatever lingers in it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if process.stderr is not None:
        process.stderr.close()
    if process in _STARTED:
        _STARTED.remove(process)


def stop_all(grace: float = 3.0) -> None:
    for process in list(_STARTED):
        stop(process, grace)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``finally: stop_all()`` runs."""

    def terminated(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` alone (not its children, so not the engine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bytecode_env(cache: Path) -> dict[str, str]:
    """This environment, but with .pyc files written to (and read from) ``cache``.

    The sandbox sets PYTHONDONTWRITEBYTECODE=1, so qmpvm's own modules (an
    editable install) are compiled from source at every start; an installed
    package has its .pyc files.  PYTHONPYCACHEPREFIX keeps them out of the
    source tree.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def loadavg() -> str:
    """The host's 1, 5 and 15 minute load averages, as printed beside figures."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])

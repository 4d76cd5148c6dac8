"""QMP over TLS with QEMU's objects, and no bare TCP monitor for other hosts."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import connect, start_qmpvm


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _certificate(dir_: Path, name: str, cn: str, ca: str | None) -> None:
    key, csr, cert = dir_ / f"{name}-key.pem", dir_ / f"{name}.csr", dir_ / f"{name}-cert.pem"
    _openssl("genrsa", "-out", key, "2048")
    if ca is None:
        _openssl("req", "-x509", "-new", "-key", key, "-days", "2", "-subj", f"/CN={cn}",
                 "-out", cert)  # fmt: skip
        return
    _openssl("req", "-new", "-key", key, "-subj", f"/O=qmpvm tests/CN={cn}", "-out", csr)
    ext = dir_ / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", csr, "-CA", dir_ / f"{ca}-cert.pem", "-CAkey",
             dir_ / f"{ca}-key.pem", "-CAcreateserial", "-days", "2", "-extfile", ext,
             "-out", cert)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dir_ = tmp_path_factory.mktemp("pki")
    _certificate(dir_, "ca", "qmpvm test CA", None)
    _certificate(dir_, "server", "localhost", "ca")
    _certificate(dir_, "client", "client", "ca")
    _certificate(dir_, "intruder", "intruder", "ca")
    return dir_


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client_context(pki: Path, who: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
    if who is not None:
        ctx.load_cert_chain(str(pki / f"{who}-cert.pem"), str(pki / f"{who}-key.pem"))
    return ctx


async def test_a_tls_monitor_lets_in_only_the_authorized_certificate(
    tmp_path: Path, pki: Path
) -> None:
    port = _free_port()
    proc = start_qmpvm(
        tmp_path, "--preconfig",
        "-object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=on",
        "-object", "authz-simple,id=authz0,identity=CN=client,,O=qmpvm tests",
        "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off,tls-creds=tls0,tls-authz=authz0",
    )  # fmt: skip
    local = await connect(proc)  # the UNIX monitor beside it; also: the server is up
    # Plain streams: qemu.qmp's disconnect() hangs over TLS (with QEMU's TLS monitor too)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=_client_context(pki, "client"), server_hostname="localhost"
    )
    assert "QMP" in json.loads(await reader.readline())
    for command in ("qmp_capabilities", "query-status"):
        writer.write(json.dumps({"execute": command}).encode())
        reply = json.loads(await reader.readline())
    assert reply["return"] == await local.execute("query-status")
    writer.close()
    for who in ("intruder", None):  # another certificate, or none: no greeting
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=_client_context(pki, who), server_hostname="localhost"
        )
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
        writer.close()
    assert "client certificate 'CN=intruder,O=qmpvm tests' is not" in proc.stderr()
    await local.disconnect()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-qmp", "tcp::4444,server=on,wait=off"],
         "monitor tcp:0.0.0.0:4444 would give any host full control without TLS"),
        (["-qmp", "tcp:10.1.2.3:4444,server=on"], "without TLS"),
        (["-chardev", "socket,id=m,host=0.0.0.0,port=4444,server=on,wait=off",
          "-mon", "chardev=m,mode=control"], "without TLS"),
        (["-qmp", "tcp:127.0.0.1:4444,tls-creds=nope"], "tls-creds must name a -object"),
        (["-object", "tls-creds-x509,id=t,dir=/nonexistent,endpoint=server",
          "-qmp", "tcp:127.0.0.1:4444,tls-creds=t"], "no ca-cert.pem in '/nonexistent'"),
        (["-object", "tls-creds-x509,id=t,dir=/tmp",
          "-qmp", "tcp:127.0.0.1:4444,tls-creds=t"], "must have endpoint=server"),
    ],
)  # fmt: skip
def test_monitors_other_hosts_reach_need_tls(argv: list[str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qmpvm", "--print-qmp", *argv],
        check=False,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert message in out.stderr


def test_insecure_tcp_is_the_operators_explicit_choice() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qmpvm", "--print-qmp", "--allow-insecure-tcp",
         "-qmp", "tcp::4444,server=on,wait=off"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.returncode == 0

"""QMP over TLS, with QEMU's objects: ``tls-creds-x509`` and ``authz-simple``.

A TCP monitor reachable from other hosts gives whoever connects full control
of the machine, so qmpvm serves one only over TLS (or when its operator says
``--allow-insecure-tcp``).  The credentials are named the way QEMU names
them: ``-object tls-creds-x509,id=T,dir=D,endpoint=server[,verify-peer=on]``
(``D`` holds ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``) and
``-object authz-simple,id=A,identity=DN`` for the one client certificate
allowed in, then ``-qmp tcp:HOST:PORT,tls-creds=T,tls-authz=A`` (or a
``-chardev socket,...,tls-creds=T`` with ``-mon``).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CREDS_TYPE = "tls-creds-x509"
AUTHZ_TYPE = "authz-simple"
FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


@dataclass(frozen=True, slots=True)
class TlsServer:
    """What the TLS objects say, checked: enough to serve, nothing to open yet."""

    directory: str
    verify_peer: bool
    identity: str | None  # the client certificate's DN that authz-simple allows

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(
            os.path.join(self.directory, "server-cert.pem"),
            os.path.join(self.directory, "server-key.pem"),
        )
        if self.verify_peer:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(os.path.join(self.directory, "ca-cert.pem"))
        return ctx

    def refusal(self, peercert: Mapping[str, Any] | None) -> str | None:
        """Why this client is not let in (``authz-simple``), or None."""
        if self.identity is None:
            return None
        name = distinguished_name(peercert)
        if name != self.identity:
            return f"client certificate '{name}' is not '{self.identity}'"
        return None


def distinguished_name(peercert: Mapping[str, Any] | None) -> str:
    """A certificate subject as GnuTLS (so QEMU's authz-simple) spells it:
    RFC 4514, most specific first (``CN=client,O=Example,C=GB``)."""
    if not peercert:
        return ""
    rdns = peercert.get("subject", ())
    names = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "localityName": "L", "stateOrProvinceName": "ST", "countryName": "C",
             "emailAddress": "EMAIL", "domainComponent": "DC"}  # fmt: skip
    parts = [f"{names.get(key, key)}={value}" for rdn in rdns for key, value in rdn]
    return ",".join(reversed(parts))


def tls_server(creds: Mapping[str, Any] | None, authz: Mapping[str, Any] | None) -> TlsServer:
    """The objects' ``object-add`` arguments, checked as QEMU checks them; ValueError says why."""
    if creds is None or creds.get("qom-type") != CREDS_TYPE:
        raise ValueError(f"tls-creds must name a -object {CREDS_TYPE}")
    if creds.get("endpoint") != "server":
        raise ValueError(f"{CREDS_TYPE} '{creds.get('id')}' must have endpoint=server")
    if creds.get("passwordid"):
        raise ValueError(f"{CREDS_TYPE} '{creds.get('id')}': an encrypted key is not supported")
    directory = str(creds.get("dir") or "")
    verify_peer = bool(creds.get("verify-peer", True))
    for name in FILES if verify_peer else FILES[1:]:
        if not os.path.isfile(os.path.join(directory, name)):
            raise ValueError(f"{CREDS_TYPE} '{creds.get('id')}': no {name} in '{directory}'")
    identity = None
    if authz is not None:
        if authz.get("qom-type") != AUTHZ_TYPE:
            raise ValueError(f"tls-authz must name a -object {AUTHZ_TYPE}")
        if not verify_peer:
            raise ValueError(
                "tls-authz needs verify-peer=on: a client without a certificate has no name"
            )
        identity = str(authz.get("identity"))
    return TlsServer(directory, verify_peer, identity)

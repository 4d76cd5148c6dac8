"""Choosing the accelerator from a fallback list, as the host allows."""

from __future__ import annotations

import pytest

from qmpvm.engine import host
from qmpvm.engine.host import KvmState, choose_accel

EMULATED = KvmState(present=True, usable=False, reason="kvm_pvm")
HARDWARE = KvmState(present=True, usable=True, reason="hardware KVM")
ABSENT = KvmState(present=False, usable=False, reason="/dev/kvm is missing")


@pytest.mark.parametrize(
    ("state", "runs_guest_code", "chosen"),
    [
        (HARDWARE, True, "kvm"),
        (EMULATED, True, "tcg"),  # emulated KVM is not the best this host has for a guest
        (EMULATED, False, "kvm"),  # -machine none: as QEMU, so libvirt's probe sees KVM
        (ABSENT, False, "tcg"),
    ],
)
def test_a_fallback_list_takes_kvm_where_it_serves(
    monkeypatch: pytest.MonkeyPatch, state: KvmState, runs_guest_code: bool, chosen: str
) -> None:
    monkeypatch.setattr(host, "kvm_state", lambda: state)
    assert choose_accel("kvm:tcg", runs_guest_code=runs_guest_code) == chosen
    assert choose_accel("tcg") == "tcg"

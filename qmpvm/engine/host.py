"""What the host offers the engine: is KVM there, and is it worth using."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

KVM_DEVICE = Path("/dev/kvm")
PVM_MODULE = Path("/sys/module/kvm_pvm")


@dataclass(frozen=True, slots=True, kw_only=True)
class KvmState:
    present: bool  # /dev/kvm can be opened
    usable: bool  # and is hardware-backed, not an emulating PVM host
    reason: str


def kvm_state() -> KvmState:
    if not KVM_DEVICE.exists():
        return KvmState(present=False, usable=False, reason="/dev/kvm is missing")
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return KvmState(present=False, usable=False, reason="/dev/kvm is not accessible")
    if PVM_MODULE.exists():
        # KVM from kvm_pvm emulates guest kernel code (~1000x slower); TCG wins.
        return KvmState(present=True, usable=False, reason="KVM is provided by kvm_pvm (emulated)")
    return KvmState(present=True, usable=True, reason="hardware KVM")


def default_accel() -> str:
    """``kvm`` where KVM is usable, otherwise ``tcg``."""
    return "kvm" if kvm_state().usable else "tcg"


def choose_accel(spec: str | None, *, runs_guest_code: bool = True) -> str:
    """The accelerator for ``spec``: one name, a ``kvm:tcg`` fallback list, or None.

    In a list, ``kvm`` is taken where it is usable (hardware-backed): the list
    says "the best this host has", and emulated KVM is not that.  A machine
    that runs no guest code (``-machine none``, a management tool's probe)
    takes it wherever it is present, as QEMU does: libvirt probes with
    ``accel=kvm:tcg`` and trusts its capability cache only if KVM was enabled.
    """
    if not spec:
        return default_accel()
    choices = spec.split(":")
    for choice in choices[:-1]:
        state = kvm_state()
        if choice != "kvm" or state.usable or (state.present and not runs_guest_code):
            return choice
    return choices[-1]

"""qmpvm: a monitor-first VMM control plane (QMP before the machine; QEMU as the engine)."""

__version__ = "0.1.0"

QEMU_VERSION = (7, 2, 0)
"""The QEMU release whose QMP dialect qmpvm speaks."""

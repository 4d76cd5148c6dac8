"""qmpvm: a monitor-first VMM control plane (QMP before the machine; QEMU as the engine)."""

__version__ = "0.1.0"

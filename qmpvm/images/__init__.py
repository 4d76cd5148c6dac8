"""Test/demo guest images: the host kernel plus a tiny busybox initramfs.

Tests and demos boot this guest under QEMU, wait for :data:`READY_MARKER` on
the serial console, then type shell commands into the serial port.
"""

from qmpvm.images.guest import (
    READY_MARKER,
    GuestImage,
    ImageError,
    build_guest,
    default_image_dir,
    find_kernel,
    guest_cmdline,
)

__all__ = [
    "READY_MARKER",
    "GuestImage",
    "ImageError",
    "build_guest",
    "default_image_dir",
    "find_kernel",
    "guest_cmdline",
]

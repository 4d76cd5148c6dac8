"""Client tools built on the qemu.qmp library: one-shot commands, console, demo."""

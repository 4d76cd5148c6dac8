"""The engine side: probing QEMU's capabilities, launching and driving it over a private link."""

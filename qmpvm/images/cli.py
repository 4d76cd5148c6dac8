"""``qmpvm image`` subcommand: build the test guest ahead of time.

Useful to pay the build cost once (e.g. in CI setup) and to learn the
kernel/initrd paths for booting the guest by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qmpvm.images.guest import ImageError, build_guest, default_image_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmpvm image", description="Manage the qmpvm test guest image."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser(
        "build",
        help="build the guest initramfs (cached; rebuilt only when inputs change)",
        description="Build the guest initramfs and print the kernel and initrd paths.",
    )
    build.add_argument(
        "dir",
        nargs="?",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"output directory (default: {default_image_dir()})",
    )
    build.add_argument(
        "--force", action="store_true", help="rebuild even if the cached image is current"
    )
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build":
        try:
            image = build_guest(args.dir, force=args.force)
        except ImageError as exc:
            print(f"qmpvm image: error: {exc}", file=sys.stderr)
            return 1
        print(f"kernel: {image.kernel}")
        print(f"initrd: {image.initrd}")
        print(f"kernel_version: {image.kernel_version}")
        return 0
    return 2  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`pyvmm` command line: run a VM, build or locate the default guest.

Errors are one line on stderr and a non-zero status, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pyvmm.errors import PyvmmError

EXIT_ERROR = 2
MEM_UNITS = {"": 1, "M": 1, "MIB": 1, "G": 1024, "GIB": 1024}


def parse_mem(text: str) -> int:
    """'256', '256M', '1G' -> MiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in MEM_UNITS:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r}: use e.g. 256, 256M or 1G")
    return int(match.group(1)) * MEM_UNITS[match.group(2).upper()]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other pyvmm error (`-h` shows usage)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyvmm", description="A microVM monitor on /dev/kvm.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="boot a Linux guest with its console on this terminal")
    run.add_argument("--kernel", type=Path, help="bzImage or PVH vmlinux (default: the built-in guest)")
    run.add_argument("--initrd", type=Path, help="initramfs (default: the built-in guest's)")
    run.add_argument("--cmdline", default="", help="appended to the default kernel command line")
    run.add_argument("--mem", type=parse_mem, default=256, help="guest RAM in MiB, or with M/G")
    run.add_argument("--cpus", type=int, default=1, help="number of vCPUs")
    run.add_argument("--console", default="stdio", help="stdio, file:PATH or none")
    run.add_argument("--stats", action="store_true", help="print exit counters at exit")
    run.add_argument("--bzimage", action="store_true",
                     help="with the built-in guest, boot its bzImage instead of the PVH vmlinux")

    guest = sub.add_parser("guest", help="the built-in guest kernel and initramfs")
    guest_sub = guest.add_subparsers(dest="guest_command", required=True, parser_class=_Parser)
    build = guest_sub.add_parser("build", help="build it unless cached (minutes)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    guest_sub.add_parser("path", help="print name=path for bzimage, vmlinux, initramfs")
    return parser


def _default_guest(build: bool):
    from pyvmm import firmware
    return firmware.ensure_guest(progress=True) if build else firmware.find_guest()


def cmd_run(args: argparse.Namespace) -> int:
    from pyvmm.console import StdinReader
    from pyvmm.vmm import LinuxVm, VmConfig

    kernel, initrd = args.kernel, args.initrd
    if kernel is None:
        guest = _default_guest(build=True)
        kernel = guest.bzimage if args.bzimage else guest.vmlinux
        initrd = initrd or guest.initramfs
    if initrd is not None and not initrd.is_file():
        raise PyvmmError(f"initrd {initrd} does not exist")
    config = VmConfig(kernel=kernel, initrd=initrd, cmdline=args.cmdline, mem_mib=args.mem,
                      vcpus=args.cpus, console=args.console)
    with LinuxVm(config) as vm:
        if vm.pvm:
            print("pyvmm: KVM PVM host: adding kernel parameters to avoid instructions it "
                  "cannot emulate, and fixing up int3/fwait", file=sys.stderr)
        reader = StdinReader(vm.send, vm.stop) if args.console == "stdio" else None
        try:
            if reader:
                reader.start()
            vm.start()
            result = vm.wait()
        finally:
            if reader:
                reader.stop()
        assert result is not None
        if args.stats:
            print(json.dumps(vm.stats(), indent=1), file=sys.stderr)
    if result.exit_code:
        print(f"pyvmm: {result.reason}", file=sys.stderr)
    return result.exit_code


def cmd_guest(args: argparse.Namespace) -> int:
    from pyvmm import firmware
    if args.guest_command == "build":
        paths = firmware.build_guest(progress=True) if args.force else \
            firmware.ensure_guest(progress=True)
    else:
        found = firmware.find_guest()
        if found is None:
            raise PyvmmError("the built-in guest is not built yet: run `pyvmm guest build`")
        paths = found
    print(f"bzimage={paths.bzimage}\nvmlinux={paths.vmlinux}\ninitramfs={paths.initramfs}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        return cmd_guest(args)
    except PyvmmError as exc:
        print(f"pyvmm: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"pyvmm: error: {exc.strerror or exc}"
              f"{': ' + str(exc.filename) if exc.filename else ''}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

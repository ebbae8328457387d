"""`pyvmm profile FILE --symbols System.map`: where a profiled guest spent its time
(a profile written by `pyvmm run --profile-guest FILE`; docs/profiler.md).

A profile or symbol map that cannot be read is one line on stderr and exit status 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 1


def add_parser(sub, parser_class) -> None:  # noqa: ANN001 - argparse's subparsers
    profile = sub.add_parser("profile", help="where a profiled guest spent its time "
                                             "(`pyvmm run --profile-guest FILE` wrote FILE)")
    profile.add_argument("file", type=Path, metavar="FILE", help="the profile")
    profile.add_argument("--symbols", type=Path, metavar="SYSTEM_MAP", default=None,
                         help="the guest kernel's System.map (default: the built-in "
                              "guest's, if FILE profiled its kernel)")
    profile.add_argument("--top", type=int, default=20, metavar="N",
                         help="functions in the table and per phase (default 20)")
    profile.add_argument("--flamegraph", type=Path, metavar="OUT", default=None,
                         help="also write folded stacks (ring;phase;function count) for "
                              "flamegraph.pl or speedscope")


def _builtin_system_map(kernel: str | None) -> Path | None:
    """The built-in guest's System.map when the profile is of its kernel."""
    if not kernel:
        return None
    from pyvmm import builtin_guest
    guest = builtin_guest.find_guest()
    if guest is None:
        return None
    if Path(kernel).resolve() in (Path(guest.bzimage).resolve(), Path(guest.vmlinux).resolve()):
        return Path(guest.system_map)
    return None


def cmd_profile(args: argparse.Namespace) -> int:
    from pyvmm.cli import user_error_exit
    from pyvmm.profiler import Symbols, folded, format_report, load_profile, report
    if args.top < 1:
        print("pyvmm: error: --top must be at least 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    texts: list[str] = []

    def build() -> int:
        profile = load_profile(args.file)
        symbols_path = args.symbols or _builtin_system_map(profile.header.kernel)
        symbols = Symbols.from_system_map(symbols_path) if symbols_path else None
        texts.append(format_report(report(profile, symbols, args.top)))
        if symbols is None:
            texts.append("\n(no --symbols: functions and boot phases need the kernel's "
                         "System.map)\n")
        if args.flamegraph is not None:
            args.flamegraph.write_text(folded(profile, symbols))
        return 0

    # A bad profile or map (a ProfileError), or a file that cannot be read: one line.
    if user_error_exit("pyvmm", build, status=EXIT_BAD_INPUT):
        return EXIT_BAD_INPUT
    text = "".join(texts)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0

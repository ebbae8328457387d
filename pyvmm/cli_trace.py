"""`pyvmm trace FILE`: what an exit trace says (a trace written by `pyvmm run --trace
FILE`; docs/trace.md), and the `pyvmm run --trace` flags.

A trace that cannot be read is one line on stderr and exit status 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 1
DEFAULT_TOP = 10
DEFAULT_BUCKETS = 20
# pyvmm.trace.fileformat.DEFAULT_LIMIT_MIB, which is not imported here so that building
# `pyvmm run`'s parser stays cheap (a test checks that they agree).
DEFAULT_LIMIT_MIB = 256


def add_run_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument("--trace", type=Path, default=None, metavar="FILE",
                     help="record every exit of every vCPU into FILE; `pyvmm trace FILE` "
                          "reads it (docs/trace.md)")
    run.add_argument("--trace-limit", type=int, default=None, metavar="MIB",
                     help=f"stop writing exits to the trace at MIB MiB (default "
                          f"{DEFAULT_LIMIT_MIB}); later exits are counted, not written")


def add_parser(sub, parser_class) -> None:  # noqa: ANN001 - argparse's subparsers
    trace = sub.add_parser("trace", help="summarise an exit trace (`pyvmm run --trace FILE` "
                                         "wrote FILE)")
    trace.add_argument("file", type=Path, metavar="FILE", help="the trace")
    trace.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="N",
                       help=f"ports and addresses in the busiest table (default {DEFAULT_TOP})")
    trace.add_argument("--buckets", type=int, default=DEFAULT_BUCKETS, metavar="N",
                       help=f"time buckets in the exits-per-second table (default "
                            f"{DEFAULT_BUCKETS})")
    trace.add_argument("--plot", type=Path, metavar="OUT", default=None,
                       help="also plot exits per second over time into OUT (.svg or .png; "
                            "needs matplotlib)")


def trace_options(args: argparse.Namespace) -> dict[str, Any]:
    """MicroVM keyword arguments from `pyvmm run`'s flags (none from `pyvmm api`)."""
    from pyvmm.errors import PyvmmError
    trace, limit = getattr(args, "trace", None), getattr(args, "trace_limit", None)
    if limit is not None and trace is None:
        raise PyvmmError("--trace-limit needs --trace FILE")
    return {"trace": trace, "trace_limit_mib": limit} if trace is not None else {}


def report_recording(vm: Any) -> None:
    """After `pyvmm run --trace`: one line on stderr saying what the file holds, and
    whether exits are missing from it (a full ring, the file limit)."""
    recorder = getattr(vm, "tracer", None)
    if recorder is None:
        return
    # The VM has ended and its vCPU threads are out of the guest: the last drain and
    # the trailer now (not at release, later), so that the line counts them too.
    recorder.stop()
    stats = recorder.stats
    notes = []
    if stats.dropped:
        notes.append(f"{stats.dropped} not recorded (the ring was full)")
    if stats.limit_hit:
        notes.append(f"the file limit of {recorder.limit_bytes >> 20} MiB was hit: "
                     f"{stats.over_limit} not written")
    print(f"pyvmm: trace: {stats.written} exits written to {recorder.path}"
          + (f"; {', '.join(notes)}" if notes else ""), file=sys.stderr)


def cmd_trace(args: argparse.Namespace) -> int:
    from pyvmm.cli import user_error_exit
    from pyvmm.trace import format_summary, load_summary
    for flag, value in (("--top", args.top), ("--buckets", args.buckets)):
        if value < 1:
            print(f"pyvmm: error: {flag} must be at least 1", file=sys.stderr)
            return EXIT_BAD_INPUT
    texts: list[str] = []

    def build() -> int:
        summary = load_summary(args.file)
        texts.append(format_summary(summary, args.top, args.buckets))
        if args.plot is not None:
            from pyvmm.trace.plot import plot_exits
            plot_exits(summary, args.plot)
            texts.append(f"\nplot written to {args.plot}\n")
        return 0

    # A bad trace (a TraceError), or a file that cannot be read or written: one line.
    if user_error_exit("pyvmm", build, status=EXIT_BAD_INPUT):
        return EXIT_BAD_INPUT
    try:
        sys.stdout.write("".join(texts))
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0

"""python -m benches [names...] [--reps N] [benchmark options]

Runs the named benchmarks (all of them when none is named).  A benchmark is a
module with add_arguments(parser), for its own options, and main(args) -> dict,
which prints its table, writes benches/results/<name>.json and returns the data.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

# name -> module; add new benchmarks here.
BENCHMARKS: dict[str, str] = {
    "exits": "benches.exits",
    "boot": "benches.boot",
    "startup": "benches.startup",
    "memory": "benches.memory",
    "blk-model": "benches.blk_model",
    "blk": "benches.blk",
    "net": "benches.net",
    "snapshot": "benches.snapshot",
    "sandbox": "benches.sandbox",
    "jail": "benches.jail",
    "seccomp": "benches.seccomp",
}
# Benchmarks that boot Linux (minutes each on KVM PVM); --quick skips them.
SLOW = {"boot", "blk", "net", "snapshot", "sandbox"}


def load(name: str) -> ModuleType:
    return importlib.import_module(BENCHMARKS[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="name",
                        help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--reps", type=int, default=7, help="repetitions per variant (default 7)")
    parser.add_argument("--quick", action="store_true",
                        help=f"skip the benchmarks that boot Linux ({', '.join(sorted(SLOW))})")
    modules = {name: load(name) for name in BENCHMARKS}
    for module in modules.values():
        module.add_arguments(parser)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; have {', '.join(BENCHMARKS)}")
    names = args.names or [n for n in BENCHMARKS if not (args.quick and n in SLOW)]
    for name in names:
        print(f"== {name}", flush=True)
        modules[name].main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared by the benchmarks: statistics, machine facts, tables, JSON, compiling C.

The machine is shared and noisy, so a benchmark runs every variant once per
repetition (interleaved) and reports the median with min/max, and ratios
against a baseline measured in the same run, rather than absolute numbers.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from pyvmm.pvm import is_pvm_host

BENCHES_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCHES_DIR / "results"


@dataclass(frozen=True)
class Stats:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stats":
        if not values:
            raise ValueError("no samples")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def format(self, fmt: str = ".0f") -> str:
        """'median [min-max]'."""
        return f"{self.median:{fmt}} [{self.min:{fmt}}-{self.max:{fmt}}]"


def rotated(items: Sequence[Any], rep: int) -> list[Any]:
    """items in a different order each repetition, so that no variant always
    runs first (cold caches) or right after the same neighbour."""
    k = rep % len(items)
    return list(items[k:]) + list(items[:k])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, Any]:
    """What a reader needs to judge the numbers: which KVM, which CPU, when."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kvm": "PVM (guest ring 0 emulated)" if is_pvm_host() else "hardware (VT-x/AMD-V)",
        "pvm": is_pvm_host(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def format_facts(facts: dict[str, Any]) -> str:
    return (f"{facts['date']}  KVM: {facts['kvm']}  CPU: {facts['cpu']} x{facts['cpus']}  "
            f"Linux {facts['kernel']}  Python {facts['python']}")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; the first column is left-aligned, the others right."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def write_json(name: str, data: dict[str, Any]) -> Path:
    """benches/results/<name>.json; dataclasses (Stats) become dicts."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def add_options(parser: argparse.ArgumentParser, title: str,
                options: Sequence[tuple[str, type, Any, str]]) -> None:
    """A benchmark's own options, as (flag, type, default, help), in a group titled title."""
    group = parser.add_argument_group(title)
    for flag, kind, default, text in options:
        group.add_argument(flag, type=kind, default=default, help=text)


def compile_c(source: Path, extra_flags: Sequence[str] = ()) -> Path:
    """gcc -O2 source into the cache (keyed by source and flags); returns the binary."""
    flags = ["-O2", "-Wall", "-Wextra", *extra_flags]
    key = hashlib.sha256(source.read_bytes() + "\0".join(flags).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PYVMM_CACHE", Path.home() / ".cache" / "pyvmm")) / "benches"
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / f"{source.stem}-{key}"
    if not binary.exists():
        tmp = binary.with_suffix(f".{os.getpid()}.tmp")
        proc = subprocess.run(["gcc", *flags, "-o", str(tmp), str(source)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"gcc failed on {source}:\n{proc.stderr}")
        tmp.replace(binary)
    return binary

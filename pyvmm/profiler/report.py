"""What a profile says: functions by samples, the boot timeline in phases, and
Brendan Gregg's folded stacks for flame graphs.

Phases are time ranges over all vCPUs, each starting at the first sample that shows
the boot reached it (docs/profiler.md):
  decompression  ring-0 samples outside the kernel image, before the first sample in
                 it (the bzImage's decompressor, at identity-mapped physical addresses)
  early setup    from the first sample in kernel text
  initcalls      from the first sample in do_one_initcall, or in an initcall function
                 soon followed by another one (first_initcall())
  userspace      from the first ring-3 sample
A phase the profile never shows (a PVH boot has no decompression) is left out.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pyvmm.profiler.fileformat import Profile, Sample
from pyvmm.profiler.symbols import INITCALL_DRIVERS, Symbols

PHASES = ("decompression", "early setup", "initcalls", "userspace")
USER = "[user]"
OUTSIDE_KERNEL = "[outside kernel]"
UNSYMBOLIZED = "[no symbols]"
# Samples within which a second initcall function must follow a first (or 5% of the
# profile, if more): see first_initcall().
MIN_INITCALL_WINDOW = 50


@dataclass
class FunctionRow:
    function: str
    ring: int
    samples: int
    share: float        # of all samples, 0..1


@dataclass
class Phase:
    name: str
    start_ns: int
    end_ns: int
    samples: int = 0
    share: float = 0.0
    top: list[FunctionRow] = field(default_factory=list)


@dataclass
class Report:
    total: int
    dropped: int
    hz: int
    vcpus: int
    functions: list[FunctionRow]
    phases: list[Phase]
    duration_ns: int = 0

    @property
    def coverage(self) -> float:
        """Samples per tick the profile's span had room for (vCPUs x rate x time): below
        1 when the sampler ran late on a busy host or a vCPU was out of the guest."""
        ticks = self.vcpus * self.hz * self.duration_ns / 1e9
        return self.total / ticks if ticks >= 1 else 0.0


def function_of(sample: Sample, symbols: Symbols | None) -> str:
    """The name a sample is counted under: ring 3 is the guest's user space (its
    binaries' symbols are not in System.map), ring 0 outside the image is the
    decompressor, firmware or a relocated kernel."""
    if sample.cpl == 3:
        return USER
    if symbols is None:
        return UNSYMBOLIZED
    return symbols.lookup(sample.rip) or OUTSIDE_KERNEL


def phase_starts(samples: list[Sample], names: list[str],
                 symbols: Symbols | None) -> dict[str, int]:
    """The sample index at which each phase the profile shows begins."""
    starts: dict[str, int] = {}
    if symbols is None:
        return starts

    def first(predicate, after: int = 0) -> int | None:
        return next((i for i in range(after, len(samples)) if predicate(i)), None)
    kernel = first(lambda i: samples[i].cpl == 0 and symbols.in_kernel(samples[i].rip))
    user = first(lambda i: samples[i].cpl == 3)
    end_of_boot = min(x for x in (kernel, user, len(samples)) if x is not None)
    if any(samples[i].cpl == 0 for i in range(end_of_boot)):
        starts["decompression"] = 0
    if kernel is not None and (user is None or kernel < user):
        starts["early setup"] = kernel
        initcall = first_initcall(names, symbols, kernel)
        if initcall is not None and (user is None or initcall < user):
            starts["initcalls"] = initcall
    if user is not None:
        starts["userspace"] = user
    return starts


def first_initcall(names: list[str], symbols: Symbols, after: int) -> int | None:
    """The sample index where the initcalls begin: the first in do_one_initcall, or in
    an initcall function soon followed by another initcall function.  One initcall
    function alone is not enough: some are also called directly during early setup
    (static_call_init is, from setup_arch), which would start the phase far too soon."""
    window = max(MIN_INITCALL_WINDOW, len(names) // 20)
    candidates = [i for i in range(after, len(names)) if symbols.is_initcall(names[i])]
    for position, i in enumerate(candidates):
        if names[i] in INITCALL_DRIVERS:
            return i
        for j in candidates[position + 1:]:
            if j - i > window:
                break
            if names[j] != names[i]:
                return i
    return None


def _rows(counts: Counter, total: int, limit: int | None) -> list[FunctionRow]:
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [FunctionRow(name, ring, n, n / total if total else 0.0)
            for (name, ring), n in ordered[:limit]]


def report(profile: Profile, symbols: Symbols | None, top: int = 20) -> Report:
    samples = profile.samples
    names = [function_of(s, symbols) for s in samples]
    total = len(samples)
    counts = Counter((name, s.cpl) for name, s in zip(names, samples))
    starts = sorted(phase_starts(samples, names, symbols).items(), key=lambda kv: kv[1])
    phases = []
    for position, (name, begin) in enumerate(starts):
        end = starts[position + 1][1] if position + 1 < len(starts) else total
        phase_counts = Counter((names[i], samples[i].cpl) for i in range(begin, end))
        # A phase ends where the next begins (the last one at the last sample); its top
        # functions are shares of the phase.
        end_ns = samples[end].t_ns if end < total else samples[-1].t_ns
        phases.append(Phase(name, samples[begin].t_ns, end_ns, end - begin,
                            (end - begin) / total, _rows(phase_counts, end - begin, top)))
    return Report(total, sum(profile.dropped.values()), profile.header.hz,
                  profile.header.vcpus, _rows(counts, total, top), phases,
                  samples[-1].t_ns if samples else 0)


def phase_of_each(profile: Profile, symbols: Symbols | None) -> list[str]:
    names = [function_of(s, symbols) for s in profile.samples]
    starts = sorted(phase_starts(profile.samples, names, symbols).items(), key=lambda kv: kv[1])
    out = ["boot"] * len(names)
    for position, (name, begin) in enumerate(starts):
        end = starts[position + 1][1] if position + 1 < len(starts) else len(names)
        out[begin:end] = [name] * (end - begin)
    return out


def _frame(text: str) -> str:
    """A folded-stack frame: no separators (';'), no spaces (the count's separator)."""
    return text.replace(";", ":").replace(" ", "_") or "?"


def folded(profile: Profile, symbols: Symbols | None) -> str:
    """Brendan Gregg's folded stacks, "ring0;initcalls;func 12" per line, for
    flamegraph.pl and speedscope."""
    phases = phase_of_each(profile, symbols)
    counts = Counter(
        f"ring{s.cpl};{_frame(phase)};{_frame(function_of(s, symbols))}"
        for s, phase in zip(profile.samples, phases))
    return "".join(f"{stack} {n}\n" for stack, n in sorted(counts.items()))


# -- text --------------------------------------------------------------------------------

def _seconds(ns: int) -> str:
    return f"{ns / 1e9:8.3f}s"


def format_report(result: Report) -> str:
    lines = [f"{result.total} samples at {result.hz} Hz from {result.vcpus} vCPU(s) over "
             f"{result.duration_ns / 1e9:.3f} s ({100 * result.coverage:.0f}% of the ticks)"
             + (f", {result.dropped} dropped (the ring was full)" if result.dropped else ""),
             "", f"{'samples':>8} {'%':>6}  ring  function"]
    for row in result.functions:
        lines.append(f"{row.samples:8d} {100 * row.share:5.1f}%  {row.ring:>4}  {row.function}")
    if result.phases:
        lines += ["", "boot timeline:",
                  f"  {'phase':<14} {'start':>9} {'end':>9} {'samples':>8} {'%':>6}"]
        for phase in result.phases:
            lines.append(f"  {phase.name:<14} {_seconds(phase.start_ns)} "
                         f"{_seconds(phase.end_ns)} {phase.samples:8d} "
                         f"{100 * phase.share:5.1f}%")
        for phase in result.phases:
            lines += ["", f"top functions in {phase.name} (% of the phase):"]
            for row in phase.top:
                lines.append(f"  {row.samples:8d} {100 * row.share:5.1f}%  ring{row.ring}  "
                             f"{row.function}")
    return "\n".join(lines) + "\n"

"""What a trace says (`pyvmm trace FILE`): exits by reason, exits per second over time,
the busiest ports and addresses, and the handler latency per device.

Everything is aggregated while the records stream by, in memory bounded whatever the
file holds: the timeline in at most MAX_BINS bins (their width doubles as the trace
gets longer), latencies in log-linear histograms (percentiles within 1/32 of the true
value), and at most MAX_ADDRESSES distinct addresses (the rest are counted together).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.trace.fileformat import (BUS_NAMES, NO_BUS, TraceError, TraceFooter, TraceHeader,
                                    TraceReader, open_trace)

MAX_BINS = 4096
FIRST_BIN_NS = 1_000           # the timeline starts at 1 us bins and widens as needed
MAX_ADDRESSES = 1 << 16
HISTOGRAM_SUB_BITS = 5         # 32 buckets per power of two: within 1/32
PERCENTILES = (50, 90, 99)
NO_DEVICE = "(no device)"


def exit_reason_name(reason: int) -> str:
    from pyvmm.kvm.vcpu import ExitReason
    return ExitReason.name_of(reason)


class LatencyHistogram:
    """Counts of values (ns) in log-linear buckets: exact below 64, then 32 buckets
    per power of two, so a percentile is at most 1/32 above the true value."""

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.max = 0

    @staticmethod
    def bucket(value: int) -> int:
        if value < 64:
            return value
        shift = value.bit_length() - 1 - HISTOGRAM_SUB_BITS
        return (shift + 1) << HISTOGRAM_SUB_BITS | (value >> shift) & ((1 << HISTOGRAM_SUB_BITS) - 1)

    @staticmethod
    def upper_bound(bucket: int) -> int:
        if bucket < 64:
            return bucket
        shift = (bucket >> HISTOGRAM_SUB_BITS) - 1
        mantissa = (bucket & ((1 << HISTOGRAM_SUB_BITS) - 1)) | 1 << HISTOGRAM_SUB_BITS
        return ((mantissa + 1) << shift) - 1

    def add(self, value: int) -> None:
        key = self.bucket(value)
        self.buckets[key] = self.buckets.get(key, 0) + 1
        self.count += 1
        if value > self.max:
            self.max = value

    def percentile(self, p: float) -> int:
        """The smallest bucket bound with at least p% of the values at or below it."""
        if not self.count:
            return 0
        rank = max(1, -(-self.count * p // 100))
        seen = 0
        for key in sorted(self.buckets):
            seen += self.buckets[key]
            if seen >= rank:
                return min(self.upper_bound(key), self.max)
        return self.max


@dataclass
class Timeline:
    """Exits per time bin and category (a device's name, a bus's "(no device)", or the
    exit reason of exits that are not I/O); bins widen, never more than MAX_BINS."""
    bin_ns: int = FIRST_BIN_NS
    bins: list[dict[str, int]] = field(default_factory=list)

    def add(self, t_ns: int, category: str) -> None:
        index = t_ns // self.bin_ns
        while index >= MAX_BINS:
            self._widen()
            index = t_ns // self.bin_ns
        while len(self.bins) <= index:
            self.bins.append({})
        counts = self.bins[index]
        counts[category] = counts.get(category, 0) + 1

    def _widen(self) -> None:
        merged = []
        for i in range(0, len(self.bins), 2):
            pair = dict(self.bins[i])
            for key, n in (self.bins[i + 1] if i + 1 < len(self.bins) else {}).items():
                pair[key] = pair.get(key, 0) + n
            merged.append(pair)
        self.bins, self.bin_ns = merged, self.bin_ns * 2

    def rebinned(self, buckets: int, span_ns: int) -> tuple[int, list[dict[str, int]]]:
        """(width in ns, counts) in about `buckets` equal bins covering span_ns."""
        per = max(1, -(-max(span_ns, 1) // (self.bin_ns * max(1, buckets))))
        out: list[dict[str, int]] = []
        for i in range(0, max(len(self.bins), 1), per):
            merged: dict[str, int] = {}
            for counts in self.bins[i:i + per]:
                for key, n in counts.items():
                    merged[key] = merged.get(key, 0) + n
            out.append(merged)
        return self.bin_ns * per, out


@dataclass
class AddressCount:
    bus: str
    addr: int
    device: str
    exits: int
    reads: int
    writes: int


@dataclass
class TraceSummary:
    header: TraceHeader
    footer: TraceFooter
    exits: int = 0
    span_ns: int = 0                       # from the start to the last exit
    by_reason: dict[str, int] = field(default_factory=dict)
    timeline: Timeline = field(default_factory=Timeline)
    addresses: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    other_addresses: int = 0               # exits at addresses beyond MAX_ADDRESSES
    latency: dict[str, LatencyHistogram] = field(default_factory=dict)

    def busiest(self, top: int) -> list[AddressCount]:
        rows = sorted(self.addresses.items(), key=lambda item: (-item[1][0], item[0]))[:top]
        return [AddressCount(BUS_NAMES[bus], addr, self.header.device_name(bus, rng) or
                             NO_DEVICE, exits, reads, writes)
                for (bus, addr), (exits, reads, writes, rng) in rows]


def summarize(reader: TraceReader) -> TraceSummary:
    """Read every record of reader into a TraceSummary (TraceError on a bad file)."""
    header = reader.header
    summary = TraceSummary(header, reader.footer)
    names = {(bus, i): r.name for bus, b in enumerate(BUS_NAMES)
             for i, r in enumerate(header.devices.get(b, []))}
    reason_names: dict[int, str] = {}
    start = header.start_ns
    for t_ns, addr, _, handler_ns, _, reason, rng, _, bus, _, is_write, _ in reader.records():
        t = t_ns - start
        summary.exits += 1
        if t > summary.span_ns:
            summary.span_ns = t
        name = reason_names.get(reason)
        if name is None:
            name = reason_names[reason] = exit_reason_name(reason)
        summary.by_reason[name] = summary.by_reason.get(name, 0) + 1
        if bus == NO_BUS:
            summary.timeline.add(t, name)
            continue
        device = names.get((bus, rng)) or f"{BUS_NAMES[bus]} {NO_DEVICE}"
        summary.timeline.add(t, device)
        _count_address(summary, bus, addr, rng, is_write)
        histogram = summary.latency.get(device)
        if histogram is None:
            histogram = summary.latency[device] = LatencyHistogram()
        histogram.add(handler_ns)
    return summary


def _count_address(summary: TraceSummary, bus: int, addr: int, rng: int, is_write: int) -> None:
    row = summary.addresses.get((bus, addr))
    if row is None:
        if len(summary.addresses) >= MAX_ADDRESSES:
            summary.other_addresses += 1
            return
        row = summary.addresses[(bus, addr)] = [0, 0, 0, rng]
    row[0] += 1
    row[2 if is_write else 1] += 1


def load_summary(path: str | Path) -> TraceSummary:
    """Read and summarise a trace file (TraceError, one line, if it is not one)."""
    with open_trace(path) as f:
        try:
            return summarize(TraceReader(f, str(path)))
        except OSError as exc:
            raise TraceError(f"{path}: cannot read it: {exc.strerror or exc}") from None


def summarize_bytes(data: bytes, source: str = "<trace>") -> TraceSummary:
    from pyvmm.trace.fileformat import reader_of_bytes
    return summarize(reader_of_bytes(data, source))


# -- the text report -----------------------------------------------------------------------------

def _table(headers: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Columns right-aligned but the first `left`, two spaces apart."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(headers)] + [line(r) for r in rows]


def _seconds(ns: int) -> str:
    return f"{ns / 1e9:.3f}s"


def _ns(ns: int) -> str:
    return f"{ns / 1000:.1f}us" if ns >= 10_000 else f"{ns}ns"


def format_summary(summary: TraceSummary, top: int = 10, buckets: int = 20) -> str:
    h, f = summary.header, summary.footer
    lines = [f"{summary.exits} exits from {h.vcpus} vCPU(s) over {_seconds(summary.span_ns)}"
             + (f" ({summary.exits / (summary.span_ns / 1e9):.0f}/s)" if summary.span_ns else "")]
    dropped = sum(f.dropped.values())
    if dropped:
        per = ", ".join(f"vCPU {v}: {n}" for v, n in sorted(f.dropped.items()))
        lines.append(f"{dropped} exits were not recorded: the trace ring was full ({per})")
    if f.over_limit:
        lines.append(f"the file limit ({h.limit_bytes >> 20} MiB) was hit: {f.over_limit} "
                     "later exits are not in the file")
    lines += ["", "exits by reason:"]
    lines += ["  " + row for row in _table(
        ["reason", "exits", "%"],
        [[name, str(n), f"{100 * n / summary.exits:.1f}%"]
         for name, n in sorted(summary.by_reason.items(), key=lambda kv: (-kv[1], kv[0]))])]
    width, bins = summary.timeline.rebinned(buckets, summary.span_ns)
    categories = _top_categories(bins, 3)
    lines += ["", f"exits per second over time ({_seconds(width)} buckets; the busiest "
                  "sources per bucket):"]
    rows = []
    for i, counts in enumerate(bins):
        total = sum(counts.values())
        rows.append([f"{_seconds(i * width)}-{_seconds((i + 1) * width)}", str(total),
                     f"{total / (width / 1e9):.0f}"] +
                    [str(counts.get(c, 0)) for c in categories])
    lines += ["  " + row for row in _table(["time", "exits", "per s"] + categories, rows)]
    busiest = summary.busiest(top)
    lines += ["", f"busiest ports and addresses (top {top}):"]
    lines += ["  " + row for row in _table(
        ["bus", "address", "device", "exits", "reads", "writes"],
        [[a.bus, f"{a.addr:#x}", a.device, str(a.exits), str(a.reads), str(a.writes)]
         for a in busiest], left=3)]
    if summary.other_addresses:
        lines.append(f"  ({summary.other_addresses} exits at more addresses than the "
                     f"{MAX_ADDRESSES} counted one by one)")
    lines += ["", "handler time per device (exit to re-entry in the C loop):"]
    lines += ["  " + row for row in _table(
        ["device", "exits"] + [f"p{p}" for p in PERCENTILES] + ["max"],
        [[name, str(hist.count)] + [_ns(hist.percentile(p)) for p in PERCENTILES] +
         [_ns(hist.max)] for name, hist in sorted(summary.latency.items(),
                                                   key=lambda kv: (-kv[1].count, kv[0]))])]
    return "\n".join(lines) + "\n"


def _top_categories(bins: list[dict[str, int]], n: int) -> list[str]:
    totals: dict[str, int] = {}
    for counts in bins:
        for key, count in counts.items():
            totals[key] = totals.get(key, 0) + count
    return [key for key, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]

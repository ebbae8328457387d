"""The exit trace (pyvmm.trace): the file format and its reader (also fuzzed: malformed
input is a TraceError, never another exception), the summary and `pyvmm trace`, and,
with KVM, tiny guests whose every port and MMIO access is in the trace with its port or
address, value and device; a ring too small for them counts drops; no trace, no ring."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.trace import TraceError, format_summary, iter_exits, load_summary, summarize_bytes
from pyvmm.trace.fileformat import (KIND_DROPPED, KIND_END, KIND_EXIT, KIND_OVER_LIMIT,
                                    NO_BUS, RECORD, DeviceRange, TraceHeader, header_line,
                                    trailer_record)
from pyvmm.trace.summary import MAX_ADDRESSES, MAX_BINS, LatencyHistogram

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("PYVMM_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
START = 1_000_000_000
KVM_EXIT_IO, KVM_EXIT_HLT, KVM_EXIT_MMIO = 2, 5, 6
DEVICES = {"pio": [DeviceRange("serial", 0x3F8, 8), DeviceRange("debug-exit", 0xF4, 1)],
           "mmio": [DeviceRange("virtio-blk", 0xD0000000, 0x1000)]}


def header(vcpus: int = 1, limit: int = 0) -> TraceHeader:
    return TraceHeader(vcpus=vcpus, start_ns=START, devices=DEVICES, limit_bytes=limit,
                       start_time="now")


def exit_record(t: int, addr: int = 0x3F8, value: int = 0x41, handler_ns: int = 500,
                vcpu: int = 0, reason: int = KVM_EXIT_IO, rng: int = 0, bus: int = 0,
                size: int = 1, is_write: int = 1, count: int = 1) -> bytes:
    return RECORD.pack(START + t, addr, value, handler_ns, vcpu, reason, rng, count, bus,
                       size, is_write, KIND_EXIT)


def trace_bytes(records: list[bytes], vcpus: int = 1, trailer: bytes = b"",
                end: int | None = None) -> bytes:
    exits = len(records) if end is None else end
    return (header_line(header(vcpus)) + b"".join(records) + trailer +
            trailer_record(KIND_END, exits, START + 10**9))


def sample_trace() -> bytes:
    """Serial writes on vCPU 0, MMIO reads on vCPU 1, a HLT and an access to no device."""
    ms = 1_000_000
    rows = [exit_record(i * ms, value=0x41 + i, handler_ns=1000 + i) for i in range(10)]
    rows += [exit_record(i * ms, addr=0xD0000010, value=7, vcpu=1, reason=KVM_EXIT_MMIO,
                         bus=1, size=4, is_write=0, handler_ns=20_000) for i in range(5)]
    rows += [exit_record(12 * ms, addr=0, value=0, reason=KVM_EXIT_HLT, rng=-1, bus=NO_BUS,
                         size=0, is_write=0, count=0, handler_ns=10),
             exit_record(13 * ms, addr=0x80, rng=-1, value=0)]
    return trace_bytes(rows, vcpus=2, trailer=trailer_record(KIND_DROPPED, 3, START, 1))


# -- the file and the summary --------------------------------------------------------------

def test_the_header_is_one_json_line_that_names_the_format_and_the_devices():
    line = header_line(header())
    data = json.loads(line)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert data["format"] == "pyvmm-exit-trace" and data["version"] == 1
    assert data["devices"]["pio"][1] == {"name": "debug-exit", "base": 0xF4, "length": 1}
    assert RECORD.size == 40


def test_the_record_is_the_c_struct():
    from pyvmm.kvm import ffi
    assert ffi.sizeof("struct pv_trace_rec") == RECORD.size
    for name, offset in (("t_ns", 0), ("addr", 8), ("value", 16), ("handler_ns", 24),
                         ("vcpu", 28), ("reason", 30), ("range", 32), ("count", 34),
                         ("bus", 36), ("size", 37), ("is_write", 38), ("kind", 39)):
        assert ffi.offsetof("struct pv_trace_rec", name) == offset, name


def test_the_cli_default_limit_is_the_writers():
    from pyvmm import cli_trace
    from pyvmm.trace import fileformat
    assert cli_trace.DEFAULT_LIMIT_MIB == fileformat.DEFAULT_LIMIT_MIB


def test_a_trace_is_summarised_by_reason_address_device_and_time():
    summary = summarize_bytes(sample_trace())
    assert summary.exits == 17
    assert summary.by_reason == {"IO": 11, "MMIO": 5, "HLT": 1}
    assert summary.footer.dropped == {1: 3} and summary.footer.over_limit == 0
    busiest = summary.busiest(10)
    assert [(a.bus, a.addr, a.device, a.exits, a.reads, a.writes) for a in busiest] == [
        ("pio", 0x3F8, "serial", 10, 0, 10), ("mmio", 0xD0000010, "virtio-blk", 5, 5, 0),
        ("pio", 0x80, "(no device)", 1, 0, 1)]
    serial = summary.latency["serial"]
    assert serial.count == 10 and serial.max == 1009
    assert 1000 <= serial.percentile(50) <= 1009
    assert summary.latency["virtio-blk"].percentile(99) == 20_000
    assert summary.span_ns == 13_000_000
    text = format_summary(summary, top=5, buckets=4)
    assert text.startswith("17 exits from 2 vCPU(s) over 0.013s")
    assert "3 exits were not recorded: the trace ring was full (vCPU 1: 3)" in text
    assert re.search(r"IO\s+11\s+64.7%", text)
    assert re.search(r"pio\s+0x3f8\s+serial\s+10\s+0\s+10", text)
    assert "exits per second over time" in text and "handler time per device" in text


def test_the_timeline_stays_bounded_and_counts_every_exit():
    rows = [exit_record(t) for t in (0, 10**9, 10**12, 2**63)]
    summary = summarize_bytes(trace_bytes(rows))
    assert len(summary.timeline.bins) <= MAX_BINS
    assert sum(sum(b.values()) for b in summary.timeline.bins) == 4
    width, bins = summary.timeline.rebinned(20, summary.span_ns)
    assert sum(sum(b.values()) for b in bins) == 4 and len(bins) <= 21


def test_latency_percentiles_are_within_a_32nd():
    hist = LatencyHistogram()
    values = list(range(1, 100_001, 7))
    for v in values:
        hist.add(v)
    for p in (50, 90, 99):
        exact = sorted(values)[-(-len(values) * p // 100) - 1]
        assert exact <= hist.percentile(p) <= exact * 33 / 32 + 1, p
    assert hist.percentile(100) == hist.max == values[-1]


def test_over_limit_and_iter_exits(tmp_path):
    path = tmp_path / "t.trace"
    path.write_bytes(trace_bytes([exit_record(5, value=0x42)],
                                 trailer=trailer_record(KIND_OVER_LIMIT, 99, START)))
    summary = load_summary(path)
    assert summary.footer.over_limit == 99
    assert "the file limit (0 MiB) was hit: 99 later exits" in format_summary(summary)
    [one] = list(iter_exits(path))
    assert (one.t_ns, one.bus, one.addr, one.value, one.device, one.is_write) == \
        (5, "pio", 0x3F8, 0x42, "serial", True)


@pytest.mark.parametrize("data, message", [
    (b"", "no header line"),
    (b"not json\n", "not a JSON header"),
    (b'{"format": "other"}\n', "not a pyvmm exit trace"),
    (b'{"format": "pyvmm-exit-trace", "version": 7}\n', "version 7 is not supported"),
    (b'{"format": "pyvmm-exit-trace", "version": 1, "vcpus": 0, "start_ns": 0, '
     b'"limit_bytes": 0}\n', "'vcpus'"),
    (b'{"format": "pyvmm-exit-trace", "version": 1, "vcpus": 1, "start_ns": 0, '
     b'"limit_bytes": 0, "devices": {"pio": [{"name": ""}]}}\n', "no name"),
    (trace_bytes([exit_record(0)])[:-3], "truncated: 37 bytes"),
    (trace_bytes([exit_record(0)])[:-RECORD.size], "truncated: no end record after 1 exits"),
    (trace_bytes([exit_record(0, vcpu=3)]), "vCPU 3"),
    (trace_bytes([exit_record(0, rng=2)]), "device 2 on the pio bus, which has 2"),
    (trace_bytes([exit_record(0, size=3)]), "bad access (size 3"),
    (trace_bytes([exit_record(0, bus=7)]), "unknown bus 7"),
    (trace_bytes([exit_record(0, reason=KVM_EXIT_HLT, bus=NO_BUS, rng=-1, size=0, is_write=0,
                              count=1)]), "an exit that is not I/O has I/O fields"),
    (trace_bytes([exit_record(0)], end=5), "the end record counts 5 exits, the file has 1"),
    (trace_bytes([RECORD.pack(START, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9)]),
     "unknown record kind 9"),
    (trace_bytes([]) + exit_record(0), "after the end record"),
    (header_line(header()) + RECORD.pack(5, 0x3F8, 0, 0, 0, 2, 0, 1, 0, 1, 1, 0),
     "before the trace started"),
])
def test_a_bad_trace_is_one_line(data, message):
    with pytest.raises(TraceError, match=re.escape(message)) as info:
        summarize_bytes(data, "t")
    assert "\n" not in str(info.value)


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_a_trace_or_a_trace_error(data):
    try:
        summarize_bytes(data)
    except TraceError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(st.dictionaries(st.sampled_from(["format", "version", "vcpus", "start_ns", "kernel",
                                        "start_time", "limit_bytes", "devices"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                                 st.just("pyvmm-exit-trace"), st.just(1),
                                 st.lists(st.integers(), max_size=2),
                                 st.fixed_dictionaries({"pio": st.lists(st.dictionaries(
                                     st.sampled_from(["name", "base", "length"]),
                                     st.one_of(st.integers(), st.text(max_size=4))),
                                     max_size=3)}))),
       st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                          st.integers(0, 2**16 - 1), st.integers(-1, 3), st.sampled_from(
                              [0, 1, 255, 7]), st.sampled_from([0, 1, 2, 4, 8, 3]),
                          st.integers(0, 2), st.integers(0, 4)), max_size=6),
       st.binary(max_size=64))
def test_mangled_headers_and_records_are_a_trace_or_a_trace_error(fields, rows, junk):
    records = b"".join(RECORD.pack(t, addr, 0, 0, vcpu % 2, 2, rng, 1, bus, size, w, kind)
                       for t, addr, vcpu, rng, bus, size, w, kind in rows)
    try:
        summary = summarize_bytes(json.dumps(fields).encode() + b"\n" + records + junk)
    except TraceError as exc:
        assert "\n" not in str(exc)
        return
    format_summary(summary)


def test_a_long_trace_is_read_in_bounded_memory(tmp_path):
    """A million exits at a million addresses: streamed, not loaded."""
    import resource
    path = tmp_path / "big.trace"
    with open(path, "wb") as f:
        f.write(header_line(header()))
        for c in range(100):
            f.write(b"".join(exit_record(i * 1000, addr=0x10000 + c * 10_000 + i, rng=-1)
                             for i in range(10_000)))
        f.write(trailer_record(KIND_END, 1_000_000, START))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = load_summary(path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert summary.exits == 1_000_000 and summary.by_reason == {"IO": 1_000_000}
    assert len(summary.addresses) == MAX_ADDRESSES
    assert summary.other_addresses == 1_000_000 - MAX_ADDRESSES
    assert grown_mib < 100, grown_mib          # the file is 38 MiB


# -- pyvmm trace ---------------------------------------------------------------------------------

def pyvmm(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_pyvmm_trace_prints_the_summary_and_plots(tmp_path):
    try:
        import matplotlib  # noqa: F401 - scripts/setup installs it (the `plot` extra)
    except ImportError:
        if os.environ.get("PYVMM_REQUIRE_KVM") == "1":      # CI: setup must have run
            pytest.fail("matplotlib is not installed: run scripts/setup")
        pytest.skip("matplotlib is not installed")
    path, svg, png = tmp_path / "t.trace", tmp_path / "t.svg", tmp_path / "t.png"
    path.write_bytes(sample_trace())
    result = pyvmm("trace", str(path), "--top", "2", "--plot", str(svg))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("17 exits from 2 vCPU(s)")
    assert "busiest ports and addresses (top 2)" in result.stdout
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    assert pyvmm("trace", str(path), "--plot", str(png)).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("which", ["garbage", "truncated", "missing", "device", "plot"])
def test_pyvmm_trace_on_bad_input_is_one_line_and_status_1(tmp_path, which):
    path = tmp_path / "t.trace"
    data = {"garbage": b"garbage\n", "truncated": sample_trace()[:-50]}.get(which,
                                                                            sample_trace())
    path.write_bytes(data)
    if which == "missing":
        path.unlink()
    argv = ["trace", "/dev/zero" if which == "device" else str(path)]
    if which == "plot":
        argv += ["--plot", str(tmp_path / "out.gif")]
    result = pyvmm(*argv)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("pyvmm: error:")
    assert "Traceback" not in result.stderr


def test_trace_limit_without_a_trace_file_is_refused(echo_kernel):
    result = pyvmm("run", "--kernel", echo_kernel, "--trace-limit", "5", "--no-api")
    assert result.returncode != 0 and "--trace-limit needs --trace" in result.stderr
    assert "Traceback" not in result.stderr


# -- with KVM: tiny guests with a known number of accesses -------------------------------------

SCRATCH_PORT = 0x500
PY_PORT = 0x1600            # past the scratch device's 4 KiB of ports
PORT_WRITES, PORT_READS, MMIO_WRITES = 7, 5, 3
KNOWN_GUEST = f"""
    mov ${PORT_WRITES}, %ecx
    mov ${SCRATCH_PORT}, %dx
1:  mov %ecx, %eax
    out %al, %dx                  # PORT_WRITES one-byte writes: 7, 6, ... 1
    dec %ecx
    jnz 1b
    mov ${PORT_READS}, %ecx
    mov ${PY_PORT}, %dx
2:  in %dx, %ax                   # PORT_READS two-byte reads from the Python device
    dec %ecx
    jnz 2b
    mov $0xd0000000, %rbx
    movl $0x11223344, 0x10(%rbx)  # MMIO_WRITES four-byte writes to the C scratch
    movl $0x55667788, 0x14(%rbx)
    movq $0x99, 0x18(%rbx)
    mov $0x2a, %eax
    mov $0xf4, %dx
    out %al, %dx                  # debug-exit: the run ends
"""


class Counter:
    """A Python device: reads count up from 1."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, offset: int, size: int) -> bytes:
        self.reads += 1
        return self.reads.to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        pass


def known_vm():
    from pyvmm.devices.debug import Scratch
    from pyvmm.machine import Bus
    from pyvmm.testbed import TEST_MMIO_BASE, Mode, TinyVm, assemble
    vm = TinyVm(Mode.LONG_RING0)
    Scratch(vm.machine, Bus.PIO, SCRATCH_PORT)
    vm.machine.add_device(Bus.PIO, PY_PORT, 2, Counter(), "counter")
    Scratch(vm.machine, Bus.MMIO, TEST_MMIO_BASE, name="mmio-scratch")
    vm.load(assemble(KNOWN_GUEST, Mode.LONG_RING0))
    return vm


@pytest.mark.kvm
def test_every_access_of_a_tiny_guest_is_in_its_trace(tmp_path):
    from pyvmm.trace.recorder import TraceRecorder
    path = tmp_path / "known.trace"
    with known_vm() as vm:
        recorder = TraceRecorder(vm.machine, path)
        outcome = vm.run(timeout=60)
        assert outcome.kind.name == "DEVICE_STOP" and vm.exit_value == 0x2A
        counters = vm.machine.stats()
    assert recorder.error is None
    assert recorder.stats.written == recorder.stats.recorded == PORT_WRITES + PORT_READS + \
        MMIO_WRITES + 1 and recorder.stats.dropped == 0
    exits = list(iter_exits(path))
    assert [(e.bus, e.addr, e.size, e.is_write, e.value, e.device) for e in exits] == \
        [("pio", SCRATCH_PORT, 1, True, n, "scratch") for n in range(PORT_WRITES, 0, -1)] + \
        [("pio", PY_PORT, 2, False, n, "counter") for n in range(1, PORT_READS + 1)] + \
        [("mmio", 0xD0000010, 4, True, 0x11223344, "mmio-scratch"),
         ("mmio", 0xD0000014, 4, True, 0x55667788, "mmio-scratch"),
         ("mmio", 0xD0000018, 8, True, 0x99, "mmio-scratch"),
         ("pio", 0xF4, 1, True, 0x2A, "debug-exit")]
    assert all(e.vcpu == 0 and e.count == 1 and e.handler_ns > 0 for e in exits)
    assert [e.t_ns for e in exits] == sorted(e.t_ns for e in exits)
    assert {e.reason for e in exits} == {KVM_EXIT_IO, KVM_EXIT_MMIO}
    summary = load_summary(path)
    assert summary.by_reason == counters["vcpus"][0] == \
        {"IO": PORT_WRITES + PORT_READS + 1, "MMIO": MMIO_WRITES}
    assert {d: h.count for d, h in summary.latency.items()} == \
        {"scratch": PORT_WRITES, "counter": PORT_READS, "mmio-scratch": MMIO_WRITES,
         "debug-exit": 1}
    text = format_summary(summary)
    assert re.search(rf"pio\s+0x500\s+scratch\s+{PORT_WRITES}\s+0\s+{PORT_WRITES}", text)
    assert re.search(rf"pio\s+0x1600\s+counter\s+{PORT_READS}\s+{PORT_READS}\s+0", text)


@pytest.mark.kvm
def test_a_full_ring_counts_drops_and_never_blocks_the_vcpu(tmp_path):
    from pyvmm.trace import recorder as rec
    path = tmp_path / "small.trace"
    with known_vm() as vm:
        # A 4-record ring that is drained only after the run: the rest must be dropped.
        slow = rec.TraceRecorder(vm.machine, path, ring_records=4, drain_interval_s=3600)
        outcome = vm.run(timeout=60)
        assert outcome.kind.name == "DEVICE_STOP"
    total = PORT_WRITES + PORT_READS + MMIO_WRITES + 1
    assert slow.stats.recorded == 4 and slow.stats.dropped == total - 4
    summary = load_summary(path)
    assert summary.exits == 4 and summary.footer.dropped == {0: total - 4}
    assert f"{total - 4} exits were not recorded" in format_summary(summary)


@pytest.mark.kvm
def test_the_file_limit_is_kept_and_said(tmp_path, monkeypatch):
    from pyvmm.trace import recorder as rec
    path = tmp_path / "limited.trace"
    monkeypatch.setattr(rec, "MiB", 1)          # limits in bytes, for a test this small
    with known_vm() as vm:
        head = header_line(TraceHeader(vcpus=1, start_ns=2**40, devices=rec._devices(
            vm.machine), limit_bytes=2**20, start_time="2026-12-01T04:41:37.000+00:00"))
        # Room for 5 exit records beside the header and the trailer's reserve.
        limit = len(head) + (rec.TRAILER_RESERVE + 1 + 5) * RECORD.size + 20
        recorder = rec.TraceRecorder(vm.machine, path, limit_mib=limit)
        assert vm.run(timeout=60).kind.name == "DEVICE_STOP"
    stats = recorder.stats
    assert stats.limit_hit and stats.written + stats.over_limit == stats.recorded
    assert stats.written == 5 and path.stat().st_size <= limit
    summary = load_summary(path)
    assert summary.exits == stats.written and summary.footer.over_limit == stats.over_limit


@pytest.mark.kvm
def test_without_a_trace_there_is_no_ring_and_no_file(tmp_path, monkeypatch):
    from pyvmm.kvm import ffi, lib
    monkeypatch.chdir(tmp_path)
    ring = ffi.new("struct pv_trace_ring *")
    recs = ffi.new("struct pv_trace_rec[]", 1)
    ring.recs, ring.capacity = recs, 1
    with known_vm() as vm:
        assert vm.run(timeout=60).kind.name == "DEVICE_STOP"
        # The vCPU ran without a ring: giving it one now is accepted, not -EEXIST.
        assert lib.pv_vcpu_trace_enable(vm.machine.vcpus[0]._native, ring) == 0
        assert lib.pv_vcpu_trace_enable(vm.machine.vcpus[0]._native, ring) == -17
    assert ring.recorded == 0 and list(tmp_path.iterdir()) == []


def test_a_microvm_without_trace_has_no_recorder(echo_kernel):
    from pyvmm.microvm import MicroVM
    vm = MicroVM(kernel=echo_kernel)
    assert vm.trace is None and vm.tracer is None
    vm.close()


@pytest.mark.kvm
def test_a_rep_outs_is_traced_with_its_element_count(tmp_path):
    """KVM may split a `rep outsb` into exits of several bytes each: their counts add up
    to the string's length, and each value is the first byte of its exit's part."""
    from pyvmm.testbed import Mode, TinyVm, assemble
    from pyvmm.trace.recorder import TraceRecorder
    message = b"traced by pyvmm\n"
    path = tmp_path / "rep.trace"
    with TinyVm(Mode.LONG_RING0) as vm:
        vm.load(assemble(f"""
            lea msg(%rip), %rsi
            mov ${len(message)}, %ecx
            mov $0xe9, %dx
            rep outsb
            hlt
        msg: .ascii "{message.decode().strip()}\\n"
        """, Mode.LONG_RING0))
        TraceRecorder(vm.machine, path)
        assert vm.run(timeout=60).kind.name == "HALT"
        assert vm.output == message
    exits = list(iter_exits(path))
    console = [e for e in exits if e.device == "debugcon"]
    assert sum(e.count for e in console) == len(message), console
    offsets = [sum(e.count for e in console[:i]) for i in range(len(console))]
    assert [e.value for e in console] == [message[i] for i in offsets]
    assert (exits[-1].reason, exits[-1].bus, exits[-1].count, exits[-1].size) == (KVM_EXIT_HLT, None, 0, 0)

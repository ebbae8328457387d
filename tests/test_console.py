"""The host side of the console under a chatty or hostile guest: output leaves in
chunks, a console file has a size cap, the capture stays capped, and output files
are never reached through a symbolic link."""
from __future__ import annotations

import os
import time

import pytest

from pyvmm.console import CAPTURE_LIMIT, ConsoleCapture, ConsoleError, ConsoleSink
from pyvmm.devices.uart import RBR_THR, Uart
from pyvmm.microvm import MicroVM
from tests.framework.images import pvh_elf

# 32-bit PVH code that writes 300,000 'A's to COM1 as fast as it can, then resets: a
# guest that floods its console (and ends by itself, so that it can never go on
# eating a slow CI machine's CPU after its test).
FLOOD_BYTES = 300_000
FLOOD_CODE = bytes.fromhex("66baf803" "b041"            # mov $0x3f8,%dx; mov $'A',%al
                           "b9") + FLOOD_BYTES.to_bytes(4, "little") + \
    bytes.fromhex("ee" "e2fd" "b0fe" "e664" "f4")       # mov $n,%ecx; 1: out; loop 1b;
                                                        # then reset through the i8042


def _uart_into(sink: ConsoleSink) -> tuple[Uart, ConsoleCapture]:
    capture = ConsoleCapture()
    capture.sink = sink
    return Uart(capture.write), capture


def test_byte_by_byte_output_leaves_in_chunks(tmp_path):
    sink = ConsoleSink(f"file:{tmp_path / 'console'}")
    uart, capture = _uart_into(sink)
    for _ in range(50_000):
        uart.write(RBR_THR, b"x")          # one guest `out` per byte, as Linux does
    capture.close()
    assert (tmp_path / "console").read_bytes() == b"x" * 50_000
    assert sink.written == 50_000 and sink.dropped == 0
    assert sink.system_calls < 5_000, "not one write(2) per guest byte"


def test_a_console_file_stops_at_its_limit_and_counts_the_rest(tmp_path):
    sink = ConsoleSink(f"file:{tmp_path / 'console'}", limit=10_000)
    uart, capture = _uart_into(sink)
    for _ in range(30_000):
        uart.write(RBR_THR, b"y")
    capture.close()
    assert os.path.getsize(tmp_path / "console") == 10_000
    assert (sink.written, sink.dropped) == (10_000, 20_000)
    assert capture.since(0) == (0, b"y" * 30_000)     # the capture still has it all


def test_the_capture_keeps_the_last_bytes_with_their_positions():
    capture = ConsoleCapture(limit=1000)
    for i in range(30):
        capture.write(bytes([65 + i % 26]) * 100)
    assert capture.end == 3000
    start, data = capture.since(0)
    assert (start, len(data)) == (2000, 1000)
    assert capture.since(2950) == (2950, data[-50:])


def test_a_fifo_nobody_reads_never_blocks_the_guest(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sink = ConsoleSink(f"file:{fifo}")
    uart, capture = _uart_into(sink)
    started = time.monotonic()
    for _ in range(200_000):
        uart.write(RBR_THR, b"z")
    capture.close()
    assert time.monotonic() - started < 60
    assert sink.written + sink.dropped == 200_000 and sink.dropped > 0


@pytest.mark.parametrize("kind", ["symlink", "directory", "device"])
def test_console_outputs_must_be_files_or_fifos_reached_directly(tmp_path, kind):
    target = tmp_path / "real"
    target.write_bytes(b"")
    path = tmp_path / kind
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "directory":
        path.mkdir()
    else:
        path = "/dev/null"
    with pytest.raises(ConsoleError, match="symbolic link|directory|neither a regular"):
        ConsoleSink(f"file:{path}")
    assert target.read_bytes() == b""


@pytest.mark.kvm
def test_a_guest_flooding_its_console_fills_only_its_quota(tmp_path):
    kernel = tmp_path / "flood.elf"
    kernel.write_bytes(pvh_elf(FLOOD_CODE))
    out = tmp_path / "console"
    with MicroVM(kernel=kernel, boot_args="", mem_mib=32, serial_out_path=out) as vm:
        vm.spec.serial.serial_out_max_bytes = 100_000
        vm.start()
        assert vm.wait(timeout=600) is not None, "the flood guest did not end"
        stats = vm.stats
    assert os.path.getsize(out) == 100_000
    assert stats["console"]["dropped"] == FLOOD_BYTES - 100_000, stats["console"]
    assert stats["console"]["system_calls"] < 100_000 // 4
    assert stats["serial_tx_bytes"] == FLOOD_BYTES
    assert len(vm.capture.since(0)[1]) <= CAPTURE_LIMIT

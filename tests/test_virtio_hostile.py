"""A hostile guest against the virtio devices (issue 11), driven from the host
with no KVM: regression tests for each finding, then typed fuzzing.

The fuzzing builds *valid-looking* requests of each kind for each device
(virtio-blk IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES; virtio-net TX
frames and RX buffer shapes; virtio-rng buffers; indirect tables), corrupts
them, and checks for every request that

- the VMM survives: the kick returns, the I/O thread keeps nothing unbounded;
- the request gets an answer (a used element, and for virtio-blk a status
  byte) or the device fails cleanly (DEVICE_NEEDS_RESET);
- no guest RAM changes outside the device-writable buffers of the ring's
  descriptors (and of indirect tables they point to) and the used ring;
- the Python memory a kick allocates (tracemalloc peak) stays under
  PEAK_BYTES_PER_REQUEST, and a kick takes under SECONDS_PER_REQUEST.

Budget: EXAMPLES examples per property (200 by default, about 20 s for the
whole module on a 2-core machine); set PYVMM_FUZZ_EXAMPLES=1000 for a longer
run.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import subprocess
import threading
import time
import tracemalloc
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices import disk as disk_module
from pyvmm.devices.disk import DiskError, RawDisk
from pyvmm.devices.iothread import RECENT_ERRORS as IO_RECENT_ERRORS, IoThread
from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.blk import MAX_WRITE_ZEROES_SECTORS, S_IOERR, S_OK, S_UNSUPP, \
    T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES, Block
from pyvmm.devices.virtio.device import CHAINS_PER_SLICE, DEVICE_NEEDS_RESET, RECENT_ERRORS, \
    REQUEST_MEMORY_BOUND
from pyvmm.devices.virtio.driver import HostDriver
from pyvmm.devices.virtio.net import F_MRG_RXBUF, MAX_PACKET, RX, TX, Net
from pyvmm.devices.virtio.queue import DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, \
    VIRTQ_DESC_F_WRITE
from pyvmm.devices.virtio.rng import Rng
from pyvmm.memory import GuestMemory, MiB
from tests.framework.virtio import DISK_SECTORS, Irq, disk  # noqa: F401 - a fixture

MEM = 1 * MiB                      # small: addresses just past it are outside RAM
QUEUE_SIZE = 16
EXAMPLES = int(os.environ.get("PYVMM_FUZZ_EXAMPLES", "200"))
# What one request may cost the VMM: the device's own buffers, plus a small
# object (a memoryview, a list slot) per descriptor of a chain at most the queue size.
PER_DESCRIPTOR_BYTES = 1024
PEAK_BYTES_PER_REQUEST = REQUEST_MEMORY_BOUND + PER_DESCRIPTOR_BYTES * QUEUE_SIZE
SECONDS_PER_REQUEST = 0.5          # generous: tracemalloc is on, CI machines are noisy
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
DESC = struct.Struct("<QIHH")


@pytest.fixture()
def memory():
    mem = GuestMemory([(0, MEM)])
    yield mem
    mem.close()


@dataclass
class Rig:
    """One device on a transport, its driver on queue 0, and what to close."""
    device: object
    transport: mmio.VirtioMmio
    driver: HostDriver
    irq: Irq
    closers: list = field(default_factory=list)

    def close(self) -> None:
        self.transport.close()
        for close in self.closers:
            close()


def blk_rig(memory, path, queue_size=QUEUE_SIZE, read_only=False) -> Rig:
    device = Block(path, read_only=read_only, serial="hostile")
    irq = Irq()
    transport = mmio.VirtioMmio(device, memory, irq)
    driver = HostDriver(transport, memory, queue_size=queue_size)
    driver.setup()
    return Rig(device, transport, driver, irq)


def blk_request(rig: Rig, rtype: int, sector: int, data: list[tuple[int, int, bool]] = (),
                payloads: dict[int, bytes] | None = None) -> tuple[int, int]:
    """Submit header, data buffers, status; kick; returns (status byte, used count)."""
    driver, mem = rig.driver, rig.driver.memory
    header, status = driver.data, driver.data + 0x40
    mem.write(header, struct.pack("<IIQ", rtype, 0, sector))
    mem.write(status, b"\xee")
    for addr, payload in (payloads or {}).items():
        mem.write(addr, payload)
    driver.submit([(header, 16, False), *data, (status, 1, True)])
    driver.kick()
    return mem.read(status, 1)[0], len(driver.used())


def segment(sector: int, count: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, count, flags)


def needs_reset(transport: mmio.VirtioMmio) -> bool:
    return bool(transport.status & DEVICE_NEEDS_RESET)


# -- Build 1: every request has a budget and an outcome ------------------------------

def test_any_exception_while_serving_fails_the_device_the_virtio_way(memory, disk):
    rig = blk_rig(memory, disk)

    def broken_backend(buffers, offset):
        raise ValueError("a backend bug")
    rig.device.disk.read_into = broken_backend
    before = rig.irq.count
    status, used = blk_request(rig, T_IN, 0, [(rig.driver.data + 0x1000, 512, True)])
    assert needs_reset(rig.transport) and rig.transport.interrupt_status & mmio.INT_CONFIG
    assert rig.irq.count == before + 1
    assert rig.device.stats["failures"] == 1
    assert list(rig.device.recent_errors) == ["ValueError: a backend bug"]
    assert rig.transport.report()["recent_errors"] == ["ValueError: a backend bug"]
    rig.close()


def test_a_device_keeps_a_count_and_only_the_last_few_failure_messages(memory, disk):
    rig = blk_rig(memory, disk)
    for n in range(RECENT_ERRORS * 3):
        rig.driver.write_desc(0, MEM + 0x1000 * n, 0, 0, 0)        # an empty buffer off RAM
        rig.driver.publish(0)
        rig.driver.kick()
        assert needs_reset(rig.transport)
        rig.driver = HostDriver(rig.transport, memory, queue_size=QUEUE_SIZE)
        rig.driver.setup()
    assert rig.device.stats["failures"] == RECENT_ERRORS * 3
    assert len(rig.device.recent_errors) == RECENT_ERRORS
    assert f"{MEM + 0x1000 * (RECENT_ERRORS * 3 - 1):#x}" in rig.device.recent_errors[-1]
    rig.close()


def test_an_empty_buffer_outside_guest_ram_is_a_broken_ring(memory, disk):
    rig = blk_rig(memory, disk)
    status, used = blk_request(rig, T_FLUSH, 0, [(MEM + 0x10000, 0, False)])
    assert needs_reset(rig.transport) and "outside guest RAM" in rig.transport.error
    assert used == 0
    rig.close()


def test_the_io_thread_counts_errors_and_keeps_a_bounded_tail(memory):
    io = IoThread("hostile-io")
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    served = threading.Semaphore(0)

    def failing_handler():
        served.release()
        raise RuntimeError("handler bug")
    io.add_eventfd(fd, failing_handler)
    io.start()
    try:
        for _ in range(3 * IO_RECENT_ERRORS):
            os.eventfd_write(fd, 1)
            assert served.acquire(timeout=5)
        deadline = time.monotonic() + 5
        while io.error_count < 3 * IO_RECENT_ERRORS and time.monotonic() < deadline:
            time.sleep(0.01)
        assert io.error_count == 3 * IO_RECENT_ERRORS
        assert list(io.recent_errors) == ["RuntimeError: handler bug"] * IO_RECENT_ERRORS
    finally:
        io.stop()
        os.close(fd)


def test_an_indirect_table_longer_than_the_queue_is_a_broken_ring(memory, disk):
    rig = blk_rig(memory, disk)
    driver = rig.driver
    table, header, status = driver.data + 0x1000, driver.data, driver.data + 0x40
    memory.write(header, struct.pack("<IIQ", T_FLUSH, 0, 0))
    entries = 2 * QUEUE_SIZE                   # header, empty buffers, status: a valid chain
    for i in range(entries):
        addr, length, flags = (header, 16, 0) if i == 0 else \
            (status, 1, VIRTQ_DESC_F_WRITE) if i == entries - 1 else (header, 0, 0)
        flags |= VIRTQ_DESC_F_NEXT if i < entries - 1 else 0
        memory.write(table + DESC_SIZE * i, DESC.pack(addr, length, flags, i + 1))
    driver.write_desc(0, table, DESC_SIZE * entries, VIRTQ_DESC_F_INDIRECT, 0)
    driver.publish(0)
    driver.kick()
    assert needs_reset(rig.transport) and "indirect table" in rig.transport.error
    rig.close()


def test_discard_honours_max_discard_seg(memory, disk):
    rig = blk_rig(memory, disk)
    segments = rig.driver.data + 0x1000
    status, _ = blk_request(rig, T_DISCARD, 0, [(segments, 32, False)],
                            {segments: segment(0, 8) + segment(16, 8)})
    assert status == S_UNSUPP and not needs_reset(rig.transport)
    rig.close()


def test_millions_of_tiny_segments_are_refused_at_once(memory, disk):
    # 14 buffers of 64 KiB on the same guest page range: 57,344 segments of
    # "discard 0 sectors", which used to be carried out one by one.
    rig = blk_rig(memory, disk)
    zeros = rig.driver.data + 0x1000
    memory.fill(zeros, 64 * 1024)
    data = [(zeros, 64 * 1024, False)] * (QUEUE_SIZE - 2)
    started = time.perf_counter()
    status, used = blk_request(rig, T_DISCARD, 0, data)
    assert time.perf_counter() - started < 0.05
    assert status == S_UNSUPP and used == 1
    rig.close()


def test_write_zeroes_honours_the_advertised_sector_limit(memory, tmp_path):
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(2 * MAX_WRITE_ZEROES_SECTORS * 512)          # sparse
    rig = blk_rig(memory, big)
    assert struct.unpack_from("<II", rig.device.config, 48) == (MAX_WRITE_ZEROES_SECTORS, 1)
    segments = rig.driver.data + 0x1000
    status, _ = blk_request(rig, T_WRITE_ZEROES, 0, [(segments, 16, False)],
                            {segments: segment(0, MAX_WRITE_ZEROES_SECTORS + 1)})
    assert status == S_IOERR
    status, _ = blk_request(rig, T_WRITE_ZEROES, 0, [(segments, 16, False)],
                            {segments: segment(0, MAX_WRITE_ZEROES_SECTORS)})
    assert status == S_OK and rig.device.stats["bytes_zeroed"] == MAX_WRITE_ZEROES_SECTORS * 512
    rig.close()


@pytest.mark.parametrize("rtype, flags", [(T_DISCARD, 1), (T_DISCARD, 2), (T_WRITE_ZEROES, 4)])
def test_unmap_on_discard_and_reserved_flags_are_unsupported(memory, disk, rtype, flags):
    rig = blk_rig(memory, disk)
    segments = rig.driver.data + 0x1000
    status, _ = blk_request(rig, rtype, 0, [(segments, 16, False)],
                            {segments: segment(0, 8, flags)})
    assert status == S_UNSUPP
    rig.close()


def test_write_zeroes_without_fallocate_uses_a_small_buffer_and_finishes_short_writes(
        memory, disk, monkeypatch):
    def no_fallocate(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not here")
    real_pwrite = os.pwrite

    def short_pwrite(fd, data, offset):
        return real_pwrite(fd, data[:1000], offset)          # never more than 1000 bytes
    monkeypatch.setattr(disk_module, "_fallocate", no_fallocate)
    monkeypatch.setattr(disk_module.os, "pwrite", short_pwrite)
    rig = blk_rig(memory, disk)
    segments = rig.driver.data + 0x1000
    before = disk.read_bytes()
    memory.write(segments, segment(8, DISK_SECTORS - 16, 1))
    tracemalloc.start()
    try:
        status, _ = blk_request(rig, T_WRITE_ZEROES, 0, [(segments, 16, False)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    after = disk.read_bytes()
    assert status == S_OK
    assert after[8 * 512:(DISK_SECTORS - 8) * 512] == bytes((DISK_SECTORS - 16) * 512)
    assert after[:8 * 512] == before[:8 * 512] and after[-8 * 512:] == before[-8 * 512:]
    assert peak < PEAK_BYTES_PER_REQUEST, peak
    rig.close()


def _chains_of_one_flush(rig: Rig, count: int) -> None:
    mem, driver = rig.driver.memory, rig.driver
    for j in range(count):
        header, status = driver.data + 32 * j, driver.data + 0x1000 + j
        mem.write(header, struct.pack("<IIQ", T_FLUSH, 0, 0))
        driver.submit([(header, 16, False), (status, 1, True)])


def test_a_kick_serves_one_slice_then_yields_and_loses_nothing(memory, disk):
    rig = blk_rig(memory, disk, queue_size=256)
    deferred = []
    rig.transport.defer = deferred.append
    _chains_of_one_flush(rig, CHAINS_PER_SLICE + 20)
    rig.driver.kick()
    assert len(rig.driver.used()) == CHAINS_PER_SLICE and len(deferred) == 1
    deferred.pop()()                           # what the I/O thread runs on its next round
    assert len(rig.driver.used()) == 20 and deferred == []
    rig.close()


class BlockedBackend:
    """A disk read that waits until the test lets it go, to hold the I/O thread
    inside a request."""

    def __init__(self, device: Block) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.real = device.disk.read_into
        device.disk.read_into = self

    def __call__(self, buffers, offset):
        self.entered.set()
        self.release.wait(10)
        return self.real(buffers, offset)


def _serve_in_background(rig: Rig) -> tuple[threading.Thread, BlockedBackend]:
    backend = BlockedBackend(rig.device)
    rig.driver.memory.write(rig.driver.data, struct.pack("<IIQ", T_IN, 0, 0))
    rig.driver.submit([(rig.driver.data, 16, False), (rig.driver.data + 0x1000, 512, True),
                       (rig.driver.data + 0x40, 1, True)])
    io = threading.Thread(target=rig.driver.kick)
    io.start()
    assert backend.entered.wait(5)
    return io, backend


def _in_thread(call) -> threading.Thread:
    thread = threading.Thread(target=call)
    thread.start()
    return thread


def test_reading_interrupt_status_never_waits_for_a_request(memory, disk):
    rig = blk_rig(memory, disk)
    io, backend = _serve_in_background(rig)
    try:
        vcpu = _in_thread(lambda: (rig.transport.read(mmio.INTERRUPT_STATUS, 4),
                                   rig.transport.write(mmio.INTERRUPT_ACK, b"\1\0\0\0"),
                                   rig.transport.read(mmio.CONFIG, 8)))
        vcpu.join(2)
        assert not vcpu.is_alive(), "the vCPU waited for the disk request"
    finally:
        backend.release.set()
        io.join(5)
    assert rig.driver.used() and rig.transport.active
    rig.close()


def test_a_reset_waits_for_the_request_then_no_queue_is_touched(memory, disk):
    rig = blk_rig(memory, disk)
    io, backend = _serve_in_background(rig)
    used_idx = rig.driver.layout.used + 2
    try:
        reset = _in_thread(lambda: rig.transport.write(mmio.STATUS, bytes(4)))
        reset.join(0.2)
        assert reset.is_alive(), "the reset did not wait for the request being served"
    finally:
        backend.release.set()
        io.join(5)
    reset.join(5)
    assert rig.transport.status == 0 and rig.device.queues[0].memory is None
    assert memory.read_int(used_idx, 2) == 1          # the request finished before the reset
    _chains_of_one_flush(rig, 1)
    rig.transport.notify(0)                           # a late kick: nothing is served
    assert memory.read_int(used_idx, 2) == 1
    rig.close()


# -- Build 4: the disk backend -------------------------------------------------------

def test_an_image_open_read_write_is_locked_against_a_second_vm(disk):
    first = RawDisk(disk)
    with pytest.raises(DiskError, match=f"disk image {disk} is in use: another VM holds it"):
        RawDisk(disk)
    with pytest.raises(DiskError, match="in use"):
        RawDisk(disk, read_only=True)
    first.close()
    readers = [RawDisk(disk, read_only=True), RawDisk(disk, read_only=True)]
    with pytest.raises(DiskError, match="for writing|in use"):
        RawDisk(disk)
    for reader in readers:
        reader.close()
    RawDisk(disk).close()                             # free again once they are closed


def test_swapping_in_the_same_image_keeps_its_lock_and_takes_its_new_size(memory, disk):
    rig = blk_rig(memory, disk)
    with open(disk, "ab") as f:
        f.write(bytes(512 * 8))
    rig.device.replace_backing(disk)
    assert struct.unpack_from("<Q", rig.device.config)[0] == DISK_SECTORS + 8
    with pytest.raises(DiskError, match="in use"):
        RawDisk(disk)
    rig.close()


def test_a_fifo_is_not_a_disk_image(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DiskError, match="not a regular file or a block device"):
        RawDisk(fifo, read_only=True)


@pytest.fixture()
def loop_device(tmp_path):
    image = tmp_path / "loop.img"
    image.write_bytes(bytes(512 * 300))
    try:
        attached = subprocess.run(["losetup", "--find", "--show", str(image)],
                                  capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("no losetup")
    if attached.returncode != 0:
        pytest.skip(f"cannot attach a loop device: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    yield device
    subprocess.run(["losetup", "--detach", device], timeout=10)


def test_a_block_device_reports_its_real_size(loop_device, memory):
    assert stat.S_ISBLK(os.stat(loop_device).st_mode) and os.stat(loop_device).st_size == 0
    backend = RawDisk(loop_device, read_only=True)
    assert backend.size == 512 * 300
    backend.close()


# -- Build 5: typed hostile fuzzing --------------------------------------------------

@dataclass
class Outcome:
    answered: bool              # a used element came back for the request
    failed: bool                # the device asks for a reset


def _ranges_of_writable_descriptors(memory: GuestMemory, desc: int, count: int,
                                    nested: bool = False) -> list:
    """(addr, length) of every device-writable descriptor in the ring's table and in
    every indirect table it points to: the only RAM a device may write."""
    ranges = []
    for i in range(count):
        addr, length, flags, _ = DESC.unpack(memory.read(desc + DESC_SIZE * i, DESC_SIZE))
        if flags & VIRTQ_DESC_F_INDIRECT and not nested and memory.contains(addr, length):
            ranges += _ranges_of_writable_descriptors(
                memory, addr, min(length // DESC_SIZE, 4 * QUEUE_SIZE), nested=True)
        elif flags & VIRTQ_DESC_F_WRITE:
            ranges.append((addr, length))
    return ranges


def kick_within_bounds(rig: Rig, kick=None) -> Outcome:
    """Kick queue 0 (or call kick) and check what the module docstring promises."""
    memory, driver = rig.driver.memory, rig.driver
    allowed = _ranges_of_writable_descriptors(memory, driver.layout.desc, driver.size)
    allowed.append((driver.layout.used, 4 + 8 * driver.size + 2))
    before = memory.read(0, MEM)
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    (kick or driver.kick)()
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] - baseline
    after = memory.read(0, MEM)
    expected = bytearray(before)
    for addr, length in allowed:
        end = min(addr + length, MEM)
        if addr < end:
            expected[addr:end] = after[addr:end]
    assert expected == after, "the device wrote guest RAM outside the writable buffers"
    assert peak < PEAK_BYTES_PER_REQUEST, f"a request allocated {peak} bytes"
    assert elapsed < SECONDS_PER_REQUEST, f"a request took {elapsed:.3f} s"
    return Outcome(answered=bool(driver.used()), failed=needs_reset(rig.transport))


@pytest.fixture()
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


# A descriptor as the strategies build it: [addr, len, writable]; corruptions act on
# the descriptors as written ([addr, len, flags, next]).
sectors = st.one_of(st.integers(0, DISK_SECTORS + 8), st.integers(0, 2**64 - 1))
sector_counts = st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1))


def split(length: int, cuts: list[int]) -> list[int]:
    """length split at the given cut points (each taken modulo length)."""
    points = sorted({c % length for c in cuts if length} | {0, length})
    return [b - a for a, b in zip(points, points[1:])] or [0]


@st.composite
def blk_requests(draw) -> tuple[list[bytes], list[list]]:
    """(readable payloads in order, buffers [length, writable]) of one well-formed request."""
    rtype = draw(st.sampled_from([T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES]))
    header = struct.pack("<IIQ", rtype, 0, draw(sectors))
    cuts = draw(st.lists(st.integers(0, 1 << 20), max_size=4))
    readable, writable = header, 0
    if rtype in (T_IN, T_OUT):
        length = 512 * draw(st.integers(0, 16))
        if rtype == T_OUT:
            readable += bytes(length)
        else:
            writable = length
    elif rtype == T_GET_ID:
        writable = draw(st.sampled_from([20, 1, 64]))
    elif rtype in (T_DISCARD, T_WRITE_ZEROES):
        count = draw(st.integers(1, 3))
        readable += b"".join(segment(draw(sectors), draw(sector_counts),
                                     draw(st.sampled_from([0, 1, 2, 0xFFFFFFFF])))
                             for _ in range(count))
    buffers = [[16, False]] + [[n, False] for n in split(len(readable) - 16, cuts) if n] + \
        [[n, True] for n in split(writable, cuts) if n] + [[1, True]]
    return readable, buffers


CORRUPTIONS = st.lists(st.tuples(
    st.sampled_from(["addr", "len", "flags", "next", "type", "drop"]),
    st.integers(0, QUEUE_SIZE - 1),
    st.one_of(st.integers(0, MEM + 0x1000), st.integers(0, 2**64 - 1), st.just(0))),
    max_size=3)


def lay_out(rig: Rig, readable: bytes, buffers: list[list], corruptions: list,
            indirect: bool) -> int:
    """Write the request's bytes and descriptors (in an indirect table if asked),
    apply the corruptions, publish it; returns its head."""
    memory, driver = rig.driver.memory, rig.driver
    addr, table = driver.data, []
    stream = memoryview(readable)
    for length, writable in buffers:
        if not writable:
            memory.write(addr, bytes(stream[:length]))
            stream = stream[length:]
        table.append([addr, length, VIRTQ_DESC_F_WRITE if writable else 0, len(table) + 1])
        addr += (length + 0xFFF) & ~0xFFF
    for desc in table[:-1]:
        desc[2] |= VIRTQ_DESC_F_NEXT
    for kind, index, value in corruptions:
        desc = table[index % len(table)]
        if kind == "addr":
            desc[0] = value
        elif kind == "len":
            desc[1] = value & 0xFFFFFFFF
        elif kind == "flags":
            desc[2] = value & 0xFFFF
        elif kind == "next":
            desc[3] = value & 0xFFFF
        elif kind == "type":                    # the request's first bytes
            memory.write(driver.data, (value & 0xFFFFFFFF).to_bytes(4, "little"))
        elif kind == "drop" and len(table) > 1:
            table.pop(index % len(table))
    indirect_at = driver.data + 0x80000
    target = indirect_at if indirect else driver.layout.desc
    for i, (a, n, flags, nxt) in enumerate(table):
        memory.write(target + DESC_SIZE * i, DESC.pack(a & (2**64 - 1), n, flags, nxt))
    if indirect:
        driver.write_desc(0, indirect_at, DESC_SIZE * len(table), VIRTQ_DESC_F_INDIRECT, 0)
    driver.publish(0)
    driver.next_desc = 1 if indirect else len(table)
    return 0


@FUZZ
@given(request=blk_requests(), corruptions=CORRUPTIONS, indirect=st.booleans())
def test_blk_requests_of_every_type_corrupted(memory, disk, traced, request, corruptions,
                                              indirect):
    memory.fill(0, MEM)
    rig = blk_rig(memory, disk)
    try:
        readable, buffers = request
        lay_out(rig, readable, buffers, corruptions, indirect)
        status_at = None if corruptions else rig.driver.data + \
            sum((n + 0xFFF) & ~0xFFF for n, _ in buffers[:-1])
        outcome = kick_within_bounds(rig)
        assert outcome.answered or outcome.failed
        if status_at is not None:                 # uncorrupted: always a status, never a reset
            assert not outcome.failed and memory.read(status_at, 1)[0] in (S_OK, S_IOERR,
                                                                           S_UNSUPP)
        assert os.path.getsize(disk) == 512 * DISK_SECTORS
    finally:
        rig.close()


def net_rig(memory, mergeable: bool) -> tuple[Rig, HostDriver, socket.socket]:
    host, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    host.setblocking(False)
    dev.setblocking(False)
    device = Net("fuzz0", b"\x06\x00\x00\x00\x00\x01", fd=dev.detach())
    irq = Irq()
    transport = mmio.VirtioMmio(device, memory, irq)
    features = device.features & ~(0 if mergeable else 1 << F_MRG_RXBUF)
    rx = HostDriver(transport, memory, base=0x10000, features=features, queue_size=QUEUE_SIZE,
                    queue=RX)
    tx = HostDriver(transport, memory, base=0x40000, queue_size=QUEUE_SIZE, queue=TX)
    rx.negotiate()
    rx.configure_queue()
    tx.configure_queue()
    rx.driver_ok()
    return Rig(device, transport, rx, irq, [host.close]), tx, host


frame_lengths = st.one_of(st.integers(0, 2048), st.integers(MAX_PACKET - 16, MAX_PACKET + 16))


@FUZZ
@given(mergeable=st.booleans(),
       rx_shapes=st.lists(st.lists(st.integers(0, 3000), min_size=1, max_size=3), max_size=4),
       frames=st.lists(frame_lengths, max_size=4),
       corruptions=CORRUPTIONS)
def test_net_rx_buffer_shapes_and_frames(memory, traced, mergeable, rx_shapes, frames,
                                         corruptions):
    memory.fill(0, MEM)
    rig, tx, host = net_rig(memory, mergeable)
    try:
        for shape in rx_shapes[:1]:                # the first chain may be corrupted
            lay_out(rig, b"", [[n, True] for n in shape], corruptions, False)
        for shape in rx_shapes[1:]:
            rig.driver.submit([(rig.driver.data + 0x8000 * i, n, True)
                               for i, n in enumerate(shape)])
        for length in frames:
            try:
                host.send(os.urandom(min(length, MAX_PACKET)))
            except BlockingIOError:
                break                              # the "TAP" is full: fewer frames
        outcome = kick_within_bounds(rig, rig.device.tap_readable)
        assert outcome.answered or outcome.failed or not frames or not rx_shapes or \
            rig.device._pending is not None or rig.device.stats["rx_dropped"]
    finally:
        rig.close()


@FUZZ
@given(frame=st.lists(st.integers(0, 70000), min_size=1, max_size=4),
       corruptions=CORRUPTIONS, indirect=st.booleans())
def test_net_tx_frames(memory, traced, frame, corruptions, indirect):
    memory.fill(0, MEM)
    rig, tx, host = net_rig(memory, True)
    try:
        rig.driver = tx                            # queue 1 is the one kicked and checked
        lay_out(rig, bytes(sum(frame)), [[n, False] for n in frame], corruptions, indirect)
        outcome = kick_within_bounds(rig)
        assert outcome.answered or outcome.failed
    finally:
        rig.close()


@FUZZ
@given(shape=st.lists(st.integers(0, 70000), min_size=1, max_size=4),
       corruptions=CORRUPTIONS, indirect=st.booleans())
def test_rng_buffers(memory, traced, shape, corruptions, indirect):
    memory.fill(0, MEM)
    device, irq = Rng(), Irq()
    transport = mmio.VirtioMmio(device, memory, irq)
    driver = HostDriver(transport, memory, queue_size=QUEUE_SIZE)
    driver.setup()
    rig = Rig(device, transport, driver, irq)
    lay_out(rig, b"", [[n, True] for n in shape], corruptions, indirect)
    outcome = kick_within_bounds(rig)
    assert outcome.answered or outcome.failed


REGISTER_WRITES = st.lists(st.tuples(
    st.sampled_from([mmio.STATUS, mmio.QUEUE_READY, mmio.QUEUE_NUM, mmio.QUEUE_DESC_LOW,
                     mmio.QUEUE_SEL, mmio.INTERRUPT_ACK, mmio.DRIVER_FEATURES]),
    st.one_of(st.just(0), st.integers(0, 0xFF), st.integers(0, 2**32 - 1))), max_size=12)


@settings(max_examples=max(10, EXAMPLES // 3), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(writes=REGISTER_WRITES)
def test_register_writes_and_resets_while_a_queue_is_served(memory, disk, writes):
    """A vCPU writes registers (resets among them) while the I/O thread serves
    requests: nothing raises on either side, and a fresh driver always gets a disk
    that works."""
    rig = blk_rig(memory, disk, queue_size=QUEUE_SIZE)
    errors: list[BaseException] = []
    stop = threading.Event()

    def io_thread():
        try:
            while not stop.is_set():
                rig.transport.notify(0)
        except BaseException as exc:  # noqa: BLE001 - the property: nothing escapes
            errors.append(exc)
    serving = threading.Thread(target=io_thread)
    serving.start()
    try:
        for n in range(QUEUE_SIZE // 2 - 1):
            memory.write(rig.driver.data + 32 * n, struct.pack("<IIQ", T_IN, 0, n))
            rig.driver.submit([(rig.driver.data + 32 * n, 16, False),
                               (rig.driver.data + 0x1000 * (n + 1), 512, True),
                               (rig.driver.data + 0x800 + n, 1, True)])
        for offset, value in writes:
            rig.transport.write(offset, value.to_bytes(4, "little"))
            rig.transport.read(mmio.INTERRUPT_STATUS, 4)
    finally:
        stop.set()
        serving.join(10)
    assert not errors and not serving.is_alive()
    fresh = HostDriver(rig.transport, memory, base=0x80000)
    fresh.setup()
    memory.write(fresh.data, struct.pack("<IIQ", T_IN, 0, 1))
    fresh.submit([(fresh.data, 16, False), (fresh.data + 0x1000, 512, True),
                  (fresh.data + 64, 1, True)])
    fresh.kick()
    assert memory.read(fresh.data + 64, 1)[0] == S_OK
    assert memory.read(fresh.data + 0x1000, 512) == disk.read_bytes()[512:1024]
    rig.close()

"""virtio-blk with io_engine "Async" (io_uring), driven from the host as
tests/test_virtio.py drives the Sync engine: the same requests and answers, then
what only Async has (completions later and out of order, a full ring, pausing and
saving with requests in flight, a reset waiting for them), and the hostile fuzzing
of tests/test_virtio_hostile.py with completions in the loop."""
from __future__ import annotations

import gc
import hashlib
import os
import select
import struct

import pytest
from hypothesis import given

from pyvmm.devices.uring import Uring, UringUnavailable
from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.blk import S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT, \
    Block, DiskError
from pyvmm.devices.virtio.driver import HostDriver
from pyvmm.snapshot.format import SnapshotError
from tests.framework.virtio import DISK_SECTORS, Irq, disk, memory  # noqa: F401 - fixtures
from tests import test_virtio_hostile as hostile
from tests.test_virtio_hostile import FUZZ, CORRUPTIONS, blk_requests, traced  # noqa: F401

try:
    Uring(1).close()
except UringUnavailable as exc:          # pragma: no cover - hosts without io_uring
    pytestmark = pytest.mark.skip(reason=f"no io_uring here: {exc}")

_OPEN: list = []


@pytest.fixture(autouse=True)
def _closed():
    yield
    while _OPEN:
        _OPEN.pop().close()


def make_blk(memory, path, read_only=False, queue_size=16):
    device = Block(path, read_only=read_only, serial="disk0", io_engine="Async")
    irq = Irq()
    transport = mmio.VirtioMmio(device, memory, irq)
    _OPEN.append(transport)
    driver = HostDriver(transport, memory, queue_size=queue_size)
    driver.setup()
    return device, transport, driver, irq


def settle(device: Block, timeout: float = 5.0) -> None:
    """Serve completions as the I/O thread does (its eventfd, then engine_ready())."""
    engine = device.engine
    while engine.in_flight:
        assert select.select([engine.eventfd], [], [], timeout)[0], "no completion"
        engine.clear_eventfd()
        device.engine_ready()


def publish(driver, rtype, sector, data_len=0, data_writable=True, payload=b"", slot=0):
    """Lay out one request in its own 0x50000-byte slot; returns (head, status, buf)."""
    mem = driver.memory
    base = driver.data + slot * 0x50000
    hdr, buf, status = base, base + 0x100, base + 0x100 + 0x40000
    mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    mem.write(status, b"\xee")
    if payload:
        mem.write(buf, payload)
    buffers = [(hdr, 16, False)]
    if data_len:
        buffers.append((buf, data_len, data_writable))
    buffers.append((status, 1, True))
    return driver.submit(buffers), status, buf


def blk_request(driver, rtype, sector, data_len=0, data_writable=True, payload=b""):
    head, status, buf = publish(driver, rtype, sector, data_len, data_writable, payload)
    driver.kick()
    settle(driver.t.device)
    return head, driver.used(), driver.memory.read(status, 1)[0], buf


# -- what Sync does, Async does too (tests/test_virtio.py) ------------------------------

def test_blk_reads_the_image_bytes(memory, disk):
    _, t, driver, irq = make_blk(memory, disk)
    head, used, status, buf = blk_request(driver, T_IN, 10, 4096)
    assert status == S_OK and used == [(head, 4097)]
    assert memory.read(buf, 4096) == disk.read_bytes()[10 * 512:10 * 512 + 4096]
    assert irq.count == 1 and t.interrupt_status & mmio.INT_VRING


def test_blk_writes_reach_the_file_and_flush(memory, disk):
    device, _, driver, _ = make_blk(memory, disk)
    payload = os.urandom(8192)
    _, _, status, _ = blk_request(driver, T_OUT, 100, 8192, False, payload)
    assert status == S_OK
    head, used, status, _ = blk_request(driver, T_FLUSH, 0)
    assert status == S_OK and used == [(head, 1)]
    assert disk.read_bytes()[100 * 512:100 * 512 + 8192] == payload
    assert device.stats["bytes_written"] == 8192 and device.stats["requests"] == 2


def test_blk_read_only_refuses_writes(memory, disk):
    before = hashlib.sha256(disk.read_bytes()).digest()
    device, _, driver, _ = make_blk(memory, disk, read_only=True)
    assert device.features >> 5 & 1                     # VIRTIO_BLK_F_RO
    _, _, status, _ = blk_request(driver, T_OUT, 0, 512, False, b"x" * 512)
    assert status == S_IOERR
    assert blk_request(driver, T_FLUSH, 0)[2] == S_OK  # nothing to flush
    assert hashlib.sha256(disk.read_bytes()).digest() == before


def test_blk_out_of_range_and_unknown_requests_fail_cleanly(memory, disk):
    device, t, driver, _ = make_blk(memory, disk)
    assert blk_request(driver, T_IN, DISK_SECTORS - 1, 1024)[2] == S_IOERR
    assert blk_request(driver, T_IN, 0, 100)[2] == S_IOERR            # not whole sectors
    assert blk_request(driver, T_IN, 2**64 - 1, 512)[2] == S_IOERR
    assert blk_request(driver, 99, 0)[2] == S_UNSUPP
    head, used, status, _ = blk_request(driver, T_GET_ID, 0, 20)
    assert status == S_OK and memory.read(driver.data + 0x100, 5) == b"disk0"
    assert t.active and t.error is None and device.engine.in_flight == 0


def test_blk_the_last_sector_is_reachable_and_the_one_after_is_not(memory, disk):
    _, _, driver, _ = make_blk(memory, disk)
    payload = os.urandom(512)
    assert blk_request(driver, T_OUT, DISK_SECTORS - 1, 512, False, payload)[2] == S_OK
    head, used, status, buf = blk_request(driver, T_IN, DISK_SECTORS - 1, 512)
    assert status == S_OK and memory.read(buf, 512) == payload
    assert blk_request(driver, T_OUT, DISK_SECTORS, 512, False, payload)[2] == S_IOERR
    assert os.path.getsize(disk) == 512 * DISK_SECTORS


def test_blk_an_image_shrunk_under_the_device_gives_a_counted_io_error(memory, disk):
    device, t, driver, _ = make_blk(memory, disk)
    os.truncate(disk, 512 * 4)               # the host cuts the image short
    head, used, status, _ = blk_request(driver, T_IN, 2, 4096)     # a short read
    assert status == S_IOERR and used == [(head, 1)]
    assert device.stats["errors"] == 1 and device.stats["bytes_read"] == 0 and t.active


def test_blk_requests_complete_out_of_order_one_interrupt_per_batch(memory, disk):
    device, _, driver, irq = make_blk(memory, disk)
    heads = [publish(driver, T_IN, 8 * i, 4096, slot=i)[0] for i in range(4)]
    get_id, _, _ = publish(driver, T_GET_ID, 0, 20, slot=4)
    driver.kick()
    # GET_ID is answered at once, ahead of the reads submitted before it.
    assert driver.used() == [(get_id, 21)] and device.engine.in_flight == 4
    assert irq.count == 1
    settle(device)
    used = driver.used()
    assert sorted(used) == sorted((h, 4097) for h in heads)
    assert irq.count <= 1 + 4
    image = disk.read_bytes()
    for i in range(4):
        assert memory.read(driver.data + i * 0x50000 + 0x100, 4096) == \
            image[8 * i * 512:8 * i * 512 + 4096]


def test_blk_a_full_ring_waits_for_completions_and_loses_nothing(memory, disk):
    device, _, driver, _ = make_blk(memory, disk, queue_size=64)
    device.engine.close()
    device.engine = Uring(2)                 # a tiny ring: most requests must wait
    heads = [publish(driver, T_IN, i, 512, slot=i)[0] for i in range(7)]
    driver.kick()
    assert device.engine.in_flight == 2 and device._starved
    settle(device)
    while device.engine.in_flight:           # engine_ready() served the queue again
        settle(device)
    assert sorted(h for h, _ in driver.used()) == sorted(heads)
    assert device.stats["requests"] == 7 and device.stats["errors"] == 0


def test_blk_save_refuses_requests_in_flight_and_pausing_drains_them(memory, disk):
    device, t, driver, _ = make_blk(memory, disk)
    head, status, _ = publish(driver, T_IN, 0, 4096)
    driver.kick()
    if device.engine.in_flight:              # it may have completed already
        with pytest.raises(SnapshotError, match="still in flight"):
            t.save()
    assert device.drain()                    # what the I/O thread does before parking
    assert driver.used() == [(head, 4097)] and memory.read(status, 1)[0] == S_OK
    state = t.save()
    assert state["device"]["queues"][0]["next_used"] == 1


def test_blk_a_reset_waits_for_requests_in_flight_and_returns_none(memory, disk):
    device, t, driver, _ = make_blk(memory, disk)
    publish(driver, T_IN, 0, 4096)
    driver.kick()
    t.write(mmio.STATUS, struct.pack("<I", 0))       # the driver resets the device
    assert device.engine.in_flight == 0 and not t.active
    assert driver.used() == []                       # the reset took the buffers back
    driver = HostDriver(t, memory, base=0x200000)    # and the device serves again
    driver.setup()
    head, used, status, _ = blk_request(driver, T_IN, 1, 512)
    assert status == S_OK and used == [(head, 513)]


def test_blk_disk_swap_with_async(memory, disk, tmp_path):
    device, t, driver, _ = make_blk(memory, disk)
    other = tmp_path / "other.img"
    other.write_bytes(b"\x5a" * 512 * 10)
    device.replace_backing(other)
    head, used, status, buf = blk_request(driver, T_IN, 9, 512)
    assert status == S_OK and memory.read(buf, 512) == b"\x5a" * 512


def test_blk_close_and_reopen_leave_no_fd_behind(memory, disk):
    make_blk(memory, disk)[1].close()
    _OPEN.clear()
    gc.collect()                                    # earlier tests' fds, closed now
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(5):
        device, t, driver, _ = make_blk(memory, disk)
        publish(driver, T_IN, 0, 4096)
        driver.kick()                               # in flight when closed: waited for
        t.close()
        _OPEN.clear()
    assert set(os.listdir("/proc/self/fd")) == before


def test_blk_async_needs_io_uring_and_says_so(disk, monkeypatch):
    from pyvmm.devices import uring
    from pyvmm.kvm import ffi

    def refuse(entries, eventfd, error):
        error[0] = 1                                 # EPERM: io_uring_disabled
        return ffi.NULL
    monkeypatch.setattr(uring, "lib", type("Lib", (), {"pv_uring_open": staticmethod(refuse)}))
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(DiskError, match='drive disk0: io_engine "Async" cannot be used: '
                                        'io_uring is not allowed here.*use io_engine "Sync"'):
        Block(disk, serial="disk0", io_engine="Async")
    assert set(os.listdir("/proc/self/fd")) == before    # the image and eventfd closed


# -- hostile drivers, completions included (tests/test_virtio_hostile.py) ----------------

def _settled_kick(rig):
    def kick():
        rig.driver.kick()
        assert rig.device.drain(5.0)
    return kick


@FUZZ
@given(request=blk_requests(), corruptions=CORRUPTIONS, indirect=hostile.st.booleans())
def test_blk_async_requests_of_every_type_corrupted(memory, disk, traced, request,
                                                    corruptions, indirect):
    memory.fill(0, hostile.MEM)
    device = Block(disk, serial="hostile", io_engine="Async")
    irq = Irq()
    transport = mmio.VirtioMmio(device, memory, irq)
    driver = HostDriver(transport, memory, queue_size=hostile.QUEUE_SIZE)
    driver.setup()
    rig = hostile.Rig(device, transport, driver, irq)
    try:
        readable, buffers = request
        hostile.lay_out(rig, readable, buffers, corruptions, indirect)
        status_at = None if corruptions else driver.data + \
            sum((n + 0xFFF) & ~0xFFF for n, _ in buffers[:-1])
        outcome = hostile.kick_within_bounds(rig, _settled_kick(rig))
        assert outcome.answered or outcome.failed
        assert device.engine.in_flight == 0
        if status_at is not None:
            assert not outcome.failed and memory.read(status_at, 1)[0] in (S_OK, S_IOERR,
                                                                           S_UNSUPP)
        assert os.path.getsize(disk) == 512 * DISK_SECTORS
    finally:
        rig.close()


# -- configuration: the API's field, the CLI's option, GET /vm/config ---------------------

def test_io_engine_async_is_configured_shown_and_given_on_the_command_line(disk):
    from pyvmm.cli import parse_disk
    from pyvmm.config import ConfigError, Drive
    body = {"drive_id": "data", "path_on_host": str(disk), "is_root_device": False,
            "io_engine": "Async"}
    assert Drive.from_json(body).to_json()["io_engine"] == "Async"
    assert Drive.from_json({**body, "io_engine": "Sync"}).io_engine == "Sync"
    assert Drive.from_json({k: v for k, v in body.items() if k != "io_engine"}).io_engine \
        == "Sync"
    with pytest.raises(ConfigError, match="io_engine must be Sync or Async"):
        Drive.from_json({**body, "io_engine": "Uring"})
    assert parse_disk(f"{disk},io_engine=async", 0).io_engine == "Async"
    assert parse_disk(f"{disk},ro,io_engine=sync", 1).io_engine == "Sync"
    assert parse_disk(str(disk), 2).io_engine == "Sync"

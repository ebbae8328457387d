"""virtio device models driven from the host (no guest, no KVM): function,
hostile drivers that must end in an error state, never a crash, the cursors
devices read and write chains through, and save/restore of device state
(hostile too: a snapshot file may hold anything)."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.blk import Block, S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, \
    T_OUT, DiskError
from pyvmm.devices.virtio.chain import ChainTooShort, Reader, Writer
from pyvmm.devices.virtio.device import ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, \
    FEATURES_OK
from pyvmm.devices.virtio.driver import HostDriver
from pyvmm.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, \
    VIRTQ_DESC_F_WRITE
from pyvmm.devices.virtio.rng import Rng
from pyvmm.devices.virtio.state import StateError
from pyvmm.memory import GuestMemory, MiB
from tests.framework.virtio import DISK_SECTORS, MEM, Irq, disk, memory  # noqa: F401 - fixtures


_OPEN_BLOCKS: list[Block] = []


def new_block(path, read_only=False, serial=""):
    """A Block closed when the test (or close_blocks()) ends: an image is locked
    while a device has it open, so each example of a property closes its own."""
    device = Block(path, read_only=read_only, serial=serial)
    _OPEN_BLOCKS.append(device)
    return device


def close_blocks():
    while _OPEN_BLOCKS:
        _OPEN_BLOCKS.pop().close()


@pytest.fixture(autouse=True)
def _blocks_closed():
    yield
    close_blocks()


def make_blk(memory, path, read_only=False, queue_size=16):
    device = new_block(path, read_only=read_only, serial="disk0")
    irq = Irq()
    transport = mmio.VirtioMmio(device, memory, irq)
    driver = HostDriver(transport, memory, queue_size=queue_size)
    driver.setup()
    return device, transport, driver, irq


def blk_request(driver, rtype, sector, data_len=0, data_writable=True, payload=b""):
    mem = driver.memory
    hdr, buf, status = driver.data, driver.data + 0x100, driver.data + 0x100 + 0x40000
    mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    mem.write(status, b"\xee")
    if payload:
        mem.write(buf, payload)
    buffers = [(hdr, 16, False)]
    if data_len:
        buffers.append((buf, data_len, data_writable))
    buffers.append((status, 1, True))
    head = driver.submit(buffers)
    driver.kick()
    used = driver.used()
    return head, used, mem.read(status, 1)[0], buf


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
    _, _, status, _ = blk_request(driver, T_FLUSH, 0)
    assert status == S_OK
    assert disk.read_bytes()[100 * 512:100 * 512 + 8192] == payload
    assert device.stats["bytes_written"] == 8192


def test_blk_read_only_refuses_writes(memory, disk):
    before = hashlib.sha256(disk.read_bytes()).digest()
    device, _, driver, _ = make_blk(memory, disk, read_only=True)
    assert device.features >> 5 & 1                     # VIRTIO_BLK_F_RO
    _, _, status, _ = blk_request(driver, T_OUT, 0, 512, False, b"x" * 512)
    assert status == S_IOERR
    assert hashlib.sha256(disk.read_bytes()).digest() == before


def test_blk_out_of_range_and_unknown_requests_fail_cleanly(memory, disk):
    _, t, driver, _ = make_blk(memory, disk)
    assert blk_request(driver, T_IN, DISK_SECTORS - 1, 1024)[2] == S_IOERR
    assert blk_request(driver, T_IN, 0, 100)[2] == S_IOERR            # not whole sectors
    assert blk_request(driver, 99, 0)[2] == S_UNSUPP
    head, used, status, _ = blk_request(driver, T_GET_ID, 0, 20)
    assert status == S_OK and memory.read(driver.data + 0x100, 5) == b"disk0"
    assert t.active and t.error is None


def test_blk_capacity_and_disk_swap(memory, disk, tmp_path):
    device, t, _, irq = make_blk(memory, disk)
    assert struct.unpack_from("<Q", device.config, 0)[0] == DISK_SECTORS
    other = tmp_path / "other.img"
    other.write_bytes(bytes(512 * 10))
    before = irq.count
    device.replace_backing(other)
    assert struct.unpack_from("<Q", t.read(mmio.CONFIG, 8))[0] == 10
    assert t.interrupt_status & mmio.INT_CONFIG and irq.count == before + 1


def test_a_failed_disk_swap_keeps_the_old_image(memory, disk, tmp_path):
    device, t, driver, irq = make_blk(memory, disk)
    before = irq.count
    with pytest.raises(DiskError, match="cannot open"):
        device.replace_backing(tmp_path / "missing.img")
    assert irq.count == before and struct.unpack_from("<Q", device.config)[0] == DISK_SECTORS
    head, used, status, buf = blk_request(driver, T_IN, 1, 512)
    assert status == S_OK and memory.read(buf, 512) == disk.read_bytes()[512:1024]


def test_a_driver_that_takes_driver_ok_back_is_not_served_until_it_sets_it(memory, disk):
    _, t, driver, _ = make_blk(memory, disk)
    ready = ACKNOWLEDGE | DRIVER | FEATURES_OK
    t.write(mmio.STATUS, ready.to_bytes(4, "little"))
    head, used, _, _ = blk_request(driver, T_IN, 0, 512)
    assert used == []
    t.write(mmio.STATUS, (ready | DRIVER_OK).to_bytes(4, "little"))
    driver.kick()
    assert driver.used() == [(head, 513)]


def test_bad_disk_images_are_refused(tmp_path):
    with pytest.raises(DiskError, match="cannot open"):
        new_block(tmp_path / "missing.img")
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(DiskError, match="not a multiple of 512"):
        new_block(odd)


def test_rng_fills_writable_buffers(memory):
    device = Rng()
    transport = mmio.VirtioMmio(device, memory, Irq())
    driver = HostDriver(transport, memory)
    driver.setup()
    memory.fill(driver.data, 64)
    head = driver.submit([(driver.data, 64, True)])
    driver.kick()
    assert driver.used() == [(head, 64)]
    assert memory.read(driver.data, 64) != bytes(64)


def test_feature_negotiation_refuses_unknown_bits(memory, disk):
    device = new_block(disk)
    transport = mmio.VirtioMmio(device, memory, Irq())
    driver = HostDriver(transport, memory, features=(1 << 32) | (1 << 60))
    driver.setup()
    assert not driver.status & mmio.FEATURES_OK
    driver2 = HostDriver(transport, memory, features=1 << 9)          # no VERSION_1
    driver2.setup()
    assert not driver2.status & mmio.FEATURES_OK


def test_magic_version_and_ids(memory, disk):
    transport = mmio.VirtioMmio(new_block(disk), memory, Irq())
    assert transport.read(mmio.MAGIC_VALUE, 4) == b"virt"
    assert int.from_bytes(transport.read(mmio.VERSION_REG, 4), "little") == 2
    assert int.from_bytes(transport.read(mmio.DEVICE_ID, 4), "little") == 2


# -- hostile drivers ---------------------------------------------------------------

def _assert_failed_safely(transport, memory, outside_untouched=True):
    assert transport.status & mmio.DEVICE_NEEDS_RESET
    assert transport.error
    assert not transport.active


def test_descriptor_loop_is_detected(memory, disk):
    _, t, driver, _ = make_blk(memory, disk)
    driver.write_desc(0, driver.data, 16, VIRTQ_DESC_F_NEXT, 1)
    driver.write_desc(1, driver.data, 16, VIRTQ_DESC_F_NEXT, 0)       # 0 -> 1 -> 0 ...
    driver.publish(0)
    driver.kick()
    _assert_failed_safely(t, memory)
    assert "loop" in t.error


def test_out_of_range_buffer(memory, disk):
    _, t, driver, _ = make_blk(memory, disk)
    driver.write_desc(0, driver.data, 16, VIRTQ_DESC_F_NEXT, 1)
    driver.write_desc(1, MEM - 16, 4096, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
    driver.write_desc(2, driver.data + 64, 1, VIRTQ_DESC_F_WRITE, 0)
    memory.write(driver.data, struct.pack("<IIQ", T_IN, 0, 0))
    driver.publish(0)
    driver.kick()
    _assert_failed_safely(t, memory)


@pytest.mark.parametrize("length", [0, 2**32 - 1])
def test_extreme_lengths(memory, disk, length):
    _, t, driver, _ = make_blk(memory, disk)
    memory.write(driver.data, struct.pack("<IIQ", T_IN, 0, 0))
    driver.write_desc(0, driver.data, 16, VIRTQ_DESC_F_NEXT, 1)
    driver.write_desc(1, driver.data + 0x100, length, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
    driver.write_desc(2, driver.data + 64, 1, VIRTQ_DESC_F_WRITE, 0)
    driver.publish(0)
    driver.kick()
    if length == 0:
        assert t.active and memory.read(driver.data + 64, 1)[0] == S_OK  # a 0-byte read is fine
    else:
        _assert_failed_safely(t, memory)


def test_queue_size_not_a_power_of_two(memory, disk):
    device = new_block(disk)
    transport = mmio.VirtioMmio(device, memory, Irq())
    HostDriver(transport, memory, queue_size=12).setup()
    assert transport.status & mmio.DEVICE_NEEDS_RESET and "power of two" in transport.error


def test_nested_indirect_is_refused(memory, disk):
    _, t, driver, _ = make_blk(memory, disk)
    table = driver.data + 0x1000
    memory.write(table, struct.pack("<QIHH", table, 16, VIRTQ_DESC_F_INDIRECT, 0))
    driver.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT, 0)
    driver.publish(0)
    driver.kick()
    _assert_failed_safely(t, memory)


def test_reset_recovers_a_failed_device(memory, disk):
    _, t, driver, _ = make_blk(memory, disk)
    driver.write_desc(0, driver.data, 16, VIRTQ_DESC_F_NEXT, 0)      # self loop
    driver.publish(0)
    driver.kick()
    assert t.status & mmio.DEVICE_NEEDS_RESET
    fresh = HostDriver(t, memory)
    fresh.setup()
    assert t.active and t.error is None
    head, used, status, _ = blk_request(fresh, T_IN, 0, 512)
    assert status == S_OK and used == [(head, 513)]


descriptor = st.tuples(st.one_of(st.integers(0, MEM + 4096), st.integers(0, 2**64 - 1)),
                       st.one_of(st.integers(0, 8192), st.integers(0, 2**32 - 1)),
                       st.integers(0, 7), st.integers(0, 0xFFFF))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(descriptor, min_size=1, max_size=16),
       heads=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=8),
       avail_jump=st.integers(0, 0xFFFF), header=st.binary(min_size=16, max_size=16))
def test_random_descriptor_tables_never_escape_guest_ram(memory, disk, table, heads, avail_jump,
                                                         header):
    close_blocks()
    device, t, driver, _ = make_blk(memory, disk)
    disk_before = disk.read_bytes()
    memory.write(driver.data, header)
    for i, (addr, length, flags, nxt) in enumerate(table):
        driver.write_desc(i, addr, length, flags, nxt)
    for head in heads:
        driver.publish(head)
    if avail_jump:
        memory.write_int(driver.layout.avail + 2, 2, avail_jump)
    driver.kick()
    # Whatever happened, the device either still serves or asks for a reset,
    # the disk is only changed through in-range writes, and RAM stayed RAM.
    assert t.active or t.status & mmio.DEVICE_NEEDS_RESET
    assert len(disk.read_bytes()) == len(disk_before)
    fresh = HostDriver(t, memory, base=0x200000)
    fresh.setup()
    assert t.active


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.tuples(st.sampled_from(range(0, 0x110, 4)),
                                 st.one_of(st.just(0), st.integers(0, 255),
                                           st.integers(0, 2**32 - 1))), max_size=40))
def test_random_register_writes_including_resets(memory, disk, writes):
    close_blocks()
    transport = mmio.VirtioMmio(new_block(disk), memory, Irq())
    for offset, value in writes:
        if offset == mmio.QUEUE_NOTIFY:
            value %= 4
        transport.write(offset, value.to_bytes(4, "little"))
        transport.read(offset, 4)
    transport.write(mmio.STATUS, bytes(4))                  # reset always brings it back
    assert transport.status == 0 and transport.error is None


# -- virtio-net over a socketpair (frames keep their boundaries, as on a TAP) ------

def net_device():
    """A Net on one end of a datagram socketpair; the other end plays the TAP's host side."""
    import socket
    from pyvmm.devices.virtio.net import Net
    host, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    dev.setblocking(False)
    return Net("test0", b"\x06\x00\x00\x00\x00\x01", fd=dev.detach()), host


def make_net(memory, mergeable=True):
    from pyvmm.devices.virtio.net import F_MRG_RXBUF, RX, TX
    device, host = net_device()
    transport = mmio.VirtioMmio(device, memory, Irq())
    features = device.features & ~(0 if mergeable else 1 << F_MRG_RXBUF)
    rx = HostDriver(transport, memory, base=0x10000, features=features, queue=RX)
    tx = HostDriver(transport, memory, base=0x80000, queue=TX)
    rx.negotiate()
    rx.configure_queue()
    tx.configure_queue()
    rx.driver_ok()
    t = transport
    return device, t, rx, tx, host


def test_net_mac_and_link_in_config(memory):
    device, t, *_ = make_net(memory)
    assert t.read(mmio.CONFIG, 6) == b"\x06\x00\x00\x00\x00\x01"
    assert t.read(mmio.CONFIG + 6, 2) == b"\x01\x00"          # VIRTIO_NET_S_LINK_UP


def test_net_transmits_frames_to_the_backend(memory):
    device, t, rx, tx, host = make_net(memory)
    frame = bytes(12) + os.urandom(1000)
    memory.write(tx.data, frame[:500])
    memory.write(tx.data + 0x1000, frame[500:])
    head = tx.submit([(tx.data, 500, False), (tx.data + 0x1000, len(frame) - 500, False)])
    t.notify(1)
    assert host.recv(4096) == frame
    assert tx.used() == [(head, 0)] and device.stats["tx_packets"] == 1


@pytest.mark.parametrize("mergeable", [True, False])
def test_net_receives_frames_into_guest_buffers(memory, mergeable):
    device, t, rx, tx, host = make_net(memory, mergeable)
    heads = [rx.submit([(rx.data + i * 0x1000, 2048, True)]) for i in range(3)]
    frame = bytes(12) + os.urandom(3000)                 # needs two 2 KiB buffers
    host.send(frame)
    device.tap_readable()
    used = rx.used()
    if mergeable:
        assert [u[0] for u in used] == heads[:2] and [u[1] for u in used] == [2048, 3012 - 2048]
        got = memory.read(rx.data, 2048) + memory.read(rx.data + 0x1000, 3012 - 2048)
        assert got[12:] == frame[12:]
        assert int.from_bytes(got[10:12], "little") == 2          # num_buffers
    else:
        assert len(used) == 1 and device.stats["rx_dropped"] == 1


def test_net_waits_for_buffers_then_delivers(memory):
    device, t, rx, tx, host = make_net(memory)
    frame = bytes(12) + b"hello"
    host.send(frame)
    device.tap_readable()                       # no buffers yet: the frame waits
    assert rx.used() == []
    head = rx.submit([(rx.data, 2048, True)])
    t.notify(0)                                 # the guest's RX kick
    assert rx.used() == [(head, len(frame))]
    assert memory.read(rx.data + 12, 5) == b"hello"

def test_net_frame_short_of_buffers_waits_whole_instead_of_dropping(memory):
    device, t, rx, tx, host = make_net(memory)
    frame = bytes(12) + os.urandom(3000)                 # needs two 2 KiB buffers
    host.send(frame)
    first = rx.submit([(rx.data, 2048, True)])
    t.notify(0)                                 # one buffer: not enough, nothing is used
    assert rx.used() == [] and device.stats["rx_dropped"] == 0
    # EVENT_IDX: the driver must still be asked to kick when it adds a buffer.
    avail_event = memory.read_int(rx.layout.used + 4 + 8 * rx.size, 2)
    assert avail_event == rx.avail_idx
    second = rx.submit([(rx.data + 0x1000, 2048, True)])
    t.notify(0)
    assert rx.used() == [(first, 2048), (second, len(frame) - 2048)]
    got = memory.read(rx.data, 2048) + memory.read(rx.data + 0x1000, len(frame) - 2048)
    assert got[12:] == frame[12:] and int.from_bytes(got[10:12], "little") == 2


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame_sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=12), data=st.data())
def test_net_mergeable_receive_delivers_every_frame_whole_and_in_order(memory, frame_sizes,
                                                                       data):
    # A driver that posts a few buffers of random sizes at a time (512 B to
    # 2 KiB: the 16-entry ring always can hold the largest frame, so none may
    # be dropped), and reassembles frames from num_buffers as Linux does.
    device, t, rx, tx, host = make_net(memory)
    frames = [bytes(12) + os.urandom(n) for n in frame_sizes]
    for frame in frames:
        host.send(frame)
    received: list[bytes] = []
    pending: list[bytes] = []                 # the buffers of the frame being reassembled
    expected_buffers = 0
    outstanding = 0
    for _ in range(400):
        if len(received) == len(frames):
            break
        # At least one more buffer per round while the ring has room: a frame
        # short of buffers waits for them (correctly), so the driver must add some.
        for _ in range(data.draw(st.integers(min(1, 16 - outstanding), 16 - outstanding))):
            slot = rx.next_desc
            rx.submit([(rx.data + 0x1000 * slot, data.draw(st.integers(512, 2048)), True)])
            outstanding += 1
        t.notify(0)                            # the guest's RX kick
        device.tap_readable()
        for head, length in rx.used():
            outstanding -= 1
            chunk = memory.read(rx.data + 0x1000 * head, length)
            if not pending:
                expected_buffers = int.from_bytes(chunk[10:12], "little")
                assert expected_buffers >= 1
            pending.append(chunk)
            if len(pending) == expected_buffers:
                received.append(b"".join(pending))
                pending = []
    assert [len(f) for f in received] == [len(f) for f in frames]
    assert [f[12:] for f in received] == [f[12:] for f in frames]
    assert device.stats["rx_dropped"] == 0 and device.stats["rx_packets"] == len(frames)


def test_net_rejects_readable_rx_buffers(memory):
    device, t, rx, tx, host = make_net(memory)
    watching = []
    device.watch_tap = watching.append
    rx.submit([(rx.data, 2048, False)])
    host.send(bytes(12) + b"x")
    device.tap_readable()
    assert t.status & mmio.DEVICE_NEEDS_RESET
    assert watching[-1] is False                # a failed device stops polling its TAP


def test_bad_mac_addresses():
    from pyvmm.devices.virtio.net import NetError, parse_mac
    assert parse_mac("06:00:ac:10:00:02") == bytes.fromhex("0600ac100002")
    for bad in ("06:00:ac:10:00", "zz:00:00:00:00:00", "01:00:00:00:00:00", "0600ac100002"):
        with pytest.raises(NetError):
            parse_mac(bad)


# -- cursors over descriptor chains --------------------------------------------------

def split_views(backing: bytearray, cuts: list[int]) -> list[memoryview]:
    """backing as consecutive buffers cut at `cuts`, empty ones left out (as the queue does)."""
    bounds = [0] + sorted(c % (len(backing) + 1) for c in cuts) + [len(backing)]
    view = memoryview(backing)
    return [view[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), cuts=st.lists(st.integers(0, 64), max_size=6),
       reads=st.lists(st.tuples(st.sampled_from(["read", "obj", "skip", "views"]),
                                st.integers(0, 70)), max_size=10))
def test_reader_reads_the_bytes_in_order_across_buffers(data, cuts, reads):
    reader = Reader(split_views(bytearray(data), cuts))
    offset = 0
    for op, count in reads:
        if count > len(data) - offset:
            with pytest.raises(ChainTooShort):
                reader.read(count)
        elif op == "read":
            assert reader.read(count) == data[offset:offset + count]
            offset += count
        elif op == "obj":
            layout = struct.Struct(f"<{count}s")
            assert reader.read_obj(layout) == (data[offset:offset + count],)
            offset += count
        elif op == "skip":
            reader.skip(count)
            offset += count
        else:
            assert b"".join(reader.views(count)) == data[offset:offset + count]
            offset += count
        assert reader.bytes_read == offset and reader.available_bytes() == len(data) - offset


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 64), cuts=st.lists(st.integers(0, 64), max_size=6),
       ops=st.lists(st.tuples(st.sampled_from(["write", "obj", "skip", "split"]),
                              st.integers(0, 70)), max_size=10))
def test_writer_writes_where_a_flat_buffer_would(size, cuts, ops):
    backing = bytearray(size)
    writer = Writer(split_views(backing, cuts))
    expected = bytearray(size)
    start, position, end = 0, 0, size          # the writer covers [start, end), at position
    for i, (op, count) in enumerate(ops):
        fill = bytes([i + 1]) * count
        if count > end - position:
            with pytest.raises(ChainTooShort):
                writer.write(fill)
            assert backing == expected          # nothing written
        elif op == "write":
            writer.write(fill)
            expected[position:position + count] = fill
            position += count
        elif op == "obj":
            writer.write_obj(struct.Struct(f"<{count}s"), fill)
            expected[position:position + count] = fill
            position += count
        elif op == "skip":
            writer.skip(count)
            position += count
        else:
            rest = writer.split_at(count)
            # The rest is its own cursor over what follows; fill it to see where it is.
            tail = b"\xff" * rest.available_bytes()
            rest.write(tail)
            expected[position + count:end] = tail
            end = position + count
        assert bytes(backing) == bytes(expected)
        assert writer.bytes_written == position - start
        assert writer.available_bytes() == end - position


def test_blk_header_and_status_may_share_buffers_with_data(memory, disk):
    # 2.6.4: the device must not assume how a request is split into buffers.
    _, t, driver, _ = make_blk(memory, disk)
    header, data = driver.data, driver.data + 0x100
    memory.write(header, struct.pack("<IIQ", T_IN, 0, 3))
    head = driver.submit([(header, 10, False), (header + 10, 6, False),    # header in two
                          (data, 1024 + 1, True)])                         # data, then status
    driver.kick()
    assert driver.used() == [(head, 1025)] and t.active
    assert memory.read(data, 1024) == disk.read_bytes()[3 * 512:5 * 512]
    assert memory.read(data + 1024, 1)[0] == S_OK


def test_blk_short_header_needs_a_reset(memory, disk):
    _, t, driver, _ = make_blk(memory, disk)
    driver.submit([(driver.data, 8, False), (driver.data + 64, 1, True)])
    driver.kick()
    assert t.status & DEVICE_NEEDS_RESET and "16-byte header" in t.error


# -- save and restore ------------------------------------------------------------------

def roundtrip(state: dict) -> dict:
    """What a snapshot file gives back."""
    return json.loads(json.dumps(state))


def restored_transport(device, memory, state):
    transport = mmio.VirtioMmio(device, memory, Irq())
    transport.restore(state)
    return transport


def test_blk_save_restore_continues_where_it_was(memory, disk):
    device, t, driver, _ = make_blk(memory, disk)
    for sector in range(3):
        assert blk_request(driver, T_IN, sector, 512)[2] == S_OK
    state = roundtrip(t.save())
    assert state["device"]["queues"][0]["next_avail"] == 3
    assert state["device"]["queues"][0]["next_used"] == 3
    t.close()
    fresh = new_block(disk, serial="disk0")
    t2 = restored_transport(fresh, memory, state)
    assert t2.active and t2.save() == state
    driver.t = t2                                   # the same driver, the same rings
    head, used, status, buf = blk_request(driver, T_IN, 7, 1024)
    assert status == S_OK and used == [(head, 1025)]
    assert memory.read(buf, 1024) == disk.read_bytes()[7 * 512:9 * 512]
    assert fresh.queues[0].next_used == 4
    assert blk_request(driver, T_GET_ID, 0, 20)[2] == S_OK


def test_rng_save_restore_continues_where_it_was(memory):
    t = mmio.VirtioMmio(Rng(), memory, Irq())
    driver = HostDriver(t, memory)
    driver.setup()
    for _ in range(5):
        driver.submit([(driver.data, 32, True)])
        driver.kick()
    assert len(driver.used()) == 5
    t2 = restored_transport(Rng(), memory, roundtrip(t.save()))
    driver.t = t2
    memory.fill(driver.data, 64)
    head = driver.submit([(driver.data, 64, True)])
    driver.kick()
    assert driver.used() == [(head, 64)] and memory.read(driver.data, 64) != bytes(64)
    assert t2.device.queues[0].next_avail == 6


def test_net_save_restore_keeps_the_frame_waiting_for_buffers(memory):
    from pyvmm.devices.virtio.net import RX
    device, t, rx, tx, host = make_net(memory)
    first = bytes(12) + b"first"
    head = rx.submit([(rx.data, 2048, True)])
    host.send(first)
    device.tap_readable()
    assert rx.used() == [(head, len(first))]
    waiting = bytes(12) + os.urandom(100)
    host.send(waiting)
    device.tap_readable()                            # no buffers: the frame waits
    state = roundtrip(t.save())
    assert state["device"]["pending_rx"] is not None
    t.close()
    host.close()
    fresh, host2 = net_device()
    t2 = restored_transport(fresh, memory, state)
    rx.t = tx.t = t2
    head = rx.submit([(rx.data + 0x1000, 2048, True)])
    t2.notify(RX)
    assert rx.used() == [(head, len(waiting))]
    assert memory.read(rx.data + 0x1000 + 12, 100) == waiting[12:]
    frame = bytes(12) + b"out"
    memory.write(tx.data, frame)
    head = tx.submit([(tx.data, len(frame), False)])
    tx.kick()
    assert host2.recv(100) == frame and tx.used() == [(head, 0)]


def test_a_reset_device_saves_and_restores_inactive(memory, disk):
    t = mmio.VirtioMmio(new_block(disk), memory, Irq())
    state = roundtrip(t.save())
    t.close()
    t2 = restored_transport(new_block(disk), memory, state)
    assert t2.status == 0 and not t2.active and not t2.device.serving


def saved_blk(memory, disk) -> dict:
    _, t, driver, _ = make_blk(memory, disk)
    blk_request(driver, T_IN, 0, 512)
    state = roundtrip(t.save())
    t.close()
    return state


def with_value(state: dict, path: tuple, value: object) -> dict:
    state = copy.deepcopy(state)
    target = state
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return state


@pytest.mark.parametrize("path, value, message", [
    (("device", "queues", 0, "size"), 12, "power of two"),
    (("device", "queues", 0, "desc_addr"), MEM - 16, "outside guest RAM"),
    (("device", "queues", 0, "used_addr"), 2**64 - 8, "outside guest RAM"),
    (("device", "queues", 0, "next_avail"), -1, "next_avail"),
    (("device", "queues", 0, "ready"), 1, "ready"),
    (("device", "queues"), [], "queues"),
    (("device", "acked_features"), 1 << 60, "not offer"),
    (("device", "device"), "virtio-net", "virtio-net"),
    (("device", "config"), "not base64!", "base64"),
    (("device",), None, "not an object"),
    (("status",), "15", "status"),
    (("interrupt_status",), 4, "interrupt_status"),
])
def test_restore_refuses_bad_state(memory, disk, path, value, message):
    state = with_value(saved_blk(memory, disk), path, value)
    t = mmio.VirtioMmio(new_block(disk), memory, Irq())
    with pytest.raises(StateError, match=message):
        t.restore(state)
    assert not t.active and not t.device.serving


def test_restore_refuses_another_disk_size(memory, disk, tmp_path):
    state = saved_blk(memory, disk)
    other = tmp_path / "other.img"
    other.write_bytes(bytes(512 * 10))
    with pytest.raises(StateError, match="does not match disk image"):
        restored_transport(new_block(other), memory, state)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) |
    st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=24)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=json_values)
def test_garbage_state_is_a_state_error(memory, disk, garbage):
    close_blocks()
    t = mmio.VirtioMmio(new_block(disk), memory, Irq())
    with pytest.raises(StateError):
        t.restore(garbage)


def state_paths(state: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a saved state, containers included."""
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, list):
        items = enumerate(state)
    else:
        return []
    paths = []
    for key, value in items:
        paths.append(prefix + (key,))
        paths.extend(state_paths(value, prefix + (key,)))
    return paths


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_state_is_restored_or_refused(memory, disk, data):
    # A snapshot file is hostile: any field may hold anything.  Restoring it
    # either works (and the device then serves or waits for a reset) or is a
    # StateError, never another exception.
    close_blocks()
    state = saved_blk(memory, disk)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(state_paths(state)))
        value = data.draw(st.one_of(json_values, st.integers(-1, 2**64 + 1),
                                    st.sampled_from([0, 1, 12, 16, 2**32, MEM, True])))
        state = with_value(state, path, value)
    t = mmio.VirtioMmio(new_block(disk), memory, Irq())
    try:
        t.restore(state)
    except StateError:
        assert not t.active
        return
    if t.active:
        driver = HostDriver(t, memory, base=0x200000)
        driver.setup()                              # a reset and a fresh start always work
        assert blk_request(driver, T_IN, 0, 512)[2] == S_OK


def test_blk_offers_flush_only_for_writeback(tmp_path):
    """cache_type Unsafe (the default) offers no VIRTIO_BLK_F_FLUSH, as Firecracker."""
    from pyvmm.builder import _create_device
    from pyvmm.config import Drive
    from pyvmm.devices.virtio.blk import VIRTIO_BLK_F_FLUSH
    (tmp_path / "d.img").write_bytes(bytes(1 << 16))
    for cache_type, offered in (("Unsafe", False), ("Writeback", True)):
        drive = Drive.from_json({"drive_id": "d", "path_on_host": str(tmp_path / "d.img"),
                                 "is_root_device": False, "cache_type": cache_type})
        device = _create_device(drive)
        try:
            assert bool(device.features >> VIRTIO_BLK_F_FLUSH & 1) is offered, cache_type
        finally:
            device.close()

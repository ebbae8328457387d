"""virtio device models driven from the host (no guest, no KVM): function,
and hostile drivers that must end in an error state, never a crash."""
from __future__ import annotations

import hashlib
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.blk import Block, S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, \
    T_OUT, DiskError
from pyvmm.devices.virtio.driver import HostDriver
from pyvmm.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, \
    VIRTQ_DESC_F_WRITE
from pyvmm.devices.virtio.rng import Rng
from pyvmm.memory import GuestMemory, MiB

MEM = 4 * MiB
DISK_SECTORS = 2048


class Irq:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture()
def memory():
    mem = GuestMemory([(0, MEM)])
    yield mem
    mem.close()


@pytest.fixture()
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(512 * DISK_SECTORS))
    return path


def make_blk(memory, path, read_only=False, queue_size=16):
    device = Block(path, read_only=read_only, serial="disk0")
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


def test_bad_disk_images_are_refused(tmp_path):
    with pytest.raises(DiskError, match="cannot open"):
        Block(tmp_path / "missing.img")
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(DiskError, match="not a multiple of 512"):
        Block(odd)


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
    device = Block(disk)
    transport = mmio.VirtioMmio(device, memory, Irq())
    driver = HostDriver(transport, memory, features=(1 << 32) | (1 << 60))
    driver.setup()
    assert not driver.status & mmio.FEATURES_OK
    driver2 = HostDriver(transport, memory, features=1 << 9)          # no VERSION_1
    driver2.setup()
    assert not driver2.status & mmio.FEATURES_OK


def test_magic_version_and_ids(memory, disk):
    transport = mmio.VirtioMmio(Block(disk), memory, Irq())
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
    device = Block(disk)
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
    transport = mmio.VirtioMmio(Block(disk), memory, Irq())
    for offset, value in writes:
        if offset == mmio.QUEUE_NOTIFY:
            value %= 4
        transport.write(offset, value.to_bytes(4, "little"))
        transport.read(offset, 4)
    transport.write(mmio.STATUS, bytes(4))                  # reset always brings it back
    assert transport.status == 0 and transport.error is None


# -- virtio-net over a socketpair (frames keep their boundaries, as on a TAP) ------

def make_net(memory, mergeable=True):
    import socket
    from pyvmm.devices.virtio.net import F_MRG_RXBUF, RX, TX, Net
    host, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    dev.setblocking(False)
    device = Net("test0", b"\x06\x00\x00\x00\x00\x01", fd=dev.detach())
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

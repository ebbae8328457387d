"""A hostile guest and hostile host programs against virtio-vsock and its muxer, with no
VM (tests.framework.virtio.GuestVsock plays the guest): regression tests for each
rule, then typed fuzzing of guest packets and descriptor shapes.

For every fuzzed packet: the device never fails (only a broken ring may fail it, and
the rings here are valid), the muxer's connections, buffers and queued RSTs stay
under their bounds, each kick is quick, and a connection the fuzzing does not touch
still carries data at the end.  EXAMPLES as in test_virtio_hostile.py.
"""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices import vsock_uds
from pyvmm.devices.virtio.device import DEVICE_NEEDS_RESET
from pyvmm.devices.vsock_uds import CONN_TX_BUF_SIZE, CONNECT_LINE_MAX, HEADER, \
    MAX_PKT_BUF_SIZE, MUXER_RXQ_SIZE, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, \
    OP_RW
from pyvmm.memory import GuestMemory, MiB
from tests.framework.virtio import GuestVsock, memory  # noqa: F401 - a fixture
from tests.test_vsock import GUEST_PORT, HOST_PORT, establish_from_host, host_connect, \
    ops, read_exactly, wait_for

EXAMPLES = int(os.environ.get("PYVMM_FUZZ_EXAMPLES", "200"))
SECONDS_PER_PACKET = 0.5
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture()
def uds(tmp_path):
    return str(tmp_path / "v.sock")


@pytest.fixture()
def guest(memory, uds):
    rig = GuestVsock(memory, uds).start()
    yield rig
    rig.close()


def failed(guest: GuestVsock) -> bool:
    return bool(guest.transport.status & DEVICE_NEEDS_RESET)


# -- guest packets ----------------------------------------------------------------------------

def test_packets_for_other_cids_or_from_a_forged_cid_are_dropped(guest):
    guest.send(OP_REQUEST, 40000, 999, dst_cid=5)            # another VM
    guest.send(OP_REQUEST, 40000, 999, dst_cid=guest.cid)    # itself
    guest.send(OP_REQUEST, 40000, 999, src_cid=7)            # not who it is
    guest.pump()
    assert guest.recv() == [] and guest.device.stats["foreign_cid_dropped"] == 3


def test_unknown_types_and_orphan_packets_get_rst_but_an_rst_gets_nothing(guest):
    guest.send(OP_REQUEST, 40000, 999, socket_type=2)        # SOCK_DGRAM
    guest.send(OP_REQUEST, 40000, 999, socket_type=5)        # SEQPACKET: not offered
    guest.send(99, 40000, 999)                               # an unknown op
    guest.send(OP_RW, 40000, 999, b"data")                   # no such connection
    guest.send(OP_RST, 40000, 999)
    packets = wait_for(guest, lambda p: len(p) >= 4)
    guest.pump()
    assert ops(packets + guest.recv()) == [OP_RST] * 4
    assert not failed(guest)


def test_bad_tx_chains_are_returned_unread(guest):
    driver, memory = guest.tx, guest.memory
    header = HEADER.pack(guest.cid, 2, 40000, 999, 0, 1, OP_REQUEST, 0, 0, 0)
    memory.write(0x100000, header)
    cases = [[(0x100000, 20, False)],                             # shorter than a header
             [(0x100000, 44, False), (0x101000, 8, True)],        # a device-writable buffer
             []]
    memory.write(0x102000, HEADER.pack(guest.cid, 2, 40000, 999, 100, 1, OP_RW, 0, 0, 0))
    cases[2] = [(0x102000, 44, False), (0x103000, 10, False)]     # len beyond the chain
    memory.write(0x104000, HEADER.pack(guest.cid, 2, 40000, 999, MAX_PKT_BUF_SIZE + 1, 1,
                                       OP_RW, 0, 0, 0))
    cases.append([(0x104000, 44, False), (0x110000, MAX_PKT_BUF_SIZE + 1, False)])
    for buffers in cases:
        driver.submit(buffers)
        driver.kick()
        assert driver.used() and not failed(guest)
    assert guest.device.stats["tx_dropped"] == len(cases)
    guest.pump()
    assert guest.recv() == []


def test_bad_rx_chains_are_returned_empty(memory, uds):
    rig = GuestVsock(memory, uds)
    rig.RX_CHAINS = 0
    rig.start()
    rig.rx.submit([(0x220000, 20, True)])                    # too short for a header
    rig.rx.submit([(0x220100, 44, False), (0x220200, 4096, True)])   # device-readable part
    rig.send(OP_REQUEST, 40000, 999)                         # an RST is owed: goes now
    assert rig.rx.used() == [(0, 0), (1, 0)] and not failed(rig)
    assert rig.muxer.has_pending_rx()                        # still owed
    assert rig.device.stats["rx_bad_buffers"] == 2
    rig.close()


def test_a_request_flood_with_no_rx_buffers_is_bounded(memory, uds):
    rig = GuestVsock(memory, uds)
    rig.RX_CHAINS = 0                                        # the guest never reads
    rig.start()
    for n in range(MUXER_RXQ_SIZE + 50):
        rig.send(OP_REQUEST, 40000 + n, 999)
    assert len(rig.muxer._rsts) == MUXER_RXQ_SIZE
    assert rig.muxer.stats["rst_dropped"] == 50
    rig.close()


def test_connections_are_limited(guest, uds, monkeypatch):
    monkeypatch.setattr(vsock_uds, "MAX_CONNECTIONS", 8)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_{HOST_PORT}")
    listener.listen(64)
    for n in range(20):
        guest.send(OP_REQUEST, 40000 + n, HOST_PORT)
    packets = wait_for(guest, lambda p: len(p) >= 20)
    assert ops(packets).count(OP_RESPONSE) == 8 and ops(packets).count(OP_RST) == 12
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)    # the host side is full too
    client.settimeout(5)
    client.connect(uds)
    guest.pump()
    assert client.recv(8) == b""
    listener.close()


def test_a_lying_fwd_cnt_gets_no_credit(guest, uds):
    client, port = establish_from_host(guest, uds)
    guest.send(OP_CREDIT_UPDATE, GUEST_PORT, port, buf_alloc=4096, fwd_cnt=0x8000_0000)
    client.sendall(b"y" * 100)
    guest.pump()
    assert OP_RW not in ops(guest.recv())
    guest.send(OP_CREDIT_UPDATE, GUEST_PORT, port, buf_alloc=4096, fwd_cnt=0)
    assert wait_for(guest, lambda p: OP_RW in ops(p))[-1][1] == b"y" * 100


# -- hostile host programs --------------------------------------------------------------------

@pytest.mark.parametrize("line", [b"HELLO 52\n", b"CONNECT\n", b"CONNECT 99999999999\n",
                                  b"\xff\xff\xff\n", b"x" * CONNECT_LINE_MAX])
def test_bad_connect_lines_close_the_socket(guest, uds, line):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(uds)
    client.sendall(line)
    for _ in range(10):
        guest.pump()
    assert client.recv(8) == b""
    assert guest.muxer.stats["bad_connect_lines"] == 1 and not guest.muxer._host_streams


def test_a_slow_connect_line_times_out(guest, uds, monkeypatch):
    monkeypatch.setattr(vsock_uds, "CONNECT_LINE_TIMEOUT", 0.1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(uds)
    client.sendall(b"CONN")                          # and nothing more
    deadline = time.monotonic() + 3
    while guest.muxer._host_streams or time.monotonic() < deadline and \
            not guest.muxer.stats["bad_connect_lines"]:
        guest.pump()
        time.sleep(0.01)
        if time.monotonic() > deadline:
            break
    assert client.recv(8) == b"" and not guest.muxer._host_streams


def test_a_host_program_that_vanishes(guest, uds):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(uds)
    client.sendall(b"CONNECT 5")                     # half a line, then gone
    client.close()
    guest.pump()
    assert not guest.muxer._host_streams
    client = host_connect(uds)                       # gone before the guest answers
    request = wait_for(guest, lambda p: OP_REQUEST in ops(p))[-1][0]
    client.close()
    assert OP_RST in ops(wait_for(guest, lambda p: OP_RST in ops(p)))
    guest.send(OP_RESPONSE, GUEST_PORT, request.src_port)     # a late answer: RST
    assert ops(wait_for(guest, lambda p: p)) == [OP_RST]
    assert not guest.muxer.connections


def test_a_host_program_that_never_reads(guest, uds):
    """The guest respects the credit: the host's socket fills, our buffer holds the
    rest, and the guest waits for credit; nothing grows past CONN_TX_BUF_SIZE."""
    client, port = establish_from_host(guest, uds)
    conn = guest.muxer.connections[(port, GUEST_PORT)]
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = 0
    while sent + 16384 <= CONN_TX_BUF_SIZE:
        guest.send(OP_RW, GUEST_PORT, port, b"q" * 16384)
        sent += 16384
    assert conn.state == vsock_uds.ESTABLISHED and 0 < len(conn.tx_buf) <= CONN_TX_BUF_SIZE
    got = bytearray()                                # the host reads at last
    client.setblocking(False)
    deadline = time.monotonic() + 5
    while len(got) < sent and time.monotonic() < deadline:
        guest.pump()                                 # EPOLLOUT: the buffer drains
        try:
            got += client.recv(65536)
        except BlockingIOError:
            time.sleep(0.001)
    assert got == b"q" * sent and not conn.tx_buf
    assert OP_CREDIT_UPDATE in ops(guest.recv())     # and the guest hears it may send


# -- fuzzing ----------------------------------------------------------------------------------

fuzz_packets = st.lists(st.tuples(
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 0xFFFF]),          # op
    st.sampled_from([1, 1, 1, 2, 3]),                               # type
    st.sampled_from([GuestVsock.CID, GuestVsock.CID, 2, 7]),        # src_cid
    st.sampled_from([2, 2, 2, 3, 0xFFFF_FFFF]),                     # dst_cid
    st.sampled_from([40000, 40001, 0xFFFF_FFFF]),                   # src_port
    st.sampled_from([HOST_PORT, 999, 0]),                           # dst_port
    st.integers(0, 3),                                              # flags
    st.sampled_from([0, 4096, 0xFFFF_FFFF]) | st.integers(0, 1 << 32 - 1),   # buf_alloc
    st.integers(0, (1 << 32) - 1),                                  # fwd_cnt
    st.binary(max_size=300),                                        # data
    st.sampled_from([None, None, 0, 5000, 0xFFFF_FFFF]),            # a lying len
    st.lists(st.integers(1, 64), max_size=3),                       # where buffers split
    st.booleans()),                                                 # a writable buffer
    min_size=1, max_size=12)


@FUZZ
@given(packets=fuzz_packets)
def test_fuzzed_guest_packets(tmp_path_factory, packets):
    uds = str(tmp_path_factory.mktemp("vsockfuzz") / "v.sock")
    memory = GuestMemory([(0, 4 * MiB)])
    rig = GuestVsock(memory, uds).start()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_{HOST_PORT}")
    listener.listen(16)
    try:
        bystander, port = establish_from_host(rig, uds)
        for packet in packets:
            start = time.monotonic()
            send_raw(rig, *packet)
            rig.pump()
            rig.recv()
            assert time.monotonic() - start < SECONDS_PER_PACKET
            assert not failed(rig), rig.transport.error
            muxer = rig.muxer
            assert len(muxer.connections) <= 8 and len(muxer._rsts) <= MUXER_RXQ_SIZE
            assert all(len(c.tx_buf) <= CONN_TX_BUF_SIZE for c in muxer.connections.values())
        # The connection nobody fuzzed still works both ways.
        rig.send(OP_RW, GUEST_PORT, port, b"still here")
        assert read_exactly(bystander, 10) == b"still here"
        bystander.sendall(b"me too")
        assert wait_for(rig, lambda p: OP_RW in ops(p))[-1][1] == b"me too"
    finally:
        listener.close()
        rig.close()
        memory.close()


def send_raw(rig: GuestVsock, op, socket_type, src_cid, dst_cid, src_port, dst_port, flags,
             buf_alloc, fwd_cnt, data, length, splits, writable) -> None:
    """One TX chain: the header and data split into buffers at `splits`, the last
    one device-writable if `writable`."""
    wire = HEADER.pack(src_cid, dst_cid, src_port, dst_port,
                       len(data) if length is None else length, socket_type, op, flags,
                       buf_alloc & 0xFFFF_FFFF, fwd_cnt) + data
    addr = 0x100000
    rig.memory.write(addr, wire)
    buffers, start = [], 0
    for cut in sorted(set(min(s, len(wire)) for s in splits)) + [len(wire)]:
        if cut > start:
            buffers.append((addr + start, cut - start, False))
            start = cut
    if writable:
        buffers.append((addr + 0x8000, 16, True))
    rig.tx.submit(buffers)
    rig.tx.kick()
    assert len(rig.tx.used()) == 1


def test_header_layout_is_44_bytes():
    assert HEADER.size == 44 and struct.calcsize("<QQIIIHHIII") == 44

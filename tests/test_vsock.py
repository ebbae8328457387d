"""virtio-vsock and Firecracker's Unix-socket muxer, with no VM: the test plays the
guest (tests.framework.virtio.GuestVsock drives the three queues as Linux 6.1 does)
and plain Python sockets play the host programs.

The data test prints the throughput of one connection each way (`pytest -s`).
"""
from __future__ import annotations

import hashlib
import os
import socket
import stat
import struct
import threading
import time

import pytest

from pyvmm.config import ConfigError, Vsock as VsockConfig
from pyvmm.devices import vsock_uds
from pyvmm.devices.virtio.device import VIRTIO_F_VERSION_1
from pyvmm.devices.virtio.vsock import DEVICE_ID_VSOCK, F_SEQPACKET, F_STREAM
from pyvmm.devices.vsock_uds import CONN_TX_BUF_SIZE, HOST_CID, LOCAL_PORT_FIRST, \
    OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, \
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, VsockError, listen_at, parse_connect_line
from tests.framework.virtio import GuestVsock, memory  # noqa: F401 - a fixture

GUEST_PORT = 52
HOST_PORT = 1234


@pytest.fixture()
def uds(tmp_path):
    return str(tmp_path / "v.sock")


@pytest.fixture()
def guest(memory, uds):
    rig = GuestVsock(memory, uds).start()
    yield rig
    rig.close()


def host_connect(uds: str, port: int = GUEST_PORT) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(uds)
    client.sendall(f"CONNECT {port}\n".encode())
    return client


def wait_for(guest: GuestVsock, predicate, timeout: float = 5.0) -> list:
    """Pump and collect guest packets until predicate(packets) holds."""
    packets: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        guest.pump()
        packets += guest.recv()
        if predicate(packets):
            return packets
        time.sleep(0.002)
    raise AssertionError(f"timed out; got {[(h.op, h.length) for h, _ in packets]}")


def ops(packets) -> list[int]:
    return [header.op for header, _ in packets]


def establish_from_host(guest: GuestVsock, uds: str) -> tuple[socket.socket, int]:
    """A host-initiated connection, up: (the host program's socket, the local port)."""
    client = host_connect(uds)
    packets = wait_for(guest, lambda p: OP_REQUEST in ops(p))
    request = packets[-1][0]
    assert (request.src_cid, request.dst_cid, request.dst_port) == (HOST_CID, guest.cid,
                                                                    GUEST_PORT)
    guest.send(OP_RESPONSE, GUEST_PORT, request.src_port)
    assert client.recv(64) == f"OK {request.src_port}\n".encode()
    return client, request.src_port


def read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "the socket ended early"
        data += chunk
    return bytes(data)


# -- the device ------------------------------------------------------------------------------

def test_the_device_offers_version_1_and_no_socket_type_feature(guest):
    device = guest.device
    assert device.device_id == DEVICE_ID_VSOCK == 19
    assert device.features >> VIRTIO_F_VERSION_1 & 1
    assert not device.features & (1 << F_STREAM | 1 << F_SEQPACKET)
    assert device.read_config(0, 8) == struct.pack("<Q", guest.cid)
    assert device.read_config(4, 4) == bytes(4)
    assert len(device.queues) == 3


# -- host-initiated ---------------------------------------------------------------------------

def test_host_connect_ok_and_data_both_ways(guest, uds):
    client, local_port = establish_from_host(guest, uds)
    assert LOCAL_PORT_FIRST <= local_port < 2 * LOCAL_PORT_FIRST
    guest.send(OP_RW, GUEST_PORT, local_port, b"hello host")
    assert client.recv(64) == b"hello host"
    client.sendall(b"hello guest")
    packets = wait_for(guest, lambda p: OP_RW in ops(p))
    header, data = packets[-1]
    assert (header.op, data, header.src_port, header.dst_port) == \
        (OP_RW, b"hello guest", local_port, GUEST_PORT)
    assert header.buf_alloc == CONN_TX_BUF_SIZE and header.fwd_cnt == len(b"hello host")
    client.close()


def test_bytes_after_the_connect_line_are_the_stream(guest, uds):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(uds)
    client.sendall(b"connect 52\nearly bytes")        # in one write, lower case
    request = wait_for(guest, lambda p: OP_REQUEST in ops(p))[-1][0]
    guest.send(OP_RESPONSE, GUEST_PORT, request.src_port)
    assert client.recv(64).startswith(b"OK ")
    packets = wait_for(guest, lambda p: OP_RW in ops(p))
    assert packets[-1][1] == b"early bytes"


def test_guest_rst_closes_the_host_socket(guest, uds):
    client = host_connect(uds)
    request = wait_for(guest, lambda p: OP_REQUEST in ops(p))[-1][0]
    guest.send(OP_RST, GUEST_PORT, request.src_port)       # nobody listens at 52
    assert client.recv(64) == b""
    assert not guest.muxer.connections


def test_a_guest_that_never_answers_times_out(guest, uds, monkeypatch):
    monkeypatch.setattr(vsock_uds, "CONN_REQUEST_TIMEOUT", 0.1)
    client = host_connect(uds)
    wait_for(guest, lambda p: OP_REQUEST in ops(p))
    packets = wait_for(guest, lambda p: OP_RST in ops(p), timeout=3)
    assert packets[-1][0].op == OP_RST
    assert client.recv(64) == b""
    assert not guest.muxer.connections


def test_local_ports_are_distinct_and_freed(guest, uds):
    ports = set()
    for _ in range(3):
        client, port = establish_from_host(guest, uds)
        ports.add(port)
        guest.send(OP_RST, GUEST_PORT, port)
        assert client.recv(8) == b""
    assert len(ports) == 3 and not guest.muxer._local_ports


# -- guest-initiated --------------------------------------------------------------------------

def test_guest_connects_to_a_host_port(guest, uds):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_{HOST_PORT}")
    listener.listen()
    listener.settimeout(5)
    guest.send(OP_REQUEST, 40000, HOST_PORT)
    response = wait_for(guest, lambda p: p)[0][0]
    assert (response.op, response.src_port, response.dst_port) == (OP_RESPONSE, HOST_PORT,
                                                                   40000)
    server, _ = listener.accept()
    server.settimeout(5)
    guest.send(OP_RW, 40000, HOST_PORT, b"ping")
    assert server.recv(16) == b"ping"
    server.sendall(b"pong")
    assert wait_for(guest, lambda p: OP_RW in ops(p))[-1][1] == b"pong"
    server.close()
    listener.close()


def test_guest_connect_to_a_port_nobody_listens_on_is_reset(guest):
    guest.send(OP_REQUEST, 40000, 999)
    header = wait_for(guest, lambda p: p)[0][0]
    assert (header.op, header.src_port, header.dst_port, header.dst_cid) == \
        (OP_RST, 999, 40000, guest.cid)
    assert not guest.muxer.connections


# -- data and credit --------------------------------------------------------------------------

def test_a_megabyte_each_way_arrives_whole(guest, uds, capsys):
    """sha256 over 1 MiB host->guest and guest->host on one connection."""
    payload = os.urandom(1 << 20)
    client, port = establish_from_host(guest, uds)
    guest.send(OP_CREDIT_UPDATE, GUEST_PORT, port)

    # host -> guest: the host writes from a thread, the guest keeps 256 KiB of credit
    writer = threading.Thread(target=client.sendall, args=(payload,))
    received, fwd = hashlib.sha256(), 0
    start = time.monotonic()
    writer.start()
    while fwd < len(payload):
        guest.pump()
        for header, data in guest.recv():
            if header.op == OP_RW:
                received.update(data)
                fwd += len(data)
            elif header.op == OP_CREDIT_REQUEST:
                pass
        guest.send(OP_CREDIT_UPDATE, GUEST_PORT, port, fwd_cnt=fwd & 0xFFFFFFFF)
    to_guest = time.monotonic() - start
    writer.join()
    assert received.digest() == hashlib.sha256(payload).digest()

    # guest -> host: 64 KiB packets within our credit; the host reads on a thread
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(read_exactly(client, len(payload))))
    reader.start()
    start = time.monotonic()
    sent, credit_fwd = 0, 0
    while sent < len(payload):
        conn = guest.muxer.connections[(port, GUEST_PORT)]
        if sent - credit_fwd >= CONN_TX_BUF_SIZE:          # wait for a credit update
            guest.pump()
            for header, _ in guest.recv():
                credit_fwd = max(credit_fwd, header.fwd_cnt)
            credit_fwd = max(credit_fwd, conn.last_fwd_cnt_to_peer)
            continue
        chunk = payload[sent:sent + min(65536, CONN_TX_BUF_SIZE - (sent - credit_fwd))]
        guest.send(OP_RW, GUEST_PORT, port, chunk, fwd_cnt=fwd)
        sent += len(chunk)
    # What the host socket could not take yet waits in the connection's buffer until the
    # socket is writable again: serve that (the I/O thread's job) until the reader has all.
    deadline = time.monotonic() + 120
    while reader.is_alive() and time.monotonic() < deadline:
        guest.pump()
        reader.join(0.01)
    to_host = time.monotonic() - start
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    with capsys.disabled():
        print(f"\nvsock one connection, no VM: host->guest {1 / to_guest:.0f} MiB/s "
              f"(4 KiB RX buffers), guest->host {1 / to_host:.0f} MiB/s (64 KiB packets)")


def test_credit_runs_out_and_resumes(guest, uds):
    client, port = establish_from_host(guest, uds)
    guest.send(OP_CREDIT_UPDATE, GUEST_PORT, port, buf_alloc=6000)
    client.sendall(b"x" * 10000)
    packets = wait_for(guest, lambda p: OP_CREDIT_REQUEST in ops(p))
    assert sum(h.length for h, _ in packets if h.op == OP_RW) == 6000
    guest.pump()
    assert guest.recv() == []                        # nothing more without credit
    guest.send(OP_CREDIT_UPDATE, GUEST_PORT, port, buf_alloc=6000, fwd_cnt=6000)
    packets = wait_for(guest, lambda p: sum(h.length for h, _ in p if h.op == OP_RW) >= 4000)
    assert sum(h.length for h, _ in packets if h.op == OP_RW) == 4000


def test_a_guest_that_ignores_our_credit_is_reset(guest, uds):
    client, port = establish_from_host(guest, uds)
    conn = guest.muxer.connections[(port, GUEST_PORT)]
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)   # the host reads nothing
    for _ in range(2 * CONN_TX_BUF_SIZE // 32768 + 8):
        guest.send(OP_RW, GUEST_PORT, port, b"z" * 32768)
        if conn.state == vsock_uds.KILLED:
            break
    assert conn.state == vsock_uds.KILLED and not conn.tx_buf
    assert OP_RST in ops(wait_for(guest, lambda p: OP_RST in ops(p)))
    assert (port, GUEST_PORT) not in guest.muxer.connections


def test_the_guest_asks_for_credit(guest, uds):
    client, port = establish_from_host(guest, uds)
    guest.send(OP_CREDIT_REQUEST, GUEST_PORT, port)
    header = wait_for(guest, lambda p: p)[-1][0]
    assert header.op == OP_CREDIT_UPDATE and header.buf_alloc == CONN_TX_BUF_SIZE


# -- shutdown ---------------------------------------------------------------------------------

def test_half_close_each_way(guest, uds):
    client, port = establish_from_host(guest, uds)
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)                  # the host is done sending...
    packets = wait_for(guest, lambda p: OP_SHUTDOWN in ops(p))
    assert [d for h, d in packets if h.op == OP_RW] == [b"request"]
    assert packets[-1][0].flags == SHUTDOWN_SEND     # ...and only that
    guest.send(OP_RW, GUEST_PORT, port, b"reply")    # the guest still talks
    assert read_exactly(client, 5) == b"reply"
    guest.send(OP_SHUTDOWN, GUEST_PORT, port, flags=SHUTDOWN_SEND)
    assert client.recv(8) == b""                     # the guest's end of stream
    guest.send(OP_RST, GUEST_PORT, port)
    assert not guest.muxer.connections


def test_host_close_then_guest_silence_is_reset_after_the_timeout(guest, uds, monkeypatch):
    monkeypatch.setattr(vsock_uds, "CONN_SHUTDOWN_TIMEOUT", 0.1)
    client, port = establish_from_host(guest, uds)
    client.close()
    packets = wait_for(guest, lambda p: OP_SHUTDOWN in ops(p))
    assert packets[-1][0].flags == SHUTDOWN_RCV | SHUTDOWN_SEND
    assert OP_RST in ops(wait_for(guest, lambda p: OP_RST in ops(p), timeout=3))
    assert not guest.muxer.connections


def test_guest_shutdown_both_ways_is_answered_with_rst(guest, uds):
    client, port = establish_from_host(guest, uds)
    guest.send(OP_SHUTDOWN, GUEST_PORT, port, flags=SHUTDOWN_RCV | SHUTDOWN_SEND)
    assert OP_RST in ops(wait_for(guest, lambda p: OP_RST in ops(p)))
    assert client.recv(8) == b""


# -- snapshots --------------------------------------------------------------------------------

def test_restore_drops_connections_and_sends_transport_reset(memory, guest, uds, tmp_path):
    client, port = establish_from_host(guest, uds)
    saved = guest.transport.save()
    assert guest.recv_events() == []
    other = str(tmp_path / "restored.sock")          # vsock_override's new uds_path
    restored = GuestVsock(memory, other)
    restored.rx, restored.tx, restored.event = guest.rx, guest.tx, guest.event
    for driver in (restored.rx, restored.tx, restored.event):
        driver.t = restored.transport
    restored.rx_buffers, restored.event_buffers = guest.rx_buffers, guest.event_buffers
    restored.transport.restore(saved)
    assert restored.transport.active and not restored.muxer.connections
    restored.pump()
    assert restored.recv_events() == [0]             # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    assert restored.device.stats["events"] == 1
    assert stat.S_ISSOCK(os.stat(other).st_mode)
    establish_from_host(restored, other)             # and it serves new connections
    restored.close()


def test_restore_takes_only_a_vsock_state(guest, uds):
    from pyvmm.devices.virtio.state import StateError
    state = guest.device.save()
    with pytest.raises(StateError):
        guest.device.restore(dict(state, device="virtio-net"))


# -- the host side's set-up -------------------------------------------------------------------

def test_a_stale_socket_is_replaced_and_other_files_refused(tmp_path):
    path = tmp_path / "s"
    first = listen_at(str(path))
    first.close()                                    # the socket file stays: stale
    listen_at(str(path)).close()
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(VsockError, match="not a socket"):
        listen_at(str(regular))
    with pytest.raises(VsockError, match="does not exist"):
        listen_at(str(tmp_path / "missing" / "s"))
    with pytest.raises(VsockError, match="bytes long"):
        listen_at(str(tmp_path / ("x" * 120)))


def test_the_muxer_removes_its_socket_file_on_close(memory, uds):
    rig = GuestVsock(memory, uds)
    assert os.path.exists(uds)
    rig.close()
    assert not os.path.exists(uds)


def test_connect_lines():
    assert parse_connect_line(b"CONNECT 52\n") == 52
    assert parse_connect_line(b"connect 4294967295\n") == 0xFFFFFFFF
    for bad in (b"CONNECT\n", b"CONNECT 4294967296\n", b"CONNECT -1\n", b"LISTEN 5\n",
                b"CONNECT x\n", b"\xff\xfe 5\n", b"\n"):
        assert parse_connect_line(bad) is None, bad


def test_vsock_from_cli():
    assert VsockConfig.from_cli("cid=3,uds=/tmp/v.sock,id=v0") == \
        VsockConfig(3, "/tmp/v.sock", "v0")
    for bad, words in (("cid=3", "uds= is required"), ("cid=x,uds=/a", "not a number"),
                       ("cid=1,uds=/a", "out of range"), ("cid=3,uds=/a,mtu=5", "not one of")):
        with pytest.raises(ConfigError, match=words):
            VsockConfig.from_cli(bad)


# -- on the I/O thread, as in a VM ------------------------------------------------------------

def test_the_muxer_is_served_by_the_io_thread(memory, uds):
    """The builder's wiring: the I/O thread watches the muxer's epoll fd once the
    driver is ready; the test only kicks queues."""
    import functools

    from pyvmm.devices.iothread import IoThread
    io = IoThread("vsock-test")
    rig = GuestVsock(memory, uds)
    rig.device.watch_backend = functools.partial(io.watch, rig.muxer.fd,
                                                 rig.device.backend_ready)
    io.start()
    try:
        rig.start()
        client = host_connect(uds)
        packets: list = []
        deadline = time.monotonic() + 5
        while OP_REQUEST not in ops(packets) and time.monotonic() < deadline:
            packets += rig.recv()
            time.sleep(0.005)
        request = packets[-1][0]
        assert request.op == OP_REQUEST
        rig.send(OP_RESPONSE, GUEST_PORT, request.src_port)
        assert client.recv(64) == f"OK {request.src_port}\n".encode()
        client.sendall(b"through the I/O thread")
        while OP_RW not in ops(packets) and time.monotonic() < deadline:
            packets += rig.recv()
            time.sleep(0.005)
        assert packets[-1][1] == b"through the I/O thread"
        assert io.error_count == 0
    finally:
        io.stop()
        rig.close()

"""The MMDS stack inside virtio-net: the real Net device on a SOCK_DGRAM socketpair
(the "TAP"), its queues driven by the test framework's HostDriver as a guest
would.  Frames for the MMDS are answered through the RX queue and never reach
the TAP; everything else still does."""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.devices.iothread import IoThread
from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.device import DEVICE_NEEDS_RESET
from pyvmm.devices.virtio.driver import HostDriver
from pyvmm.devices.virtio.net import F_MRG_RXBUF, RX, TX, Net
from pyvmm.mmds.netstack import MmdsStack
from tests.framework.virtio import MEM, Irq, memory  # noqa: F401 - a fixture
from tests.test_mmds_netstack import ACK, FIN, FUZZ, GUEST_MAC, PSH, SYN, Clock, \
    arp_request, ether, expected_response, fake_handler, get, ipv4, parse, tcp_frame

QUEUE_SIZE = 16
RX_BUFFER = 2048
NEEDS_CSUM, GSO_TCPV4 = 1, 1
DEVICE_MAC = b"\x06\x00\x00\x00\x00\x01"


class Guest:
    """A Net device with an MMDS stack, and the guest's two queues."""

    def __init__(self, memory, *, mergeable: bool = True, clock=None, mmds: bool = True,
                 handler=fake_handler, tx_rate_limiter=None) -> None:
        self.memory = memory
        self.clock = clock or Clock()
        self.host, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.host.setblocking(False)
        dev.setblocking(False)
        self.stack = MmdsStack("169.254.169.254", handler, clock=self.clock) if mmds else None
        self.device = Net("mmds0", DEVICE_MAC, fd=dev.detach(), mmds=self.stack,
                          tx_rate_limiter=tx_rate_limiter)
        self.transport = mmio.VirtioMmio(self.device, memory, Irq())
        features = self.device.features & ~(0 if mergeable else 1 << F_MRG_RXBUF)
        self.rx = HostDriver(self.transport, memory, base=0x10000, features=features,
                             queue_size=QUEUE_SIZE, queue=RX)
        self.tx = HostDriver(self.transport, memory, base=0x40000, queue_size=QUEUE_SIZE,
                             queue=TX)
        self.rx.negotiate()
        self.rx.configure_queue()
        self.tx.configure_queue()
        self.rx.driver_ok()
        self.rx_slots: dict[int, int] = {}       # head -> buffer address
        self.partial: list[bytes] = []           # a mergeable frame being reassembled
        self.tx_next = 0

    def close(self) -> None:
        self.transport.close()
        self.host.close()

    def add_rx_buffers(self, count: int = QUEUE_SIZE, kick: bool = True) -> None:
        for _ in range(count):
            if len(self.rx_slots) >= QUEUE_SIZE:
                break
            addr = 0x100000 + RX_BUFFER * self.rx.next_desc
            self.rx_slots[self.rx.submit([(addr, RX_BUFFER, True)])] = addr
        if kick:
            self.rx.kick()

    def send(self, frame: bytes, *, flags: int = 0, gso_type: int = 0, gso_size: int = 0) -> None:
        """One frame on the TX queue: the vnet header and the frame in two buffers."""
        header = struct.pack("<BBHHHHH", flags, gso_type, 0, gso_size, 0, 0, 0)
        addr = 0x200000 + 0x11000 * (self.tx_next % QUEUE_SIZE)
        self.tx_next += 1
        self.memory.write(addr, header)
        buffers = [(addr, len(header), False)]
        if frame:
            self.memory.write(addr + 0x100, frame)
            buffers.append((addr + 0x100, len(frame), False))
        head = self.tx.submit(buffers)
        self.tx.kick()
        assert (head, 0) in self.tx.used()

    def received(self, refill: bool = True) -> list[bytes]:
        """The frames the device delivered (vnet header checked and stripped)."""
        frames = []
        used = self.rx.used()
        for head, length in used:
            chunk = self.memory.read(self.rx_slots.pop(head), length)
            self.partial.append(chunk)
            first = self.partial[0]
            if len(self.partial) == int.from_bytes(first[10:12], "little"):
                whole = b"".join(self.partial)
                self.partial = []
                assert whole[:10] == bytes(10), "MMDS frames carry a zeroed vnet header"
                frames.append(whole[12:])
        if used and refill:
            self.add_rx_buffers(len(used))
        return frames

    def tap_frames(self) -> list[bytes]:
        frames = []
        while True:
            try:
                frames.append(self.host.recv(70000))
            except BlockingIOError:
                return frames

    @property
    def failed(self) -> bool:
        return bool(self.transport.status & DEVICE_NEEDS_RESET)


@pytest.fixture()
def guest(memory):
    g = Guest(memory)
    g.add_rx_buffers()
    yield g
    g.close()


class DeviceClient:
    """The guest's TCP end, through the device's queues."""

    def __init__(self, guest: Guest, port: int = 40000, csum: str = "full") -> None:
        self.g, self.port, self.csum = guest, port, csum
        self.seq, self.rcv_nxt = 1000, 0
        self.received = bytearray()
        self.fin = False

    def send(self, flags: int, payload: bytes = b"") -> None:
        frame = tcp_frame(self.port, self.seq, self.rcv_nxt, flags, payload=payload,
                          options=bytes.fromhex("020405b4") if flags & SYN else b"",
                          csum=self.csum)
        self.seq += len(payload) + (1 if flags & (SYN | FIN) else 0)
        self.g.send(frame, flags=NEEDS_CSUM if self.csum == "partial" else 0)

    def pump(self) -> None:
        for frame in self.g.received():
            if frame[12:14] != b"\x08\x00":
                continue                            # an ARP reply
            seg = parse(frame)
            if seg.dport != self.port:
                continue
            if seg.flags & SYN:
                self.rcv_nxt = seg.seq + 1
            elif seg.seq == self.rcv_nxt and (seg.payload or seg.flags & FIN):
                self.received += seg.payload
                self.rcv_nxt += len(seg.payload) + (seg.flags & FIN)
                self.fin = self.fin or bool(seg.flags & FIN)
                self.send(ACK)

    def get(self, request: bytes) -> bytes:
        self.send(SYN)
        self.pump()
        self.send(ACK)
        self.send(ACK | PSH, request)
        for _ in range(100):
            self.pump()
            if self.fin:
                break
        return bytes(self.received)


# -- what goes where ---------------------------------------------------------------------

def test_arp_for_the_mmds_is_answered_and_never_reaches_the_tap(guest):
    guest.send(arp_request())
    [reply] = guest.received()
    assert reply[:6] == GUEST_MAC and reply[12:14] == b"\x08\x06"
    assert guest.tap_frames() == []
    assert guest.device.stats["mmds_tx_frames"] == 1 and guest.device.stats["tx_packets"] == 0


@pytest.mark.parametrize("csum", ["full", "partial"])
def test_an_http_exchange_through_the_device(guest, csum):
    request = get("/latest/meta-data/")
    assert DeviceClient(guest, csum=csum).get(request) == expected_response(request)
    assert guest.tap_frames() == [] and not guest.failed
    assert guest.stack.stats["requests"] == 1
    assert guest.device.stats["mmds_rx_frames"] == guest.stack.stats["frames_out"]


def test_a_big_response_through_non_mergeable_buffers(memory):
    guest = Guest(memory, mergeable=False)
    try:
        guest.add_rx_buffers()
        request = get("/big")
        assert DeviceClient(guest).get(request) == expected_response(request)
    finally:
        guest.close()


def test_other_frames_still_go_to_the_tap_unchanged(guest):
    others = [ether(ipv4(b"x" * 40, dst=bytes([172, 16, 0, 1]))),
              arp_request(tpa=bytes([172, 16, 0, 1])),
              ether(os.urandom(100), 0x86DD), b"\x01" * 8]
    for frame in others:
        guest.send(frame)
    assert [f[12:] for f in guest.tap_frames()] == others
    assert guest.received() == [] and guest.device.stats["tx_packets"] == len(others)


def test_a_gso_frame_for_the_mmds_is_taken_up_to_the_window(guest):
    client = DeviceClient(guest)
    client.send(SYN)
    client.pump()
    client.send(ACK)
    frame = tcp_frame(client.port, client.seq, client.rcv_nxt, ACK, payload=b"x" * 6000,
                      csum="partial")
    guest.send(frame, flags=NEEDS_CSUM, gso_type=GSO_TCPV4, gso_size=1448)
    assert guest.stack.stats["tcp_beyond_window"] == 1
    assert guest.stack.stats["requests_too_large"] == 1      # no request in it: reset
    assert parse(guest.received()[-1]).flags & 0x04
    assert guest.tap_frames() == [] and not guest.failed


def test_mmds_frames_go_ahead_of_the_taps(memory):
    guest = Guest(memory)
    try:
        guest.host.send(bytes(12) + b"from the tap")
        guest.send(arp_request())                   # no RX buffers yet: both wait
        guest.device.tap_readable()
        assert guest.rx.used() == []
        guest.add_rx_buffers()
        first, second = guest.received()
        assert first[12:14] == b"\x08\x06" and second == b"from the tap"
    finally:
        guest.close()


def test_without_rx_buffers_the_stack_waits_then_delivers_in_order(memory):
    guest = Guest(memory)
    try:
        client = DeviceClient(guest)
        client.send(SYN)
        assert guest.rx.used() == []
        assert guest.stack.has_frames()             # the SYN-ACK is still the stack's
        guest.add_rx_buffers(1)
        client.pump()
        client.send(ACK)
        client.send(ACK | PSH, get("/big"))
        guest.add_rx_buffers(2, kick=True)          # a trickle of buffers
        for _ in range(200):
            client.pump()
            if client.fin:
                break
        assert bytes(client.received) == expected_response(get("/big"))
        assert guest.stack.stats["retransmits"] == 0
    finally:
        guest.close()


def test_retransmission_runs_on_the_devices_timer(guest):
    client = DeviceClient(guest)
    client.send(SYN)
    [synack] = guest.received()
    guest.clock.now = guest.stack.next_deadline()
    guest.device.mmds_timer_fired()                 # what the I/O thread calls
    [again] = guest.received()
    assert parse(again).seq == parse(synack).seq and parse(again).flags == SYN | ACK


def test_the_timer_is_wired_to_the_io_thread_with_the_rate_limiters(memory):
    guest = Guest(memory, clock=time.monotonic)
    io = IoThread("mmds-test")
    try:
        guest.device.wire_rate_limiters(io.watch, guest.transport.notify)
        io.start()
        guest.add_rx_buffers()
        with guest.device.lock:
            guest.send(tcp_frame(40000, 5, 0, SYN))
        # The SYN-ACK, then its retransmission after RTO_INITIAL (0.25 s), unanswered.
        deadline = time.monotonic() + 5
        synacks = []
        while len(synacks) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            with guest.device.lock:
                synacks += guest.received()
        assert len(synacks) == 2 and io.error_count == 0
    finally:
        io.stop()
        guest.close()


def test_a_net_without_mmds_is_unchanged(memory):
    guest = Guest(memory, mmds=False)
    try:
        guest.add_rx_buffers()
        guest.send(arp_request())
        [frame] = guest.tap_frames()
        assert frame[12:] == arp_request() and guest.received() == []
        assert "mmds_tx_frames" not in guest.device.stats
    finally:
        guest.close()


def test_mmds_frames_are_not_charged_to_the_tx_rate_limiter(memory):
    from pyvmm.config import RateLimiterConfig, TokenBucketConfig
    ops = RateLimiterConfig(ops=TokenBucketConfig(size=2, refill_time=100000))
    guest = Guest(memory, tx_rate_limiter=ops)
    try:
        guest.add_rx_buffers()
        for _ in range(5):
            guest.send(arp_request())
        assert len(guest.received()) == 5               # all five answered, none charged
        guest.send(b"\x02" * 20)
        guest.send(b"\x02" * 20)
        assert len(guest.tap_frames()) == 2             # the budget is still whole
    finally:
        guest.close()


# -- hostile frames ------------------------------------------------------------------------

@FUZZ
@given(frames=st.lists(st.tuples(
    st.one_of(st.binary(max_size=100),
              st.builds(lambda t: tcp_frame(1, 1, 0, SYN)[:34] + t, st.binary(max_size=60)),
              st.builds(lambda t: arp_request()[:38] + bytes([169, 254, 169, 254]) + t,
                        st.binary(max_size=8)),
              st.builds(lambda n, f: tcp_frame(40000, n, 0, f, payload=b"G" * (n % 3000)),
                        st.integers(0, 2**32 - 1), st.integers(0, 255))),
    st.integers(0, 255), st.integers(0, 255)), max_size=12),
    buffers=st.integers(0, QUEUE_SIZE))
def test_hostile_frames_for_the_mmds(memory, frames, buffers):
    memory.fill(0, MEM)
    guest = Guest(memory)
    try:
        guest.add_rx_buffers(buffers)
        for frame, flags, gso in frames:
            guest.send(frame, flags=flags, gso_type=gso)
            guest.received()
        guest.clock.now += 100
        guest.device.mmds_timer_fired()
        guest.received()
        for frame in guest.tap_frames():             # nothing the MMDS claims leaks
            assert not guest.stack.claims(frame[12:])
        assert not guest.failed and guest.stack.stats["internal_errors"] == 0
        assert guest.stack.connection_count() == 0
        guest.add_rx_buffers()
        request = get("/")
        assert DeviceClient(guest, port=50000).get(request) == expected_response(request)
    finally:
        guest.close()

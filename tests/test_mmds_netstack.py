"""The MMDS network stack alone (pyvmm.mmds.netstack): ARP, and TCP driven by a
small guest-side TCP client written here, with an injected clock and a fake
HTTP handler; then fuzzing with random and mutated frames.

The client checks every frame the stack sends with its own checksum code
(RFC 1071, the textbook loop), so the stack's arithmetic is checked against a
second implementation."""
from __future__ import annotations

import ipaddress
import os
import random
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.mmds import netstack
from pyvmm.mmds.netstack import IDLE_TIMEOUT, MAX_CONNECTIONS, MAX_PENDING_ARP, \
    MAX_PENDING_RESETS, MAX_REQUEST_BYTES, MMDS_MAC, MmdsStack

MMDS_IP = "169.254.169.254"
MMDS = ipaddress.IPv4Address(MMDS_IP).packed
GUEST_MAC = bytes.fromhex("0600ac100002")
GUEST = ipaddress.IPv4Address("172.16.0.2").packed
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
# Linux 6.1's SYN options: MSS, SACK permitted, timestamps, NOP, window scale 7.
LINUX_SYN_OPTIONS = bytes.fromhex("020405b4") + bytes.fromhex("0402080a") + \
    struct.pack("!II", 12345, 0) + bytes.fromhex("01030307")
EXAMPLES = int(os.environ.get("PYVMM_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Reply:
    consumed: int
    response: bytes
    close: bool


BIG_BODY = bytes(random.Random(7).randrange(256) for _ in range(10000))


def fake_handler(buf: bytes) -> Reply | None:
    """HTTP-ish: a request ends at an empty line; GET /big answers 10000 bytes;
    `Connection: close` closes."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    request = buf[:end + 4]
    body = BIG_BODY if request.startswith(b"GET /big ") else b"hello " + request[:40]
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    return Reply(end + 4, response, b"connection: close" in request.lower())


def get(path: str = "/", close: bool = True) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {MMDS_IP}\r\n" +
            ("Connection: close\r\n" if close else "") + "\r\n").encode()


def expected_response(request: bytes) -> bytes:
    reply = fake_handler(request)
    assert reply is not None
    return reply.response


# -- frames, built and parsed the textbook way ----------------------------------------

def rfc1071(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(payload: bytes, *, src: bytes = GUEST, dst: bytes = MMDS, proto: int = 6,
         fragment: int = 0x4000, bad_checksum: bool = False, ident: int = 1) -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident,
                                   fragment, 64, proto, 0, src, dst))
    header[10:12] = rfc1071(bytes(header)).to_bytes(2, "big")
    if bad_checksum:
        header[10] ^= 0x40
    return bytes(header) + payload


def ether(payload: bytes, ethertype: int = 0x0800, src: bytes = GUEST_MAC,
          dst: bytes = MMDS_MAC) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def tcp_frame(sport: int, seq: int, ack: int, flags: int, *, dport: int = 80,
              window: int = 64240, payload: bytes = b"", options: bytes = b"",
              src: bytes = GUEST, csum: str = "full", mac: bytes = GUEST_MAC) -> bytes:
    """csum: "full", "partial" (the pseudo-header sum only, as a guest using
    checksum offload leaves it) or "bad"."""
    header = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq % 2**32, ack % 2**32,
                                   (20 + len(options)) // 4 << 4, flags, window, 0, 0))
    segment = header + options + payload
    pseudo = src + MMDS + struct.pack("!BBH", 0, 6, len(segment))
    if csum == "partial":
        value = ~rfc1071(pseudo) & 0xFFFF
    else:
        value = rfc1071(pseudo + bytes(segment)) ^ (0x1234 if csum == "bad" else 0)
    segment[16:18] = value.to_bytes(2, "big")
    return ether(ipv4(bytes(segment), src=src), src=mac)


def arp_request(tpa: bytes = MMDS, op: int = 1, sha: bytes = GUEST_MAC) -> bytes:
    return ether(struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, sha, GUEST,
                             bytes(6), tpa), 0x0806, src=sha, dst=b"\xff" * 6)


@dataclass
class Seg:
    dst_mac: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: bytes
    payload: bytes


def parse(frame: bytes) -> Seg:
    """A TCP frame from the stack, with every field the stack must get right checked."""
    assert frame[6:12] == MMDS_MAC and frame[12:14] == b"\x08\x00"
    ip = frame[14:]
    assert ip[0] == 0x45 and int.from_bytes(ip[2:4], "big") == len(ip)
    assert rfc1071(ip[:20]) == 0, "bad IPv4 header checksum"
    assert ip[9] == 6 and ip[12:16] == MMDS
    segment = ip[20:]
    pseudo = MMDS + ip[16:20] + struct.pack("!BBH", 0, 6, len(segment))
    assert rfc1071(pseudo + segment) == 0, "bad TCP checksum"
    sport, dport, seq, ack, offset, flags, window, _, _ = struct.unpack_from(
        "!HHIIBBHHH", segment)
    header_len = (offset >> 4) * 4
    return Seg(frame[:6], ip[16:20], sport, dport, seq, ack, flags, window,
               segment[20:header_len], segment[header_len:])


def drain(stack: MmdsStack) -> list[bytes]:
    frames = []
    while stack.has_frames():
        frame = stack.pop_frame()
        assert frame is not None, "has_frames() promised a frame"
        frames.append(frame)
    assert stack.pop_frame() is None
    return frames


def drain_tcp(stack: MmdsStack) -> list[Seg]:
    return [parse(frame) for frame in drain(stack)]


class Client:
    """The guest's end of one connection: a minimal in-order TCP that ACKs what it
    gets (or not, when a test says so)."""

    def __init__(self, stack: MmdsStack, port: int = 40000, *, mss: int | None = 1460,
                 window: int = 64240, csum: str = "full") -> None:
        self.stack, self.port, self.mss, self.window, self.csum = stack, port, mss, window, csum
        self.seq = random.Random(port).randrange(2**32)
        self.rcv_nxt = 0
        self.received = bytearray()
        self.fin = False
        self.segments: list[Seg] = []

    def send(self, flags: int, payload: bytes = b"", *, seq: int | None = None,
             options: bytes = b"", window: int | None = None) -> bool:
        frame = tcp_frame(self.port, self.seq if seq is None else seq, self.rcv_nxt, flags,
                          window=self.window if window is None else window, payload=payload,
                          options=options, csum=self.csum)
        if seq is None:
            self.seq = (self.seq + len(payload) + (1 if flags & (SYN | FIN) else 0)) % 2**32
        return self.stack.detour(frame, needs_csum=self.csum == "partial")

    def connect(self) -> Seg:
        options = LINUX_SYN_OPTIONS if self.mss == 1460 else \
            (b"" if self.mss is None else struct.pack("!BBH", 2, 4, self.mss))
        assert self.send(SYN, options=options)
        [synack] = drain_tcp(self.stack)
        assert synack.flags == SYN | ACK and synack.ack == self.seq
        assert synack.dst_mac == GUEST_MAC and synack.dst == GUEST and synack.dport == self.port
        self.rcv_nxt = (synack.seq + 1) % 2**32
        self.send(ACK)
        return synack

    def take(self, segs: list[Seg], ack: bool = True) -> list[Seg]:
        """Take this connection's in-order data and FIN; ACK once if anything came."""
        mine = [s for s in segs if s.dport == self.port]
        self.segments += mine
        progressed = False
        for s in mine:
            if s.seq == self.rcv_nxt and (s.payload or s.flags & FIN):
                self.received += s.payload
                self.rcv_nxt = (self.rcv_nxt + len(s.payload) + (s.flags & FIN)) % 2**32
                self.fin = self.fin or bool(s.flags & FIN)
                progressed = True
        if progressed and ack:
            self.send(ACK)
        return mine

    def exchange(self, request: bytes, rounds: int = 200) -> bytes:
        """Send a request; receive until the response is whole (or FIN)."""
        start = len(self.received)
        self.send(ACK | PSH, request)
        want = len(expected_response(request))
        for _ in range(rounds):
            self.take(drain_tcp(self.stack))
            if len(self.received) - start >= want or self.fin:
                break
        return bytes(self.received[start:])


@pytest.fixture()
def clock():
    return Clock()


@pytest.fixture()
def stack(clock):
    return MmdsStack(MMDS_IP, fake_handler, clock=clock)


def assert_bounded(stack: MmdsStack) -> None:
    use = stack.footprint()
    assert use["connections"] <= MAX_CONNECTIONS
    assert use["recv_bytes"] <= MAX_REQUEST_BYTES
    assert use["send_bytes"] <= len(expected_response(get("/big")))
    assert use["control"] <= MAX_PENDING_RESETS and use["arp"] <= MAX_PENDING_ARP
    assert stack.stats["internal_errors"] == 0


# -- ARP and what is not ours ------------------------------------------------------------

def test_arp_request_for_our_address_is_answered_from_the_mmds_mac(stack):
    assert stack.detour(arp_request())
    [reply] = drain(stack)
    assert reply[:6] == GUEST_MAC and reply[6:12] == MMDS_MAC and reply[12:14] == b"\x08\x06"
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack(
        "!HHBBH6s4s6s4s", reply[14:42])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 2)
    assert (sha, spa, tha, tpa) == (MMDS_MAC, MMDS, GUEST_MAC, GUEST)
    assert stack.stats["arp_replies"] == 1


def test_arp_requests_are_deduplicated_and_bounded(stack):
    for _ in range(3):
        stack.detour(arp_request())
    assert len(drain(stack)) == 1
    for n in range(MAX_PENDING_ARP + 5):
        stack.detour(arp_request(sha=bytes([6, 0, 0, 0, 1, n])))
    assert len(drain(stack)) == MAX_PENDING_ARP and stack.stats["arp_dropped"] == 5


def test_other_arp_about_our_address_is_consumed_silently(stack):
    assert stack.detour(arp_request(op=2))                    # a reply: ours, dropped
    assert stack.detour(arp_request(sha=b"\x01" + bytes(5)))  # from a multicast MAC
    assert drain(stack) == [] and stack.stats["arp_dropped"] == 2


@pytest.mark.parametrize("frame", [
    arp_request(tpa=bytes([172, 16, 0, 1])),                   # ARP for someone else
    ether(ipv4(b"x" * 20, dst=bytes([172, 16, 0, 1]))),         # IPv4 elsewhere
    ether(b"\x60" + bytes(60), 0x86DD),                         # IPv6
    ether(b"\x00\x00\x08\x00" + ipv4(b"x" * 20), 0x8100),       # VLAN-tagged
    b"", b"\x00" * 13, arp_request()[:41], ether(ipv4(b"")[:19]),
])
def test_frames_not_for_the_mmds_are_left_alone(stack, frame):
    assert not stack.detour(frame)
    assert not stack.has_frames() and stack.stats["frames_in"] == 0


def test_claims_looks_at_the_first_54_bytes_only(stack):
    frame = tcp_frame(40000, 1, 0, SYN)
    assert stack.claims(frame[:54]) and stack.claims(memoryview(frame)[:34])
    assert not stack.claims(arp_request()[:41])


# -- a whole HTTP exchange -------------------------------------------------------------

def test_http_request_and_response_with_linux_syn_options_and_close(stack):
    client = Client(stack)
    synack = client.connect()
    # Only our MSS: window scaling, SACK and timestamps stay off (RFC 7323 2.2).
    assert synack.options == struct.pack("!BBH", 2, 4, 1460)
    request = get("/latest/meta-data")
    assert client.exchange(request) == expected_response(request)
    assert client.fin                                        # close: FIN after the response
    client.send(FIN | ACK)
    [last_ack] = drain_tcp(stack)
    assert last_ack.flags == ACK and last_ack.ack == client.seq
    assert stack.connection_count() == 0 and stack.next_deadline() is None
    assert stack.stats["connections_closed"] == 1 and stack.stats["requests"] == 1


def test_keep_alive_requests_then_the_guest_closes_first(stack):
    client = Client(stack)
    client.connect()
    for path in ("/a", "/b", "/big"):
        request = get(path, close=False)
        assert client.exchange(request) == expected_response(request)
    assert not client.fin and stack.connection_count() == 1
    client.send(FIN | ACK)
    client.take(drain_tcp(stack))                            # ACK and our FIN, acked
    assert client.fin and stack.connection_count() == 0
    assert stack.stats["connections_closed"] == 1 and stack.stats["requests"] == 3


def test_partial_checksums_from_offloading_guests_are_accepted(stack):
    client = Client(stack, csum="partial")
    client.connect()
    request = get("/x")
    assert client.exchange(request) == expected_response(request)


def test_a_request_in_pieces_and_pipelined_requests(stack):
    client = Client(stack)
    client.connect()
    first, second = get("/1", close=False), get("/2", close=False)
    both = first + second
    client.send(ACK, both[:10])
    assert [s.payload for s in drain_tcp(stack)] == [b""]    # an ACK, no answer yet
    received = client.exchange(both[10:])
    # One response in flight at most: the second follows once the first is acked.
    for _ in range(5):
        client.take(drain_tcp(stack))
    assert bytes(client.received) == expected_response(first) + expected_response(second)
    assert received.startswith(expected_response(first))


@pytest.mark.parametrize("mss", [536, 100, None, 20])
def test_responses_are_cut_to_the_guests_mss(stack, mss):
    client = Client(stack, mss=mss)
    client.connect()
    request = get("/big")
    assert client.exchange(request) == expected_response(request)
    limit = {None: 536, 20: 48}.get(mss, mss)                 # the default; the minimum
    data = [s for s in client.segments if s.payload]
    assert max(len(s.payload) for s in data) == limit


def test_responses_stay_in_the_guests_window(stack):
    client = Client(stack, window=3000)
    client.connect()
    client.send(ACK | PSH, get("/big"))
    segs = drain_tcp(stack)
    assert sum(len(s.payload) for s in segs) == 3000         # the window, no more
    client.take(segs, ack=False)
    client.window = 1000
    client.send(ACK)                                          # all acked, a smaller window
    assert sum(len(s.payload) for s in drain_tcp(stack)) == 1000


def test_a_zero_window_is_probed_and_the_response_follows_when_it_opens(stack, clock):
    client = Client(stack, window=0)
    client.connect()
    client.send(ACK | PSH, get("/"))
    [ack] = drain_tcp(stack)
    assert ack.payload == b"" and ack.ack == client.seq
    deadline = stack.next_deadline()
    assert deadline is not None and deadline < clock.now + 1
    clock.now = deadline
    stack.tick()
    [probe] = drain_tcp(stack)
    assert probe.seq == (ack.seq - 1) % 2**32 and probe.payload == b""
    client.window = 64240
    client.send(ACK)                                          # the probe's answer
    client.take(drain_tcp(stack))
    assert bytes(client.received) == expected_response(get("/"))
    assert stack.stats["window_probes"] == 1


# -- loss and retransmission -----------------------------------------------------------

def test_unacknowledged_data_is_retransmitted_then_the_connection_reset(stack, clock):
    client = Client(stack)
    client.connect()
    client.send(ACK | PSH, get("/big"))
    first = drain_tcp(stack)
    assert first and first[0].payload
    for attempt in range(netstack.MAX_RETRANSMITS):
        deadline = stack.next_deadline()
        assert deadline is not None and deadline > clock.now
        clock.now = deadline
        stack.tick()
        again = drain_tcp(stack)
        assert again[0].seq == first[0].seq and again[0].payload == first[0].payload
    clock.now = stack.next_deadline()
    stack.tick()
    [rst] = drain_tcp(stack)
    assert rst.flags == RST and rst.seq == first[0].seq      # where the guest stands
    assert stack.connection_count() == 0
    assert stack.stats["retransmits"] == netstack.MAX_RETRANSMITS
    assert clock.now - 1000 < 20                              # backoff, capped


def test_a_lost_segment_is_sent_again_and_the_exchange_completes(stack, clock):
    client = Client(stack, mss=536)
    client.connect()
    client.send(ACK | PSH, get("/big"))
    segs = drain_tcp(stack)
    client.take(segs[:1])                                    # the rest are lost
    for _ in range(50):
        if client.fin:
            break
        clock.now = stack.next_deadline()
        stack.tick()
        client.take(drain_tcp(stack))
    assert bytes(client.received) == expected_response(get("/big")) and client.fin


def test_the_guests_retransmitted_segments_are_acknowledged_again(stack):
    client = Client(stack)
    client.connect()
    request = get("/", close=False)
    seq = client.seq
    client.exchange(request)
    client.send(ACK | PSH, request, seq=seq)                  # old: our ACK got lost
    [ack] = drain_tcp(stack)
    assert ack.payload == b"" and ack.ack == client.seq and stack.stats["requests"] == 1


def test_out_of_order_data_is_dropped_with_a_duplicate_ack(stack):
    client = Client(stack)
    client.connect()
    request = get("/")
    client.send(ACK, request[5:], seq=client.seq + 5)
    [dup] = drain_tcp(stack)
    assert dup.ack == client.seq and stack.stats["tcp_out_of_order"] == 1
    # An overlapping retransmission is trimmed to what is new.
    base = client.seq
    client.send(ACK, request[:3], seq=base)
    drain_tcp(stack)
    client.seq = base + len(request)
    client.send(ACK | PSH, request[1:], seq=base + 1)
    for _ in range(5):
        client.take(drain_tcp(stack))
    assert bytes(client.received) == expected_response(request)


def test_a_lost_syn_ack_is_sent_again_and_a_retransmitted_syn_gets_it_again(stack, clock):
    client = Client(stack)
    syn_seq = client.seq
    client.send(SYN, options=LINUX_SYN_OPTIONS)
    [first] = drain_tcp(stack)
    client.send(SYN, seq=syn_seq, options=LINUX_SYN_OPTIONS)
    [again] = drain_tcp(stack)
    assert again.seq == first.seq and again.flags == SYN | ACK
    clock.now = stack.next_deadline()
    stack.tick()
    [third] = drain_tcp(stack)
    assert third.seq == first.seq
    client.rcv_nxt = first.seq + 1
    client.send(ACK)
    assert client.exchange(get("/")) == expected_response(get("/"))


# -- resets, floods, timeouts ------------------------------------------------------------

def test_other_ports_and_unknown_connections_get_resets(stack):
    stack.detour(tcp_frame(5000, 100, 0, SYN, dport=81))
    stack.detour(tcp_frame(5001, 100, 777, ACK, payload=b"xy"))
    stack.detour(tcp_frame(5002, 100, 0, RST))                # an RST is never answered
    stack.detour(tcp_frame(5003, 100, 0, FIN, payload=b"abc"))
    a, b, c = drain_tcp(stack)
    assert (a.flags, a.seq, a.ack, a.sport, a.dport) == (RST | ACK, 0, 101, 81, 5000)
    assert (b.flags, b.seq, b.sport) == (RST, 777, 80)
    assert (c.flags, c.ack) == (RST | ACK, 104)
    assert stack.stats["tcp_closed_port"] == 1 and stack.stats["tcp_no_connection"] == 3


def test_pending_resets_are_bounded(stack):
    for port in range(1000, 1500):
        stack.detour(tcp_frame(port, 1, 0, SYN, dport=22))
    assert stack.footprint()["control"] == MAX_PENDING_RESETS
    assert stack.stats["control_dropped"] == 500 - MAX_PENDING_RESETS
    assert len(drain(stack)) == MAX_PENDING_RESETS


def test_the_guests_reset_ends_a_connection_only_in_sequence(stack):
    client = Client(stack)
    client.connect()
    client.send(RST, seq=client.seq + 100000)
    assert stack.connection_count() == 1 and stack.stats["tcp_bad_rst"] == 1
    client.send(RST)
    assert stack.connection_count() == 0 and drain(stack) == []


def test_a_syn_flood_is_bounded_and_spares_established_connections(stack, clock):
    client = Client(stack, port=39999)
    client.connect()
    for port in range(1000, 3000):
        stack.detour(tcp_frame(port, port * 7919, 0, SYN, options=LINUX_SYN_OPTIONS))
        if port % 100 == 0:
            clock.now += 0.01
            drain(stack)
        assert stack.connection_count() <= MAX_CONNECTIONS
    assert stack.stats["connections_evicted"] == 2000 - (MAX_CONNECTIONS - 1)
    drain(stack)
    assert client.exchange(get("/")) == expected_response(get("/"))
    # The half-open ones give up after their SYN-ACK retries.
    for _ in range(20):
        deadline = stack.next_deadline()
        if deadline is None:
            break
        clock.now = max(clock.now, deadline)
        stack.tick()
        drain(stack)
    assert stack.connection_count() == 0
    assert_bounded(stack)


def test_when_full_the_connection_heard_from_longest_ago_goes(stack, clock):
    clients = []
    for n in range(MAX_CONNECTIONS):
        client = Client(stack, port=2000 + n)
        client.connect()
        clients.append(client)
        clock.now += 1
    clients[0].send(ACK, get("/", close=False)[:4])           # 2000 heard from again
    drain(stack)
    newcomer = Client(stack, port=3000)
    newcomer.send(SYN)
    rst, synack = drain_tcp(stack)
    assert rst.flags == RST and rst.dport == 2001 and synack.dport == 3000


def test_idle_and_half_open_connections_time_out(stack, clock):
    idle = Client(stack, port=1)
    idle.connect()
    half = Client(stack, port=2)
    half.send(SYN)
    drain(stack)
    clock.now += IDLE_TIMEOUT
    stack.tick()
    resets = drain_tcp(stack)
    assert {s.dport for s in resets} == {1, 2} and all(s.flags & RST for s in resets)
    assert stack.connection_count() == 0 and stack.stats["connections_timed_out"] == 2


# -- requests the handler cannot take ----------------------------------------------------

def test_a_request_filling_the_buffer_resets_the_connection(stack):
    client = Client(stack)
    client.connect()
    client.send(ACK, b"G" * 1400)
    client.send(ACK, b"G" * 1400)
    client.send(ACK, b"G" * 1400)          # 4200 > MAX_REQUEST_BYTES: the window ends it
    segs = drain_tcp(stack)
    assert segs[-1].flags == RST and stack.connection_count() == 0
    assert stack.stats["requests_too_large"] == 1


def test_the_handler_never_sees_more_than_max_request_bytes(clock):
    seen = []

    def handler(buf):
        seen.append(len(buf))
        return None
    stack = MmdsStack(MMDS_IP, handler, clock=clock)
    client = Client(stack, csum="partial")
    client.connect()
    # A GSO frame (a 6000-byte segment) from a guest using TSO: the window's worth is taken.
    client.send(ACK, b"x" * 6000)
    assert max(seen) == MAX_REQUEST_BYTES and stack.stats["tcp_beyond_window"] == 1
    assert stack.connection_count() == 0                      # full and incomplete: reset


def test_a_handler_that_raises_resets_its_connection_only(clock):
    def handler(buf):
        raise RuntimeError("boom")
    stack = MmdsStack(MMDS_IP, handler, clock=clock)
    client = Client(stack)
    client.connect()
    client.send(ACK | PSH, get("/"))
    assert [s.flags for s in drain_tcp(stack)] == [RST]
    assert stack.stats["handler_errors"] == 1 and stack.stats["internal_errors"] == 0


# -- what is dropped at the IP layer -----------------------------------------------------

@pytest.mark.parametrize("frame, counter", [
    (tcp_frame(1, 1, 0, SYN, csum="bad"), "tcp_bad_checksum"),
    (ether(ipv4(b"\x00" * 20, bad_checksum=True)), "ip_bad_checksum"),
    (ether(ipv4(b"\x00" * 20, fragment=0x2000)), "ip_fragments"),
    (ether(ipv4(b"\x00" * 20, fragment=0x0010)), "ip_fragments"),
    (ether(ipv4(b"\x08\x00" + bytes(10), proto=1)), "ip_not_tcp"),
    (ether(ipv4(b"\x00" * 8, proto=17)), "ip_not_tcp"),
    (ether(ipv4(b"\x00" * 20)[:20] + b"\x00" * 19), "ip_malformed"),
    (ether(ipv4(b"\x00" * 10)), "tcp_malformed"),
    (tcp_frame(1, 1, 0, SYN, src=bytes([224, 0, 0, 1])), "bad_source"),
    (tcp_frame(1, 1, 0, SYN, mac=b"\xff" * 6), "bad_source"),
])
def test_bad_packets_for_our_address_are_consumed_and_counted(stack, frame, counter):
    assert stack.detour(frame)
    assert drain(stack) == [] and stack.stats[counter] == 1
    assert stack.connection_count() == 0


def test_ethernet_padding_after_the_ip_packet_is_ignored(stack):
    frame = tcp_frame(1234, 1, 0, SYN) + bytes(20)
    stack.detour(frame)
    assert [s.flags for s in drain_tcp(stack)] == [SYN | ACK]


# -- fuzzing ---------------------------------------------------------------------------

def normal_exchange_works(stack: MmdsStack, port: int = 65000) -> None:
    drain(stack)
    client = Client(stack, port=port)
    client.connect()
    assert client.exchange(get("/")) == expected_response(get("/"))


@FUZZ
@given(frames=st.lists(st.one_of(
    st.binary(max_size=120),
    st.builds(lambda tail: tcp_frame(1, 1, 0, SYN)[:34] + tail, st.binary(max_size=80)),
    st.builds(lambda tail: arp_request()[:38] + MMDS + tail, st.binary(max_size=10)),
    st.builds(lambda b: ether(ipv4(b)), st.binary(max_size=80))), max_size=30),
    csum=st.booleans())
def test_random_frames_never_raise_and_leave_the_stack_working(frames, csum):
    clock = Clock()
    stack = MmdsStack(MMDS_IP, fake_handler, clock=clock)
    for frame in frames:
        stack.detour(frame, needs_csum=csum)
        if stack.has_frames():
            stack.pop_frame()
    assert_bounded(stack)
    normal_exchange_works(stack)
    assert_bounded(stack)


MUTATIONS = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4)


@FUZZ
@given(script=st.lists(st.tuples(
    st.sampled_from(["data", "ack", "fin", "syn", "rst", "tick", "pop"]),
    st.one_of(st.just(0), st.integers(-3, 3), st.integers(-3000, 3000)),
    st.one_of(st.just(64240), st.integers(0, 2**16 - 1)),
    st.one_of(st.just([]), MUTATIONS), st.booleans()),
    max_size=40))
def test_mutated_segments_on_a_live_connection(script):
    clock = Clock()
    stack = MmdsStack(MMDS_IP, fake_handler, clock=clock)
    client = Client(stack, port=4000, csum="partial")
    client.connect()
    flags_of = {"data": ACK | PSH, "ack": ACK, "fin": FIN | ACK, "syn": SYN, "rst": RST}
    for kind, shift, window, mutations, checksum in script:
        if kind == "tick":
            clock.now += abs(shift) / 100
            stack.tick()
            continue
        if kind == "pop":
            for frame in drain(stack):
                client.take([parse(frame)]) if frame[12:14] == b"\x08\x00" else None
            continue
        payload = get("/big", close=False) if kind == "data" else b""
        frame = bytearray(tcp_frame(client.port, client.seq + shift, client.rcv_nxt + shift,
                                    flags_of[kind], window=window, payload=payload,
                                    csum="full" if checksum else "partial"))
        for offset, value in mutations:
            frame[offset % len(frame)] = value
        stack.detour(bytes(frame), needs_csum=not checksum)
        assert_bounded(stack)
    for _ in range(200):                     # time passes: everything ends
        deadline = stack.next_deadline()
        if deadline is None:
            break
        clock.now = max(clock.now, deadline)
        stack.tick()
        drain(stack)
    assert stack.connection_count() == 0
    normal_exchange_works(stack)
    assert_bounded(stack)

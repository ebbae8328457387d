"""The MMDS's own network stack: ARP, IPv4 and TCP for one address, inside virtio-net.

Firecracker's microVM metadata service answers the guest at a link-local address
(169.254.169.254 by default) from within the virtio-net device: frames the guest
sends to that address are detoured to this stack and never reach the TAP, and the
stack's answers are put in the guest's receive queue ahead of the TAP's frames.
Firecracker's stack is its `dumbo` crate (src/vmm/src/dumbo/, src/vmm/src/mmds/ns.rs);
this one is smaller and keeps its numbers where they matter: the MMDS MAC address,
30 connections, 100 pending resets.

What it does, no more:
- ARP (RFC 826): a request for our address gets a reply from MMDS_MAC.
- IPv4 (RFC 791): the header checksum is checked and options are skipped;
  fragments are dropped (requests fit a segment), and so is anything but TCP.
- TCP (RFC 9293) on port 80, passive open only: SYN / SYN-ACK with our MSS
  option (the guest's window scaling, timestamps and SACK options are ignored,
  so by RFC 7323 section 2.2 and RFC 2018 neither side uses them), in-order data
  only (a segment ahead of what we expect is dropped and answered with a
  duplicate ACK; the guest retransmits), a receive window of what is left of the
  request buffer, responses cut to the guest's MSS and limited by its window,
  FIN both ways, RST for what belongs to no connection, retransmission of our
  unacknowledged data (and SYN-ACK, FIN) on a timeout with exponential backoff
  and a bounded number of tries, zero-window probes, and an idle timeout.

Segments are made when the device asks for them (pop_frame()), from each
connection's state, as dumbo's write_next_frame() does: nothing is queued but
ARP replies and control segments (RST, a last ACK), and those queues are bounded.

The HTTP side is a handler: handler(buffer) gets the bytes received on a
connection and not yet consumed (at most MAX_REQUEST_BYTES), and returns None
while no whole request is there, or a reply (`consumed`, `response`, `close`:
pyvmm.mmds.service's HttpReply).  A connection has one response in flight at
most: the next request waits until the guest acknowledged the last byte of the
previous response.  A buffer full without a whole request resets the connection.

Bounds (all per stack): MAX_CONNECTIONS connections, each with at most
MAX_REQUEST_BYTES received and one response to send; MAX_PENDING_RESETS control
segments; MAX_PENDING_ARP ARP replies.  No input makes detour(), tick() or
pop_frame() raise: anything unexpected is dropped and counted in `stats`.
"""
from __future__ import annotations

import collections
import ipaddress
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

# The most the handler is ever given, and so our receive window: the HTTP
# service's limit (Firecracker's RCV_BUF_MAX_SIZE).
from pyvmm.mmds.service import MAX_REQUEST_BYTES


class Reply(Protocol):
    """What the handler returns for a whole request (pyvmm.mmds.service.HttpReply)."""
    consumed: int          # bytes of the buffer the request took
    response: bytes        # the whole HTTP response
    close: bool            # close the connection once the response is sent


Handler = Callable[[bytes], "Reply | None"]

# Firecracker's MmdsNetworkStack (src/vmm/src/mmds/ns.rs): DEFAULT_MAC_ADDR,
# DEFAULT_TCP_PORT, DEFAULT_MAX_CONNECTIONS and DEFAULT_MAX_PENDING_RESETS.
MMDS_MAC = bytes.fromhex("060123456701")
MMDS_PORT = 80
MAX_CONNECTIONS = 30
MAX_PENDING_RESETS = 100
# dumbo keeps one pending ARP reply; a few, deduplicated, cost nothing and lose
# none when several guest addresses ask at once.
MAX_PENDING_ARP = 8

# Ethernet (IEEE 802.3) and ARP (RFC 826)
ETH_HEADER = struct.Struct("!6s6sH")
ETH_HEADER_LEN = ETH_HEADER.size                   # 14
ETHERTYPE_IPV4, ETHERTYPE_ARP = 0x0800, 0x0806
ARP_PACKET = struct.Struct("!HHBBH6s4s6s4s")       # RFC 826 "Packet format", 28 bytes
ARP_HTYPE_ETHERNET, ARP_OP_REQUEST, ARP_OP_REPLY = 1, 1, 2
ARP_TPA_OFFSET = ETH_HEADER_LEN + 24

# IPv4 (RFC 791 section 3.1)
IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")       # without options, 20 bytes
IPV4_MIN_HEADER = IPV4_HEADER.size
IPV4_DST_OFFSET = ETH_HEADER_LEN + 16
IPV4_FLAG_DF, IPV4_FLAG_MF, IPV4_FRAGMENT_OFFSET = 0x4000, 0x2000, 0x1FFF
IPV4_TTL = 64                                      # RFC 1700's default TTL, Linux's too
PROTOCOL_TCP = 6

# TCP (RFC 9293 section 3.1): header without options; flags; options (3.2)
TCP_HEADER = struct.Struct("!HHIIBBHHH")
TCP_MIN_HEADER = TCP_HEADER.size                   # 20
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
OPT_EOL, OPT_NOP, OPT_MSS = 0, 1, 2
SEQ_MOD = 1 << 32

# Segment sizes.  MSS_DEFAULT is what a SYN without the option means (RFC 9293
# 3.7.1); a smaller MSS is raised to MSS_MIN, Linux's tcp_min_snd_mss (a 1-byte
# MSS would cost a frame per byte).  We send at most MSS_MAX per segment: a
# 1500-byte MTU's worth, what any guest interface takes without offloads.
MSS_DEFAULT = 536
MSS_MIN = 48
MSS_MAX = 1460

# Timers, in seconds of the stack's clock.  dumbo retransmits every ~300 ms up
# to 15 times; we back off exponentially (RFC 6298 5.5) from RTO_INITIAL, well
# under RFC 6298's 1 s because the "link" is guest memory, to RTO_MAX, giving
# up after MAX_RETRANSMITS (~12 s) or, for a SYN-ACK nobody answers (a SYN
# flood), after MAX_SYNACK_RETRANSMITS (Linux's tcp_synack_retries).
RTO_INITIAL = 0.25
RTO_MAX = 2.0
MAX_RETRANSMITS = 8
MAX_SYNACK_RETRANSMITS = 5
# A connection the guest sent nothing on for this long is reset and forgotten
# (dumbo only makes it evictable after ~10 s; it is never removed otherwise).
IDLE_TIMEOUT = 30.0


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): the ones' complement of the ones'
    complement sum of the big-endian 16-bit words, zero-padded to even length.
    That sum is congruent to the whole bytes' value modulo 0xFFFF, because
    2**16 = 1 modulo 0xFFFF; int.from_bytes does the adding in C."""
    if len(data) % 2:
        data += b"\0"
    value = int.from_bytes(data, "big")
    total = value % 0xFFFF or (0xFFFF if value else 0)
    return 0xFFFF - total


def _after(a: int, b: int) -> bool:
    """a comes after b in sequence space (RFC 9293 3.4, modulo 2**32)."""
    return 0 < (a - b) % SEQ_MOD < SEQ_MOD // 2


def _seq(a: int) -> int:
    return a % SEQ_MOD


def _unicast_mac(mac: bytes) -> bool:
    return not mac[0] & 1


def _unicast_ipv4(addr: bytes) -> bool:
    """An address a reply may go to: not 0.0.0.0, not multicast or broadcast."""
    return addr != b"\0\0\0\0" and addr[0] < 224


@dataclass(eq=False)
class _Connection:
    """One guest connection to port 80.  Sequence numbers are absolute (mod 2**32):
    `send` holds the response bytes from `send_base` on, those the guest has not
    acknowledged yet; our FIN, once `closing`, follows its last byte."""
    mac: bytes                    # the guest interface's, where replies go
    addr: bytes
    port: int
    irs: int                      # the guest's initial sequence number
    iss: int                      # ours
    mss: int                      # the guest's, clamped
    rcv_nxt: int
    snd_wnd_edge: int             # the guest's window's right edge
    last_heard: float
    snd_una: int = 0
    snd_nxt: int = 0
    snd_max: int = 0              # the highest sequence number sent (go-back-N goes back)
    send_base: int = 0
    send: bytearray = field(default_factory=bytearray)
    recv: bytearray = field(default_factory=bytearray)
    established: bool = False
    synack_due: bool = True
    ack_due: bool = False
    probe_due: bool = False
    closing: bool = False         # no more requests: FIN after the response
    fin_received: bool = False
    rto: float = RTO_INITIAL
    rto_at: float | None = None
    retries: int = 0

    def __post_init__(self) -> None:
        self.snd_una = self.snd_nxt = self.snd_max = self.iss
        self.send_base = _seq(self.iss + 1)

    @property
    def data_end(self) -> int:
        return _seq(self.send_base + len(self.send))

    @property
    def window(self) -> int:
        return MAX_REQUEST_BYTES - len(self.recv)

    def fin_acked(self) -> bool:
        return self.closing and not self.send and self.snd_una == _seq(self.send_base + 1)

    def sendable(self) -> tuple[int, int]:
        """(offset into `send` of the next byte to send, how many may go now)."""
        offset = (self.snd_nxt - self.send_base) % SEQ_MOD
        if offset >= len(self.send):
            return offset, 0
        room = (self.snd_wnd_edge - self.snd_nxt) % SEQ_MOD
        if room >= SEQ_MOD // 2:                    # the edge is behind us: no room
            room = 0
        return offset, min(len(self.send) - offset, room, self.mss)

    def fin_due(self) -> bool:
        return self.closing and self.snd_nxt == self.data_end

    def wants_to_send(self) -> bool:
        """Whether MmdsStack._connection_frame() has a segment for this connection."""
        if self.synack_due:
            return True
        if not self.established:
            return False
        return self.ack_due or self.probe_due or self.sendable()[1] > 0 or self.fin_due()


@dataclass(frozen=True)
class _Control:
    """A segment to send that belongs to no connection (any more): an RST, or
    the ACK of the FIN that ended one."""
    mac: bytes
    addr: bytes
    port: int
    seq: int
    ack: int
    flags: int
    local_port: int = MMDS_PORT       # an RST for another port comes from that port


class MmdsStack:
    """ARP and TCP for `ipv4_address`, HTTP through `handler` (module docstring).
    Not thread-safe: the device calls it under its serving lock."""

    def __init__(self, ipv4_address: str, handler: Handler, *,
                 clock: Callable[[], float] = time.monotonic, mac: bytes = MMDS_MAC) -> None:
        self.address = ipaddress.IPv4Address(ipv4_address).packed
        self.handler = handler
        self.clock = clock
        self.mac = bytes(mac)
        self._connections: collections.OrderedDict[tuple[bytes, int], _Connection] = \
            collections.OrderedDict()
        self._control: collections.deque[_Control] = collections.deque()
        self._arp: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._ip_id = 0
        self.stats: dict[str, int] = collections.Counter()

    # -- the device's side -------------------------------------------------------

    def claims(self, head: bytes | memoryview) -> bool:
        """Whether a guest frame whose first bytes are `head` is the MMDS's: an ARP
        packet asking about our address, or IPv4 to it (Firecracker's is_mmds_frame;
        its first 42 bytes are enough)."""
        if len(head) < ETH_HEADER_LEN:
            return False
        ethertype = head[12] << 8 | head[13]
        if ethertype == ETHERTYPE_ARP:
            return len(head) >= ARP_TPA_OFFSET + 4 and \
                head[ARP_TPA_OFFSET:ARP_TPA_OFFSET + 4] == self.address
        if ethertype == ETHERTYPE_IPV4:
            return len(head) >= ETH_HEADER_LEN + IPV4_MIN_HEADER and \
                head[IPV4_DST_OFFSET:IPV4_DST_OFFSET + 4] == self.address
        return False

    def detour(self, frame: bytes | memoryview, *, needs_csum: bool = False) -> bool:
        """Take an Ethernet frame the guest sent (no vnet header).  False: not the
        MMDS's, forward it.  True: consumed, answered or dropped.  `needs_csum`: the
        guest left the TCP checksum to the device (virtio-net's NEEDS_CSUM, or a GSO
        frame): its checksum field is partial and is not checked."""
        try:
            if not self.claims(frame):
                return False
            self.stats["frames_in"] += 1
            data = bytes(frame)
            if data[12:14] == b"\x08\x06":
                self._receive_arp(data)
            else:
                self._receive_ipv4(data, needs_csum)
        except Exception:  # noqa: BLE001 - a stack bug must not reach the device
            self.stats["internal_errors"] += 1
        return True

    def has_frames(self) -> bool:
        return bool(self._arp or self._control) or \
            any(conn.wants_to_send() for conn in self._connections.values())

    def pop_frame(self) -> bytes | None:
        """The next frame for the guest: ARP replies first, then control segments,
        then the connections' segments, round robin."""
        try:
            frame = self._next_frame()
        except Exception:  # noqa: BLE001
            self.stats["internal_errors"] += 1
            return None
        if frame is not None:
            self.stats["frames_out"] += 1
        return frame

    def next_deadline(self) -> float | None:
        """When tick() has work: a retransmission, a probe or an idle timeout."""
        deadlines = [conn.last_heard + IDLE_TIMEOUT for conn in self._connections.values()]
        deadlines += [conn.rto_at for conn in self._connections.values()
                      if conn.rto_at is not None]
        return min(deadlines, default=None)

    def tick(self) -> None:
        """Run the timers that are due."""
        try:
            now = self.clock()
            for conn in list(self._connections.values()):
                self._expire(conn, now)
        except Exception:  # noqa: BLE001
            self.stats["internal_errors"] += 1

    def connection_count(self) -> int:
        return len(self._connections)

    def footprint(self) -> dict[str, int]:
        """What the stack holds now (for tests and stats): connections, buffered
        request and response bytes, queued control segments and ARP replies."""
        conns = self._connections.values()
        return {"connections": len(self._connections),
                "recv_bytes": max((len(c.recv) for c in conns), default=0),
                "send_bytes": max((len(c.send) for c in conns), default=0),
                "control": len(self._control), "arp": len(self._arp)}

    # -- ARP -----------------------------------------------------------------------

    def _receive_arp(self, frame: bytes) -> None:
        if len(frame) < ETH_HEADER_LEN + ARP_PACKET.size:
            self.stats["arp_dropped"] += 1
            return
        htype, ptype, hlen, plen, op, sha, spa, _, tpa = ARP_PACKET.unpack_from(
            frame, ETH_HEADER_LEN)
        if (htype, ptype, hlen, plen, op) != (ARP_HTYPE_ETHERNET, ETHERTYPE_IPV4, 6, 4,
                                              ARP_OP_REQUEST) or not _unicast_mac(sha):
            self.stats["arp_dropped"] += 1          # a reply, a probe from a multicast MAC
            return
        if (sha, spa) in self._arp:
            return
        if len(self._arp) >= MAX_PENDING_ARP:
            self.stats["arp_dropped"] += 1
            return
        self._arp.append((sha, spa))

    def _arp_reply(self, sha: bytes, spa: bytes) -> bytes:
        self.stats["arp_replies"] += 1
        return ETH_HEADER.pack(sha, self.mac, ETHERTYPE_ARP) + ARP_PACKET.pack(
            ARP_HTYPE_ETHERNET, ETHERTYPE_IPV4, 6, 4, ARP_OP_REPLY, self.mac, self.address,
            sha, spa)

    # -- IPv4 and TCP in -------------------------------------------------------------

    def _receive_ipv4(self, frame: bytes, needs_csum: bool) -> None:
        src_mac = frame[6:12]
        packet = frame[ETH_HEADER_LEN:]
        version_ihl, total = packet[0], int.from_bytes(packet[2:4], "big")
        ihl = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or ihl < IPV4_MIN_HEADER or not ihl <= total <= len(packet):
            self.stats["ip_malformed"] += 1
            return
        packet = packet[:total]                     # Ethernet padding off
        if _checksum(packet[:ihl]) != 0:
            self.stats["ip_bad_checksum"] += 1
            return
        fragment = int.from_bytes(packet[6:8], "big")
        if fragment & (IPV4_FLAG_MF | IPV4_FRAGMENT_OFFSET):
            self.stats["ip_fragments"] += 1         # requests fit one segment: not reassembled
            return
        if packet[9] != PROTOCOL_TCP:
            self.stats["ip_not_tcp"] += 1
            return
        src = packet[12:16]
        if not _unicast_mac(src_mac) or not _unicast_ipv4(src) or src == self.address:
            self.stats["bad_source"] += 1           # nowhere to answer to
            return
        self._receive_tcp(src_mac, src, packet[ihl:], needs_csum)

    def _receive_tcp(self, mac: bytes, src: bytes, segment: bytes, needs_csum: bool) -> None:
        if len(segment) < TCP_MIN_HEADER:
            self.stats["tcp_malformed"] += 1
            return
        sport, dport, seq, ack, offset, flags, window, _, _ = TCP_HEADER.unpack_from(segment)
        header_len = (offset >> 4) * 4
        if not TCP_MIN_HEADER <= header_len <= len(segment):
            self.stats["tcp_malformed"] += 1
            return
        if not needs_csum:
            pseudo = src + self.address + struct.pack("!BBH", 0, PROTOCOL_TCP, len(segment))
            if _checksum(pseudo + segment) != 0:
                self.stats["tcp_bad_checksum"] += 1
                return
        payload = segment[header_len:]
        if dport != MMDS_PORT:
            self.stats["tcp_closed_port"] += 1
            self._reset_unknown(mac, src, sport, seq, ack, flags, len(payload), dport)
            return
        now = self.clock()
        conn = self._connections.get((src, sport))
        if conn is None:
            if flags & (SYN | ACK | RST | FIN) == SYN:
                self._open(mac, src, sport, seq, window, segment[TCP_MIN_HEADER:header_len],
                           now)
            else:
                self.stats["tcp_no_connection"] += 1
                self._reset_unknown(mac, src, sport, seq, ack, flags, len(payload))
            return
        if not conn.established and flags & (SYN | ACK | RST | FIN) == SYN and seq != conn.irs:
            # 3.10.7.4, SYN-RECEIVED: a new SYN takes the half-open connection's place.
            self._remove(conn)
            self._open(mac, src, sport, seq, window, segment[TCP_MIN_HEADER:header_len], now)
            return
        conn.mac = mac
        self._segment(conn, seq, ack, flags, window, payload, now)
        self._after_event(conn, now)

    def _open(self, mac: bytes, src: bytes, port: int, seq: int, window: int,
              options: bytes, now: float) -> None:
        """A SYN for a new connection (RFC 9293 3.10.7.2, LISTEN): make room, then
        answer with a SYN-ACK (pop_frame)."""
        if len(self._connections) >= MAX_CONNECTIONS:
            self._evict()
        iss = int.from_bytes(os.urandom(4), "big")   # RFC 6528: not guessable
        mss = max(MSS_MIN, min(self._parse_mss(options), MSS_MAX))
        conn = _Connection(mac=mac, addr=src, port=port, irs=seq, iss=iss, mss=mss,
                           rcv_nxt=_seq(seq + 1), snd_wnd_edge=_seq(iss + 1 + window),
                           last_heard=now)
        self._connections[(src, port)] = conn
        self.stats["connections_opened"] += 1

    def _parse_mss(self, options: bytes) -> int:
        """The MSS option's value (RFC 9293 3.7.1), MSS_DEFAULT without one.  Other
        options (window scale, SACK permitted, timestamps) are skipped: not
        echoing them in the SYN-ACK turns them off."""
        i = 0
        while i < len(options):
            kind = options[i]
            if kind == OPT_EOL:
                break
            if kind == OPT_NOP:
                i += 1
                continue
            if i + 1 >= len(options) or options[i + 1] < 2:
                self.stats["tcp_bad_options"] += 1
                break
            length = options[i + 1]
            if kind == OPT_MSS and length == 4 and i + 4 <= len(options):
                return int.from_bytes(options[i + 2:i + 4], "big")
            i += length
        return MSS_DEFAULT

    def _evict(self) -> None:
        """Make room for a new connection: the half-open one heard from longest ago
        (a SYN flood replaces itself), else the connection heard from longest ago."""
        conns = list(self._connections.values())
        half_open = [c for c in conns if not c.established]
        victim = min(half_open or conns, key=lambda c: c.last_heard)
        self.stats["connections_evicted"] += 1
        self._abort(victim)

    def _segment(self, conn: _Connection, seq: int, ack: int, flags: int, window: int,
                 payload: bytes, now: float) -> None:
        """A segment on a known connection (RFC 9293 3.10.7.4, much simplified)."""
        if flags & RST:
            # RFC 5961 3.2: only an RST in the window is believed.
            if 0 <= (seq - conn.rcv_nxt) % SEQ_MOD < max(conn.window, 1):
                self.stats["connections_reset_by_guest"] += 1
                self._remove(conn)
            else:
                self.stats["tcp_bad_rst"] += 1
            return
        if flags & SYN:
            if not conn.established and seq == conn.irs and not flags & ACK:
                conn.synack_due = True              # our SYN-ACK was lost: again
                conn.snd_nxt = conn.iss
            else:
                # RFC 5961 4.2: a challenge ACK; a guest that lost the connection
                # answers it with an RST and then opens a new one.
                self.stats["tcp_unexpected_syn"] += 1
                conn.ack_due = True
            return
        if not flags & ACK:
            self.stats["tcp_no_ack"] += 1
            return
        if not conn.established:
            if ack != _seq(conn.iss + 1):
                self.stats["tcp_bad_ack"] += 1      # 3.10.7.4 SYN-RECEIVED: reset it
                self._queue_control(conn.mac, conn.addr, conn.port, ack, 0, RST)
                return
            conn.established = True
            conn.synack_due = False
            conn.snd_una = conn.snd_nxt = ack
            if _after(ack, conn.snd_max):
                conn.snd_max = ack
            conn.snd_wnd_edge = _seq(ack + window)
            conn.rto_at, conn.rto, conn.retries = None, RTO_INITIAL, 0
        elif not self._acknowledge(conn, ack, window):
            return
        conn.last_heard = now
        self._take_data(conn, seq, flags & FIN, payload)

    def _acknowledge(self, conn: _Connection, ack: int, window: int) -> bool:
        """Process an established connection's ACK field; False to drop the segment."""
        if _after(ack, conn.snd_max):
            self.stats["tcp_bad_ack"] += 1          # acknowledges what we never sent
            conn.ack_due = True
            return False
        if _after(ack, conn.snd_una):
            acked = min((ack - conn.send_base) % SEQ_MOD, len(conn.send)) \
                if _after(ack, conn.send_base) else 0
            del conn.send[:acked]
            conn.send_base = _seq(conn.send_base + acked)
            conn.snd_una = ack
            if _after(ack, conn.snd_nxt):
                conn.snd_nxt = ack                  # acknowledged before our go-back
            conn.rto_at, conn.rto, conn.retries = None, RTO_INITIAL, 0
        if not _after(conn.snd_una, ack):           # not an old ACK: its window counts
            conn.snd_wnd_edge = _seq(ack + window)
            if conn.snd_una == conn.snd_nxt:
                conn.retries = 0                    # a zero-window probe was answered
        return True

    def _take_data(self, conn: _Connection, seq: int, fin: int, payload: bytes) -> None:
        """In-order data and FIN (3.10.7.4, "sixth" to "eighth"): what is in sequence
        and in the window is taken; anything else is answered with our ACK."""
        if not payload and not fin:
            return
        if conn.fin_received:
            conn.ack_due = True                     # a retransmission of what we have
            return
        behind = (conn.rcv_nxt - seq) % SEQ_MOD
        if behind and behind < SEQ_MOD // 2:        # starts before what we expect
            if behind >= len(payload) + (1 if fin else 0):
                conn.ack_due = True                 # all old: our ACK was lost
                return
            payload = payload[behind:]
        elif behind:
            self.stats["tcp_out_of_order"] += 1     # a gap before it: dropped
            conn.ack_due = True
            return
        taken = min(len(payload), conn.window)
        if taken:
            if conn.closing:
                self.stats["data_after_close"] += taken  # acknowledged, not served
            else:
                conn.recv += payload[:taken]
            conn.rcv_nxt = _seq(conn.rcv_nxt + taken)
        conn.ack_due = True
        if taken < len(payload):
            self.stats["tcp_beyond_window"] += 1
        elif fin:
            conn.rcv_nxt = _seq(conn.rcv_nxt + 1)
            conn.fin_received = True

    def _after_event(self, conn: _Connection, now: float) -> None:
        """Serve requests, close what is finished, rearm the timer."""
        if self._connections.get((conn.addr, conn.port)) is not conn:
            return                                  # removed meanwhile
        if conn.established:
            self._serve(conn)
        if self._connections.get((conn.addr, conn.port)) is not conn:
            return
        if conn.fin_received and conn.fin_acked():
            # Both FINs acknowledged but the guest's: ACK it from the control queue
            # (no TIME-WAIT: a retransmitted FIN then gets an RST, as with dumbo).
            if conn.ack_due:
                self._queue_control(conn.mac, conn.addr, conn.port, conn.snd_nxt,
                                    conn.rcv_nxt, ACK)
            self.stats["connections_closed"] += 1
            self._remove(conn)
            return
        self._rearm(conn, now)

    def _serve(self, conn: _Connection) -> None:
        """Hand the received bytes to the handler while no response is outstanding."""
        while not conn.closing and not conn.send and conn.recv:
            window_was_closed = conn.window == 0
            try:
                reply = self.handler(bytes(conn.recv))
                if reply is None:
                    consumed, response, close = 0, b"", False
                else:
                    consumed = max(0, min(int(reply.consumed), len(conn.recv)))
                    response, close = bytes(reply.response), bool(reply.close)
            except Exception:  # noqa: BLE001 - a handler bug resets one connection
                self.stats["handler_errors"] += 1
                self._abort(conn)
                return
            if reply is None:
                if len(conn.recv) >= MAX_REQUEST_BYTES:
                    self.stats["requests_too_large"] += 1
                    self._abort(conn)
                return
            self.stats["requests"] += 1
            del conn.recv[:consumed]
            conn.send += response
            conn.closing = close
            if window_was_closed:
                conn.ack_due = True                 # tell the guest it may send again
            if not consumed:
                break
        if conn.fin_received and not conn.send and not conn.closing:
            conn.closing = True                     # the guest is done: so are we

    # -- timers --------------------------------------------------------------------

    def _rearm(self, conn: _Connection, now: float) -> None:
        """The retransmission timer runs while something we sent is unacknowledged,
        or while response bytes wait for a window the guest keeps closed (then it
        sends zero-window probes, RFC 9293 3.8.6.1)."""
        in_flight = conn.snd_una != conn.snd_max
        window_wait = conn.established and not in_flight and \
            (conn.snd_nxt - conn.send_base) % SEQ_MOD < len(conn.send) and \
            conn.sendable()[1] == 0
        if in_flight or window_wait:
            if conn.rto_at is None:
                conn.rto_at = now + conn.rto
        else:
            conn.rto_at, conn.rto, conn.retries = None, RTO_INITIAL, 0

    def _expire(self, conn: _Connection, now: float) -> None:
        if now >= conn.last_heard + IDLE_TIMEOUT:
            self.stats["connections_timed_out"] += 1
            self._abort(conn)
            return
        if conn.rto_at is None or now < conn.rto_at:
            return
        conn.retries += 1
        limit = MAX_RETRANSMITS if conn.established else MAX_SYNACK_RETRANSMITS
        if conn.retries > limit:
            self.stats["connections_timed_out"] += 1
            self._abort(conn)
            return
        conn.rto = min(conn.rto * 2, RTO_MAX)
        conn.rto_at = now + conn.rto
        if not conn.established:
            conn.synack_due = True
            conn.snd_nxt = conn.iss
        elif conn.snd_una != conn.snd_max:
            self.stats["retransmits"] += 1
            conn.snd_nxt = conn.snd_una             # go back N
        else:
            self.stats["window_probes"] += 1
            conn.probe_due = True

    # -- connection ends -------------------------------------------------------------

    def _remove(self, conn: _Connection) -> None:
        self._connections.pop((conn.addr, conn.port), None)

    def _abort(self, conn: _Connection) -> None:
        """Reset a connection (RFC 9293 3.10.7.4's "send a reset") and forget it."""
        self.stats["connections_reset"] += 1
        if conn.established:
            # The guest's next expected byte, as far as we know: an RST must
            # carry exactly that to be believed (RFC 5961 3.2).
            self._queue_control(conn.mac, conn.addr, conn.port, conn.snd_una, 0, RST)
        else:
            self._queue_control(conn.mac, conn.addr, conn.port, 0, conn.rcv_nxt, RST | ACK)
        self._remove(conn)

    def _reset_unknown(self, mac: bytes, src: bytes, port: int, seq: int, ack: int,
                       flags: int, length: int, local_port: int = MMDS_PORT) -> None:
        """The RST for a segment no connection takes (3.10.7.1, CLOSED)."""
        if flags & RST:
            return                                  # never answer an RST
        if flags & ACK:
            self._queue_control(mac, src, port, ack, 0, RST, local_port)
        else:
            length += (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self._queue_control(mac, src, port, 0, _seq(seq + length), RST | ACK, local_port)

    def _queue_control(self, mac: bytes, addr: bytes, port: int, seq: int, ack: int,
                       flags: int, local_port: int = MMDS_PORT) -> None:
        if len(self._control) >= MAX_PENDING_RESETS:
            self.stats["control_dropped"] += 1      # the guest's timers cope
            return
        self._control.append(_Control(mac, addr, port, seq, ack, flags, local_port))

    # -- frames out ------------------------------------------------------------------

    def _next_frame(self) -> bytes | None:
        if self._arp:
            return self._arp_reply(*self._arp.popleft())
        if self._control:
            c = self._control.popleft()
            self.stats["rst_sent" if c.flags & RST else "acks_sent"] += 1
            return self._tcp_frame(c.mac, c.addr, c.port, c.seq, c.ack, c.flags, 0,
                                   local_port=c.local_port)
        for key, conn in list(self._connections.items()):
            frame = self._connection_frame(conn)
            if frame is not None:
                self._connections.move_to_end(key)  # round robin
                self._rearm(conn, self.clock())
                return frame
        return None

    def _connection_frame(self, conn: _Connection) -> bytes | None:
        window = conn.window
        if conn.synack_due:
            conn.synack_due = False
            conn.snd_nxt = _seq(conn.iss + 1)
            conn.snd_max = conn.snd_nxt
            mss = min(MAX_REQUEST_BYTES, MSS_MAX)
            return self._tcp_frame(conn.mac, conn.addr, conn.port, conn.iss, conn.rcv_nxt,
                                   SYN | ACK, window, options=struct.pack("!BBH", OPT_MSS, 4,
                                                                          mss))
        if not conn.established:
            return None
        if conn.probe_due:
            # Linux's tcp_xmit_probe_skb: an old sequence number, which the guest
            # answers with an ACK carrying its window.
            conn.probe_due = False
            return self._tcp_frame(conn.mac, conn.addr, conn.port, _seq(conn.snd_una - 1),
                                   conn.rcv_nxt, ACK, window)
        offset, count = conn.sendable()
        if count:
            payload = bytes(conn.send[offset:offset + count])
            last = offset + count == len(conn.send)
            flags = ACK | (PSH if last else 0) | (FIN if last and conn.closing else 0)
            seq = conn.snd_nxt
            self._advance(conn, count + (1 if flags & FIN else 0))
            return self._tcp_frame(conn.mac, conn.addr, conn.port, seq, conn.rcv_nxt, flags,
                                   window, payload)
        if conn.fin_due():
            seq = conn.snd_nxt
            self._advance(conn, 1)
            return self._tcp_frame(conn.mac, conn.addr, conn.port, seq, conn.rcv_nxt,
                                   FIN | ACK, window)
        if conn.ack_due:
            conn.ack_due = False
            return self._tcp_frame(conn.mac, conn.addr, conn.port, conn.snd_nxt, conn.rcv_nxt,
                                   ACK, window)
        return None

    def _advance(self, conn: _Connection, count: int) -> None:
        conn.ack_due = False                        # the segment carries our ACK
        conn.snd_nxt = _seq(conn.snd_nxt + count)
        if _after(conn.snd_nxt, conn.snd_max):
            conn.snd_max = conn.snd_nxt

    def _tcp_frame(self, mac: bytes, addr: bytes, port: int, seq: int, ack: int, flags: int,
                   window: int, payload: bytes = b"", options: bytes = b"",
                   local_port: int = MMDS_PORT) -> bytes:
        """Ethernet + IPv4 + TCP with both checksums complete."""
        header_len = TCP_MIN_HEADER + len(options)
        tcp = bytearray(TCP_HEADER.pack(local_port, port, seq, ack, header_len // 4 << 4,
                                        flags, window, 0, 0) + options + payload)
        pseudo = self.address + addr + struct.pack("!BBH", 0, PROTOCOL_TCP, len(tcp))
        tcp[16:18] = _checksum(pseudo + tcp).to_bytes(2, "big")
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        ip = bytearray(IPV4_HEADER.pack(0x45, 0, IPV4_MIN_HEADER + len(tcp), self._ip_id,
                                        IPV4_FLAG_DF, IPV4_TTL, PROTOCOL_TCP, 0,
                                        self.address, addr))
        ip[10:12] = _checksum(bytes(ip)).to_bytes(2, "big")
        return ETH_HEADER.pack(mac, self.mac, ETHERTYPE_IPV4) + ip + tcp


__all__ = ["IDLE_TIMEOUT", "MAX_CONNECTIONS", "MAX_PENDING_ARP", "MAX_PENDING_RESETS",
           "MAX_REQUEST_BYTES", "MMDS_MAC", "MMDS_PORT", "MSS_MAX", "MmdsStack", "Reply"]

"""The host side of virtio-vsock: Firecracker's Unix-socket muxer (its
docs/vsock.md, src/vmm/src/devices/virtio/vsock/unix/muxer.rs and csm/).

Guest AF_VSOCK stream connections become host AF_UNIX stream connections:

- host-initiated: a host program connects to `uds_path` and writes
  `CONNECT <port>\\n`; the muxer sends the guest a REQUEST to that port; when
  the guest answers RESPONSE it writes `OK <local port>\\n` to the host
  program, and the socket then carries the stream both ways.  RST, or no
  answer within CONN_REQUEST_TIMEOUT: the host socket is closed;
- guest-initiated to host port P: the muxer connects to `<uds_path>_<P>`;
  nobody listening there: RST to the guest.  Nothing else on the host is
  reachable: P is a number, the path is ours.

Each connection is a small state machine (Connection) with vsock's credit
flow control (virtio 1.2, 5.10.6.3): we advertise CONN_TX_BUF_SIZE of buffer
for guest data the host socket cannot take yet; a guest that sends beyond
that credit is reset.  Host data goes straight from the socket into the
guest's RX buffers (readv into views of guest RAM), never beyond the credit
the guest gave us.

Everything here runs on the I/O thread under the vsock device's serving
lock.  The muxer has its own epoll set (Firecracker's nested epoll): the
listening socket, each connection's socket, a timerfd for the timeouts and
an eventfd to wake itself; the I/O thread watches the one epoll fd.

Budgets (what a guest or a host program can make the VMM hold):
- at most MAX_CONNECTIONS connections, host sockets still sending their
  CONNECT line included; beyond that, new host sockets are accepted and
  closed and guest REQUESTs get an RST;
- per connection, at most CONN_TX_BUF_SIZE bytes buffered for the host;
- at most MUXER_RXQ_SIZE RSTs for packets that belong to no connection wait
  for an RX buffer; more are dropped (the guest's timers handle it);
- a CONNECT line is at most CONNECT_LINE_MAX bytes and must arrive within
  CONNECT_LINE_TIMEOUT.
"""
from __future__ import annotations

import collections
import ctypes
import errno
import heapq
import os
import select
import socket
import stat
import struct
import time
from typing import TYPE_CHECKING, NamedTuple

from pyvmm.errors import PyvmmError

if TYPE_CHECKING:
    from pyvmm.devices.virtio.chain import Reader, Writer

KiB = 1024
U32 = 0xFFFF_FFFF

# -- the wire format (virtio 1.2, 5.10.6; include/uapi/linux/virtio_vsock.h) ---------------

HOST_CID = 2                              # VMADDR_CID_HOST
TYPE_STREAM = 1                           # VIRTIO_VSOCK_TYPE_STREAM (5.10.6.1)
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN = 1, 2, 3, 4
OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 5, 6, 7
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2        # VIRTIO_VSOCK_SHUTDOWN_F_* (5.10.6.6)
# struct virtio_vsock_hdr: le64 src_cid, dst_cid; le32 src_port, dst_port, len;
# le16 type, op; le32 flags, buf_alloc, fwd_cnt.
HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size                 # 44

# -- Firecracker's limits (vsock/mod.rs, csm/mod.rs, unix/mod.rs) ---------------------------

MAX_PKT_BUF_SIZE = 64 * KiB               # mod.rs: a packet's data, at most
CONN_TX_BUF_SIZE = 64 * KiB               # csm/mod.rs: guest data buffered per connection
CONN_CREDIT_UPDATE_THRESHOLD = 4 * KiB    # csm/mod.rs: tell the guest when it sees less free
CONN_REQUEST_TIMEOUT = 2.0                # csm/mod.rs CONN_REQUEST_TIMEOUT_MS, in seconds
CONN_SHUTDOWN_TIMEOUT = 2.0               # csm/mod.rs CONN_SHUTDOWN_TIMEOUT_MS, in seconds
MAX_CONNECTIONS = 1023                    # unix/mod.rs
MUXER_RXQ_SIZE = 256                      # unix/mod.rs: RSTs waiting for an RX buffer
CONNECT_LINE_MAX = 32                     # muxer.rs read_local_stream_port's buffer
# Local ports for host-initiated connections, handed out round robin (muxer.rs).
LOCAL_PORT_FIRST, LOCAL_PORT_END = 1 << 30, 1 << 31
# Ours: Firecracker reads the CONNECT line blocking; we wait this long for it.
CONNECT_LINE_TIMEOUT = 2.0
EVENTS_PER_SLICE = 64                     # epoll events handled per call
ACCEPTS_PER_EVENT = 16                    # host connections accepted per listener event
LISTEN_BACKLOG = 128
UNIX_PATH_MAX = 107                       # sun_path is 108 bytes, NUL included

# Connection states (csm/mod.rs ConnState; PeerClosed is ESTABLISHED with the
# guest's shutdown flags set).
LOCAL_INIT, PEER_INIT, ESTABLISHED, LOCAL_CLOSED, KILLED = range(5)
# What a connection owes the guest (csm/mod.rs PendingRx), as bits.
P_REQUEST, P_RESPONSE, P_RST, P_RW, P_CREDIT_UPDATE, P_SHUTDOWN = 1, 2, 4, 8, 16, 32

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLLHUP_OR_ERR = select.EPOLLHUP | select.EPOLLERR
SEND_FLAGS = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT


class VsockError(PyvmmError):
    """The vsock device's Unix socket cannot be set up."""


class PacketHeader(NamedTuple):
    """struct virtio_vsock_hdr (5.10.6), in its field order."""
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    length: int
    socket_type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int


def parse_connect_line(line: bytes) -> int | None:
    """The port of a host program's `CONNECT <port>\\n` (case-insensitive, as
    Firecracker's parser; words after the port are ignored), or None."""
    try:
        words = line.decode("ascii").split()
    except UnicodeDecodeError:
        return None
    if len(words) < 2 or words[0].lower() != "connect" or not words[1].isdigit():
        return None
    port = int(words[1])
    return port if port <= U32 else None


def listen_at(path: str) -> socket.socket:
    """A non-blocking listening Unix socket at path.  A socket file already there is
    a stale one and is removed (as Firecracker does); anything else is refused."""
    if not path or len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise VsockError(f"vsock uds_path {path!r} must be 1 to {UNIX_PATH_MAX} bytes long "
                         "(a Unix socket path limit)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise VsockError(f"vsock uds_path {path}: the directory {directory} does not exist")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise VsockError(f"vsock uds_path {path} exists and is not a socket: remove it or "
                             "choose another path")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK |
                         socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise VsockError(f"cannot listen on vsock uds_path {path}: {exc.strerror}") from None
    return sock


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Timer:
    """A timerfd on CLOCK_MONOTONIC (time.monotonic()'s clock), readable at a deadline.
    Python 3.11 has no os.timerfd_create, hence libc through ctypes."""
    CLOCK_MONOTONIC = 1
    TFD_NONBLOCK, TFD_CLOEXEC, TFD_TIMER_ABSTIME = os.O_NONBLOCK, os.O_CLOEXEC, 1
    _libc = ctypes.CDLL(None, use_errno=True)

    def __init__(self) -> None:
        self.fd = self._libc.timerfd_create(self.CLOCK_MONOTONIC,
                                            self.TFD_NONBLOCK | self.TFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self.armed_at: float | None = None

    def arm(self, deadline: float | None) -> None:
        """Fire at `deadline` (time.monotonic()), or never (None)."""
        if deadline == self.armed_at:
            return
        spec = _Itimerspec()
        if deadline is not None:
            # An absolute time of 0 disarms a timerfd: a deadline already past fires now.
            seconds = max(deadline, 1e-6)
            spec.it_value.tv_sec = int(seconds)
            spec.it_value.tv_nsec = int((seconds - int(seconds)) * 1e9)
        if self._libc.timerfd_settime(self.fd, self.TFD_TIMER_ABSTIME, ctypes.byref(spec),
                                      None) < 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        self.armed_at = deadline

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        self.armed_at = None

    def close(self) -> None:
        os.close(self.fd)


class HostStream:
    """An accepted host socket whose `CONNECT <port>` line has not all arrived."""
    __slots__ = ("sock", "fd", "line", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.fd = sock, sock.fileno()
        self.line = b""
        self.deadline = deadline


class Connection:
    """One vsock stream: a host socket and what we and the guest know of each
    other's buffers (csm/connection.rs's VsockConnection, our code).

    Counters are le32 and wrap (5.10.6.3): fwd_cnt counts guest bytes written to
    the host socket, rx_cnt host bytes sent to the guest; the guest's buf_alloc
    and fwd_cnt arrive on every packet it sends."""

    __slots__ = ("sock", "fd", "state", "local_port", "peer_port", "tx_buf", "fwd_cnt",
                 "peer_buf_alloc", "peer_fwd_cnt", "rx_cnt", "last_fwd_cnt_to_peer",
                 "pending", "expiry", "queued_expiry", "peer_recv_off", "peer_send_off",
                 "host_eof", "host_write_shut", "shutdown_flags", "registered", "events",
                 "local_init", "hup")

    def __init__(self, sock: socket.socket, local_port: int, peer_port: int, *,
                 local_init: bool, peer_buf_alloc: int = 0, peer_fwd_cnt: int = 0) -> None:
        self.sock, self.fd = sock, sock.fileno()
        self.local_init = local_init
        self.state = LOCAL_INIT if local_init else PEER_INIT
        self.pending = P_REQUEST if local_init else P_RESPONSE
        self.local_port, self.peer_port = local_port, peer_port
        self.tx_buf = bytearray()         # guest data the host socket has not taken yet
        self.fwd_cnt = self.rx_cnt = self.last_fwd_cnt_to_peer = 0
        self.peer_buf_alloc, self.peer_fwd_cnt = peer_buf_alloc, peer_fwd_cnt
        self.expiry: float | None = None          # when to reset it (a timeout), if set
        self.queued_expiry: float | None = None   # the expiry last put on the muxer's heap
        self.peer_recv_off = self.peer_send_off = False   # the guest's SHUTDOWN flags
        self.host_eof = False             # the host shut its sending side down
        self.hup = False                  # epoll reported a hang-up or an error
        self.host_write_shut = False      # we shut the host socket's sending side down
        self.shutdown_flags = 0           # the SHUTDOWN we owe the guest (P_SHUTDOWN)
        self.registered = False           # in the muxer's epoll set
        self.events = 0                   # with these events

    # -- credit (5.10.6.3) ----------------------------------------------------------

    def peer_credit(self) -> int:
        """Bytes the guest can take now.  A guest whose fwd_cnt runs ahead of what we
        sent it (a lie) gets nothing until it tells the truth."""
        in_flight = (self.rx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def peer_needs_credit_update(self) -> bool:
        """We forwarded enough since we last told the guest that it may think our
        buffer is (nearly) full (csm/connection.rs peer_needs_credit_update)."""
        unreported = (self.fwd_cnt - self.last_fwd_cnt_to_peer) & U32
        return CONN_TX_BUF_SIZE - unreported < CONN_CREDIT_UPDATE_THRESHOLD

    # -- what the muxer asks -------------------------------------------------------------

    def wanted_events(self) -> int:
        """The epoll events we wait for: OUT while guest data waits for the host
        socket; IN while host data may go to the guest (and none is already owed
        to it: that waits for an RX buffer, not for the socket)."""
        events = EPOLLOUT if self.tx_buf else 0
        if (self.state == ESTABLISHED and not self.peer_recv_off and not self.host_eof
                and not self.pending & P_RW and self.peer_credit() > 0):
            events |= EPOLLIN
        return events

    def watched(self) -> bool:
        """In the epoll set at all: for its events, or for a hang-up (epoll reports
        HUP and ERR unasked, level-triggered: once seen, the socket leaves the set,
        or it would wake the I/O thread until the guest reads the rest)."""
        return self.state in (LOCAL_INIT, PEER_INIT, ESTABLISHED) and not self.hup

    def kill(self) -> None:
        """Reset it: the host program sees its socket end now, the guest gets an RST
        as soon as it has an RX buffer for it."""
        self.state = KILLED
        self.pending = P_RST
        self.tx_buf = bytearray()         # forfeit: the guest is told the stream is gone
        self.expiry = None
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- guest -> host ------------------------------------------------------------------

    def from_guest(self, header: PacketHeader, payload: "Reader", now: float) -> None:
        """A guest packet for this connection (not an RST: the muxer handles those)."""
        self.peer_buf_alloc, self.peer_fwd_cnt = header.buf_alloc, header.fwd_cnt
        op = header.op
        if op == OP_RW and self.state == ESTABLISHED and not self.peer_send_off:
            if header.length:
                self._send_to_host(payload.views(header.length))
                if self.state != KILLED and self.peer_needs_credit_update():
                    self.pending |= P_CREDIT_UPDATE
        elif op == OP_RESPONSE and self.state == LOCAL_INIT:
            self.expiry = None
            self.state = ESTABLISHED
            self._acknowledge_host()
        elif op == OP_SHUTDOWN and self.state == ESTABLISHED:
            self.peer_recv_off |= bool(header.flags & SHUTDOWN_RCV)
            self.peer_send_off |= bool(header.flags & SHUTDOWN_SEND)
            self._after_peer_shutdown(now)
        elif op == OP_CREDIT_REQUEST and self.state in (PEER_INIT, ESTABLISHED) and \
                not self.peer_send_off:
            self.pending |= P_CREDIT_UPDATE
        # A CREDIT_UPDATE needs nothing beyond the credit taken above; anything else in
        # this state is dropped, as csm/connection.rs does.

    def _acknowledge_host(self) -> None:
        """Tell the host program its connection is up: `OK <local port>\\n`."""
        message = f"OK {self.local_port}\n".encode()
        try:
            sent = self.sock.send(message, SEND_FLAGS)
        except OSError:
            sent = -1
        if sent != len(message):
            self.kill()         # a dozen bytes do not fit a fresh socket: it is broken

    def _after_peer_shutdown(self, now: float) -> None:
        """The guest will send (or receive) no more: pass the end of its stream on to
        the host program once its data is out; both directions shut: reset once the
        buffer is drained, or after CONN_SHUTDOWN_TIMEOUT (csm/connection.rs)."""
        if self.peer_send_off and not self.tx_buf:
            self._shut_host_writing()
        if self.peer_recv_off and self.peer_send_off:
            if self.tx_buf:
                # Armed once: repeated SHUTDOWNs must not push the reset back (or
                # grow the muxer's deadline heap).
                if self.expiry is None:
                    self.expiry = now + CONN_SHUTDOWN_TIMEOUT
            else:
                self.pending |= P_RST

    def _shut_host_writing(self) -> None:
        if not self.host_write_shut:
            self.host_write_shut = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass                    # the host end is gone: its reads end anyway

    def _send_to_host(self, views: list[memoryview]) -> None:
        """Guest data to the host socket; what it cannot take now waits in tx_buf,
        which the credit we gave keeps under CONN_TX_BUF_SIZE: more is a guest that
        ignored it, and its connection is reset."""
        length = sum(map(len, views))
        written = 0
        if not self.tx_buf:
            try:
                written = self.sock.sendmsg(views, (), SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.kill()
                return
            self.fwd_cnt = (self.fwd_cnt + written) & U32
        if written == length:
            return
        if len(self.tx_buf) + length - written > CONN_TX_BUF_SIZE:
            self.kill()
            return
        skip = written
        for view in views:
            if skip >= len(view):
                skip -= len(view)
                continue
            self.tx_buf += view[skip:]
            skip = 0

    def host_writable(self, now: float) -> None:
        """EPOLLOUT: flush what waits for the host socket."""
        if not self.tx_buf:
            return
        try:
            written = self.sock.send(self.tx_buf, SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.kill()
            return
        del self.tx_buf[:written]
        self.fwd_cnt = (self.fwd_cnt + written) & U32
        if not self.tx_buf and self.state == ESTABLISHED and (self.peer_send_off or
                                                            self.peer_recv_off):
            self._after_peer_shutdown(now)
        if self.state == ESTABLISHED and self.peer_needs_credit_update():
            self.pending |= P_CREDIT_UPDATE

    # -- host -> guest ------------------------------------------------------------------

    def host_readable(self, events: int, now: float) -> None:
        """EPOLLIN, or a hang-up: data to read (later, into an RX buffer), or the
        host program is gone."""
        if events & EPOLLHUP_OR_ERR:
            self.hup = True
        if self.state == ESTABLISHED and not self.peer_recv_off and not self.host_eof:
            self.pending |= P_RW          # the read finds the data, the end, or the error
        elif events & EPOLLHUP_OR_ERR:
            self._host_gone(now)

    def _host_gone(self, now: float) -> None:
        """The host socket hung up while we were not reading it."""
        if self.state == ESTABLISHED:
            self._local_closed(SHUTDOWN_RCV | SHUTDOWN_SEND, now)
        elif self.state in (LOCAL_INIT, PEER_INIT):
            self.kill()

    def _local_closed(self, flags: int, now: float) -> None:
        """The host program closed: tell the guest; it has CONN_SHUTDOWN_TIMEOUT
        to reset the connection before we do (csm/connection.rs LocalClosed)."""
        self.state = LOCAL_CLOSED
        self.expiry = now + CONN_SHUTDOWN_TIMEOUT
        self.shutdown_flags = flags
        self.pending = (self.pending & ~P_RW) | P_SHUTDOWN
        self.tx_buf = bytearray()

    def to_guest(self, data: "Writer", now: float) -> tuple[int, int, int] | None:
        """The next packet this connection owes the guest, as (op, flags, data length),
        its data read into `data`; None if it has nothing to say after all."""
        pending = self.pending
        if pending & P_RST:
            self.pending = 0
            return OP_RST, 0, 0
        if pending & P_RESPONSE:
            self.pending &= ~P_RESPONSE
            self.state = ESTABLISHED
            return OP_RESPONSE, 0, 0
        if pending & P_REQUEST:
            self.pending &= ~P_REQUEST
            self.expiry = now + CONN_REQUEST_TIMEOUT
            return OP_REQUEST, 0, 0
        if pending & P_SHUTDOWN:
            self.pending &= ~P_SHUTDOWN
            return OP_SHUTDOWN, self.shutdown_flags, 0
        if pending & P_RW:
            packet = self._read_host(data, now)
            if packet is not None:
                return packet
        if self.pending & P_CREDIT_UPDATE:
            self.pending &= ~P_CREDIT_UPDATE
            return OP_CREDIT_UPDATE, 0, 0
        return None

    def _read_host(self, data: "Writer", now: float) -> tuple[int, int, int] | None:
        if self.state != ESTABLISHED or self.peer_recv_off or self.host_eof:
            self.pending &= ~P_RW
            return None
        credit = self.peer_credit()
        if credit == 0:
            # Our credit is spent: ask the guest (IN waits for its update).
            self.pending &= ~P_RW
            return OP_CREDIT_REQUEST, 0, 0
        room = min(data.available_bytes(), MAX_PKT_BUF_SIZE, credit)
        if room == 0:
            return OP_CREDIT_UPDATE, 0, 0      # a header-only RX buffer: say something useful
        try:
            count = os.readv(self.fd, data.views(room))
        except (BlockingIOError, InterruptedError):
            self.pending &= ~P_RW            # drained: IN tells us when there is more
            return None
        except OSError:
            self.kill()
            self.pending = 0
            return OP_RST, 0, 0
        if count:
            self.rx_cnt = (self.rx_cnt + count) & U32
            return OP_RW, 0, count           # P_RW stays: there may be more
        self.pending &= ~P_RW
        if self._hung_up():
            self._local_closed(SHUTDOWN_RCV | SHUTDOWN_SEND, now)
            self.pending &= ~P_SHUTDOWN
            return OP_SHUTDOWN, self.shutdown_flags, 0
        # The host shut down only its sending side (a half-close): it still reads.
        self.host_eof = True
        return OP_SHUTDOWN, SHUTDOWN_SEND, 0

    def _hung_up(self) -> bool:
        """Whether the host socket is closed both ways (POLLHUP), not just half-closed."""
        poller = select.poll()
        poller.register(self.fd, 0)
        return any(events & select.POLLHUP for _, events in poller.poll(0))


class VsockMuxer:
    """Connections between the guest (CID guest_cid) and host programs at uds_path
    (the module docstring).  The vsock device calls send_packet() for each guest
    packet, recv_packet() for each RX buffer while has_pending_rx(), and
    handle_events() when `fd` is readable; all under its serving lock."""

    def __init__(self, guest_cid: int, uds_path: str) -> None:
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.stats = {"connections_added": 0, "connections_removed": 0, "connections_killed": 0,
                      "host_refused": 0, "bad_connect_lines": 0, "rst_dropped": 0,
                      "foreign_cid_dropped": 0}
        self.listener = listen_at(uds_path)
        self._socket_inode = os.lstat(uds_path).st_ino
        self._epoll = select.epoll()
        self._timer = Timer()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        for fd in (self.listener.fileno(), self._timer.fd, self._wake_fd):
            self._epoll.register(fd, EPOLLIN)
        self.fd = self._epoll.fileno()
        self.connections: dict[tuple[int, int], Connection] = {}    # (local, peer port)
        self._by_fd: dict[int, Connection | HostStream] = {}
        self._host_streams: dict[int, HostStream] = {}
        self._rx_ready: dict[tuple[int, int], None] = {}    # connections owing packets, in order
        self._rsts: collections.deque[tuple[int, int]] = collections.deque()
        self._deadlines: list[tuple[float, int, int, int]] = []    # (when, kind, a, b)
        self._local_ports: set[int] = set()
        self._last_local_port = LOCAL_PORT_FIRST - 1

    # -- the device's side ------------------------------------------------------------

    def has_pending_rx(self) -> bool:
        return bool(self._rsts or self._rx_ready)

    def send_packet(self, header: PacketHeader, payload: "Reader") -> None:
        """A packet from the guest; payload holds at least header.length bytes."""
        now = time.monotonic()
        if header.src_cid != self.guest_cid or header.dst_cid != HOST_CID:
            # Only the host is reachable, and only as the guest itself (vhost-vsock
            # drops these too; Firecracker drops packets for other CIDs).
            self.stats["foreign_cid_dropped"] += 1
            return
        if header.socket_type != TYPE_STREAM:
            self._queue_rst(header.dst_port, header.src_port, header.op)
            return
        key = (header.dst_port, header.src_port)
        conn = self.connections.get(key)
        if conn is None:
            if header.op == OP_REQUEST:
                self._guest_connect(header)
            else:
                self._queue_rst(header.dst_port, header.src_port, header.op)
            return
        if header.op == OP_RST:
            self._remove(conn)
            return
        conn.from_guest(header, payload, now)
        self._update(conn)

    def recv_packet(self, data: "Writer") -> PacketHeader | None:
        """The next packet for the guest, its data read into `data` (the RX buffer
        after the header); None if nothing is owed after all."""
        now = time.monotonic()
        while self._rsts or self._rx_ready:
            if self._rsts:
                local_port, peer_port = self._rsts.popleft()
                return self._header(local_port, peer_port, OP_RST, 0, 0, 0)
            key = next(iter(self._rx_ready))
            del self._rx_ready[key]
            conn = self.connections.get(key)
            if conn is None:
                continue
            packet = conn.to_guest(data, now)
            if packet is None:
                self._update(conn)
                continue
            op, flags, length = packet
            conn.last_fwd_cnt_to_peer = conn.fwd_cnt
            header = self._header(conn.local_port, conn.peer_port, op, flags, length,
                                  conn.fwd_cnt)
            if op == OP_RST:
                self._remove(conn)
            else:
                self._update(conn)      # owing more: back in line, behind the others
            return header
        return None

    def handle_events(self) -> None:
        """Serve what the epoll set reports (at most EVENTS_PER_SLICE events; the
        epoll fd stays readable while more are ready), then the timeouts."""
        now = time.monotonic()
        for fd, events in self._epoll.poll(0, EVENTS_PER_SLICE):
            if fd == self.listener.fileno():
                self._accept(now)
            elif fd == self._timer.fd:
                self._timer.clear()
            elif fd == self._wake_fd:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
            else:
                target = self._by_fd.get(fd)
                if isinstance(target, HostStream):
                    self._read_connect_line(target, now)
                elif target is not None:
                    if events & EPOLLOUT:
                        target.host_writable(now)
                    if events & (EPOLLIN | EPOLLHUP_OR_ERR):
                        target.host_readable(events, now)
                    self._update(target)
        self._expire(now)

    def wake(self) -> None:
        """Make `fd` readable: the device has more to do after the other fds."""
        os.eventfd_write(self._wake_fd, 1)

    def reset(self) -> None:
        """Drop every connection (a device reset, a restored snapshot): the host
        sockets are closed; the listening socket stays."""
        for conn in list(self.connections.values()):
            self._remove(conn)
        for stream in list(self._host_streams.values()):
            self._close_host_stream(stream)
        self._rx_ready.clear()
        self._rsts.clear()
        self._deadlines.clear()
        self._timer.arm(None)

    def close(self) -> None:
        if self.listener.fileno() < 0:
            return
        self.reset()
        self.listener.close()
        self._epoll.close()
        self._timer.close()
        os.close(self._wake_fd)
        try:
            if os.lstat(self.uds_path).st_ino == self._socket_inode:
                os.unlink(self.uds_path)        # ours still: no stale socket left behind
        except OSError:
            pass

    # -- host-initiated connections ----------------------------------------------------

    def _accept(self, now: float) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return                  # ECONNABORTED, EMFILE: the next event retries
            if self._connection_count() >= MAX_CONNECTIONS:
                sock.close()            # full: refused, as Firecracker does
                self.stats["host_refused"] += 1
                continue
            sock.setblocking(False)
            stream = HostStream(sock, now + CONNECT_LINE_TIMEOUT)
            self._host_streams[stream.fd] = stream
            self._by_fd[stream.fd] = stream
            self._epoll.register(stream.fd, EPOLLIN)
            heapq.heappush(self._deadlines, (stream.deadline, 0, stream.fd, 0))

    def _read_connect_line(self, stream: HostStream, now: float) -> None:
        """Take the CONNECT line, never a byte past its newline (the stream's data
        follows it).  A partial line is consumed so that a slow writer does not
        keep the socket readable for nothing."""
        try:
            peeked = stream.sock.recv(CONNECT_LINE_MAX - len(stream.line), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            peeked = b""
        if not peeked:
            self._close_host_stream(stream)          # gone before saying where to
            return
        newline = peeked.find(b"\n")
        stream.line += stream.sock.recv(len(peeked) if newline < 0 else newline + 1)
        if newline < 0:
            if len(stream.line) >= CONNECT_LINE_MAX:
                self.stats["bad_connect_lines"] += 1
                self._close_host_stream(stream)
            return
        port = parse_connect_line(stream.line)
        if port is None:
            self.stats["bad_connect_lines"] += 1
            self._close_host_stream(stream)
            return
        self._forget_host_stream(stream)
        local_port = self._allocate_local_port()
        conn = Connection(stream.sock, local_port, port, local_init=True)
        self._add(conn)

    def _close_host_stream(self, stream: HostStream) -> None:
        self._forget_host_stream(stream)
        stream.sock.close()

    def _forget_host_stream(self, stream: HostStream) -> None:
        self._host_streams.pop(stream.fd, None)
        self._by_fd.pop(stream.fd, None)
        try:
            self._epoll.unregister(stream.fd)
        except (OSError, ValueError):
            pass

    def _allocate_local_port(self) -> int:
        """The next free port in [LOCAL_PORT_FIRST, LOCAL_PORT_END), round robin:
        at most MAX_CONNECTIONS are taken, so the loop is short."""
        port = self._last_local_port
        while True:
            port += 1
            if port >= LOCAL_PORT_END:
                port = LOCAL_PORT_FIRST
            if port not in self._local_ports:
                break
        self._last_local_port = port
        self._local_ports.add(port)
        return port

    # -- guest-initiated connections ---------------------------------------------------

    def _guest_connect(self, header: PacketHeader) -> None:
        """A REQUEST to host port P: connect to `<uds_path>_<P>`, or RST."""
        self._expire(time.monotonic())
        if self._connection_count() >= MAX_CONNECTIONS:
            self._queue_rst(header.dst_port, header.src_port, OP_REQUEST)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK |
                             socket.SOCK_CLOEXEC)
        try:
            # Non-blocking: a listener with a full backlog refuses (EAGAIN) instead
            # of stalling the I/O thread.
            sock.connect(f"{self.uds_path}_{header.dst_port}")
        except OSError:
            sock.close()
            self.stats["host_refused"] += 1
            self._queue_rst(header.dst_port, header.src_port, OP_REQUEST)
            return
        conn = Connection(sock, header.dst_port, header.src_port, local_init=False,
                          peer_buf_alloc=header.buf_alloc, peer_fwd_cnt=header.fwd_cnt)
        self._add(conn)

    # -- bookkeeping --------------------------------------------------------------------

    def _connection_count(self) -> int:
        return len(self.connections) + len(self._host_streams)

    def _add(self, conn: Connection) -> None:
        self.connections[(conn.local_port, conn.peer_port)] = conn
        self._by_fd[conn.fd] = conn
        self.stats["connections_added"] += 1
        self._update(conn)

    def _remove(self, conn: Connection) -> None:
        key = (conn.local_port, conn.peer_port)
        if self.connections.pop(key, None) is None:
            return
        self._by_fd.pop(conn.fd, None)
        self._rx_ready.pop(key, None)
        if conn.registered:
            self._epoll.unregister(conn.fd)
        if conn.local_init:
            self._local_ports.discard(conn.local_port)
        conn.sock.close()
        self.stats["connections_removed"] += 1

    def _update(self, conn: Connection) -> None:
        """After anything that may have changed a connection (Firecracker's
        apply_conn_mutation): its place in line for RX buffers, its epoll events,
        its timeout."""
        key = (conn.local_port, conn.peer_port)
        if conn.pending:
            self._rx_ready.setdefault(key, None)
        if conn.watched():
            events = conn.wanted_events()
            if not conn.registered:
                self._epoll.register(conn.fd, events)
                conn.registered, conn.events = True, events
            elif events != conn.events:
                self._epoll.modify(conn.fd, events)
                conn.events = events
        elif conn.registered:
            self._epoll.unregister(conn.fd)
            conn.registered = False
        if conn.expiry is not None and conn.expiry != conn.queued_expiry:
            conn.queued_expiry = conn.expiry
            heapq.heappush(self._deadlines, (conn.expiry, 1, conn.local_port, conn.peer_port))

    def _expire(self, now: float) -> None:
        """Reset connections whose timeout passed; close host sockets that did not
        send their CONNECT line in time; arm the timer for the next deadline.
        Stale heap entries (a timeout disarmed since) are skipped as they come due."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            when, kind, a, b = heapq.heappop(deadlines)
            if kind == 0:
                stream = self._host_streams.get(a)
                if stream is not None and stream.deadline == when:
                    self.stats["bad_connect_lines"] += 1
                    self._close_host_stream(stream)
                continue
            conn = self.connections.get((a, b))
            if conn is None or conn.expiry != when:
                continue
            # A REQUEST the guest never answered, or a shutdown it never finished:
            # the host program sees its socket close, the guest gets an RST.
            conn.queued_expiry = None
            conn.kill()
            self.stats["connections_killed"] += 1
            self._update(conn)
        self._timer.arm(deadlines[0][0] if deadlines else None)

    def _queue_rst(self, local_port: int, peer_port: int, op: int) -> None:
        """An RST for a packet that belongs to no connection; never one for an RST
        (5.10.6.4: that would ping-pong)."""
        if op == OP_RST:
            return
        if len(self._rsts) >= MUXER_RXQ_SIZE:
            self.stats["rst_dropped"] += 1
            return
        self._rsts.append((local_port, peer_port))

    def _header(self, local_port: int, peer_port: int, op: int, flags: int, length: int,
                fwd_cnt: int) -> PacketHeader:
        return PacketHeader(HOST_CID, self.guest_cid, local_port, peer_port, length,
                            TYPE_STREAM, op, flags, CONN_TX_BUF_SIZE if op != OP_RST else 0,
                            fwd_cnt)


__all__ = ["CONN_TX_BUF_SIZE", "HEADER", "HEADER_SIZE", "HOST_CID", "MAX_CONNECTIONS",
           "MAX_PKT_BUF_SIZE", "PacketHeader", "VsockError", "VsockMuxer",
           "parse_connect_line"]

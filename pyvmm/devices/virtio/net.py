"""virtio-net on a TAP device (virtio 1.2, section 5.1).

The TAP is opened with IFF_VNET_HDR, whose 12-byte header is exactly
struct virtio_net_hdr_v1: the guest's checksum and segmentation offload
requests pass through to the host kernel unchanged, and the host's go to
the guest the same way.  That makes CSUM/TSO nearly free to offer.
Receive uses mergeable buffers: a packet may span several of the guest's
chains, counted in the header's num_buffers.

Rate limiters (Firecracker's rx_rate_limiter and tx_rate_limiter) charge one
op and the whole frame, vnet header included, per frame.  A transmit frame
over budget goes back to the TX ring; a received frame over budget is held
(at most one, as Firecracker's deferred frame) while the TAP is not read, so
the frames behind it wait in the host kernel's TAP queue until the limiter's
timer fires.

With an MMDS stack (pyvmm.mmds.netstack, Firecracker's MMDS network stack) the
device answers ARP and TCP for the MMDS address itself: each transmitted frame
the stack claims (its headers are looked at first, in place; only a claimed
frame is copied) goes to the stack and never to the TAP, and the stack's frames
reach the guest ahead of the TAP's, after each TX kick, each RX kick and each
expiry of the stack's timer (a timerfd the I/O thread watches, as the rate
limiters' are).  As Firecracker's, MMDS frames are charged to neither rate
limiter, and the stack's connections are not part of a snapshot: the guest's
TCP sees them reset.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import struct
from typing import TYPE_CHECKING, Callable

from pyvmm.devices.rate_limiter import UNLIMITED, RateLimited, TimerFd, TokenKind, \
    serve_limited
from pyvmm.devices.virtio.chain import Chain, QueueError, Reader
from pyvmm.devices.virtio.device import CHAINS_PER_SLICE, VirtioDevice, VirtioInterrupt
from pyvmm.devices.virtio.state import StateReader, encode_bytes
from pyvmm.errors import PyvmmError
from pyvmm.memory import GuestMemory

if TYPE_CHECKING:
    from pyvmm.config import RateLimiterConfig
    from pyvmm.mmds.netstack import MmdsStack

DEVICE_ID_NET = 1
RX, TX = 0, 1
QUEUE_SIZE = 256
VNET_HDR_SIZE = 12                       # struct virtio_net_hdr_v1 (5.1.6)
NUM_BUFFERS_OFFSET = 10                  # its le16 num_buffers
NUM_BUFFERS = struct.Struct("<H")
VNET_HDR_F_NEEDS_CSUM = 1                # its flags: the device completes the checksum
VNET_HDR_GSO_NONE = 0                    # its gso_type: not a segmentation offload
# What the MMDS stack looks at to claim a frame: the vnet header, then Ethernet
# and ARP up to the target protocol address (IPv4's destination comes earlier).
MMDS_PEEK = VNET_HDR_SIZE + 42
# The largest frame either side may hand over: a 64 KiB GSO packet with its
# Ethernet and VLAN headers, plus the vnet header (Firecracker's MAX_BUFFER_SIZE).
MAX_PACKET = 65562

# Feature bits (5.1.3)
F_CSUM, F_GUEST_CSUM, F_MAC = 0, 1, 5
F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO = 7, 8, 9, 10
F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO = 11, 12, 13, 14
F_MRG_RXBUF, F_STATUS = 15, 16
S_LINK_UP = 1

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO = 0x01, 0x02, 0x04, 0x08, 0x10
IFNAMSIZ = 16

# What each guest receive offload needs from the TAP (TUNSETOFFLOAD).
GUEST_OFFLOADS = ((F_GUEST_CSUM, TUN_F_CSUM), (F_GUEST_TSO4, TUN_F_TSO4),
                  (F_GUEST_TSO6, TUN_F_TSO6), (F_GUEST_ECN, TUN_F_TSO_ECN),
                  (F_GUEST_UFO, TUN_F_UFO))


class NetError(PyvmmError):
    """A TAP device that cannot be used, or a bad MAC address."""


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        mac = b""
    if len(parts) != 6 or len(mac) != 6 or any(len(p) != 2 for p in parts):
        raise NetError(f"bad MAC address {text!r}: use six hex pairs like 06:00:ac:10:00:02")
    if mac[0] & 1:
        raise NetError(f"MAC address {text} is multicast: the first byte must be even")
    return mac


def default_mac(iface_id: str) -> bytes:
    """A stable, locally administered unicast MAC derived from the interface id."""
    return bytes([0x06]) + hashlib.sha256(iface_id.encode()).digest()[:5]


def open_tap(name: str) -> int:
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise NetError(f"bad TAP device name {name!r}: 1 to {IFNAMSIZ - 1} characters")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise NetError(f"cannot open /dev/net/tun: {exc.strerror} (load the tun module)") \
            from None
    try:
        ifreq = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
    except OSError as exc:
        os.close(fd)
        raise NetError(f"cannot attach to TAP device {name}: {exc.strerror} (create it first: "
                       f"`ip tuntap add {name} mode tap`, and run pyvmm where it can open it)") \
            from None
    return fd


class Net(VirtioDevice, RateLimited):
    device_id = DEVICE_ID_NET
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    name = "virtio-net"

    def __init__(self, tap: str, mac: bytes, fd: int | None = None,
                 rx_rate_limiter: "RateLimiterConfig | None" = None,
                 tx_rate_limiter: "RateLimiterConfig | None" = None,
                 mmds: "MmdsStack | None" = None) -> None:
        """Attach to TAP device `tap`; or, for tests, to any packet fd that keeps
        frame boundaries (a SOCK_DGRAM socketpair) with no offloads.  With `mmds`,
        that stack answers the frames for the MMDS address (module docstring)."""
        super().__init__()
        self.init_limiters({"rx_rate_limiter": (rx_rate_limiter, RX),
                            "tx_rate_limiter": (tx_rate_limiter, TX)})
        self.tap_name = tap
        self.mac = mac
        self.is_tap = fd is None
        self.fd = open_tap(tap) if fd is None else fd
        self.features |= sum(1 << bit for bit in (
            F_MAC, F_MRG_RXBUF, F_STATUS, F_CSUM, F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN,
            F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN))
        self.config = bytearray(mac + struct.pack("<H", S_LINK_UP))
        self.stats.update(rx_packets=0, tx_packets=0, rx_dropped=0)
        self._rx_buffer = bytearray(MAX_PACKET)
        self._pending: memoryview | None = None      # a packet waiting for RX buffers
        self.mmds = mmds
        self._mmds_pending: memoryview | None = None  # the stack's, waiting for RX buffers
        self._mmds_timer: TimerFd | None = None
        self._mmds_armed: float | None = None         # the deadline the timer is set for
        if mmds is not None:
            self._mmds_timer = TimerFd()
            self.stats.update(mmds_tx_frames=0, mmds_rx_frames=0)
        # Set by attach(): stop/start watching the TAP for input (I/O thread only).
        self.watch_tap: Callable[[bool], None] = lambda on: None

    # -- lifecycle ---------------------------------------------------------------

    def activate(self, memory: GuestMemory, interrupt: VirtioInterrupt) -> None:
        super().activate(memory, interrupt)
        if self.is_tap:
            offloads = sum(tun for bit, tun in GUEST_OFFLOADS if self.acked(bit))
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, offloads)
        self.watch_tap(True)

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self._pending = None
            self._mmds_pending = None
            self.watch_tap(False)

    def stop_serving(self) -> None:
        super().stop_serving()
        self.watch_tap(False)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.close_limiters()
        if self._mmds_timer is not None:
            self._mmds_timer.close()

    def wire_rate_limiters(self, watch: Callable[[int, Callable[[], None], bool], None],
                           resume: Callable[[int], None]) -> None:
        """As RateLimited's, plus the MMDS stack's timer, served the same way."""
        super().wire_rate_limiters(watch, resume)
        if self._mmds_timer is not None:
            watch(self._mmds_timer.fd, self.mmds_timer_fired, True)

    def save(self) -> dict:
        with self.lock:
            state = super().save()
            state["pending_rx"] = None if self._pending is None else encode_bytes(self._pending)
            return state

    def restore(self, state: object) -> None:
        """As VirtioDevice.restore, with the received frame that was waiting for
        receive buffers, if any: it is delivered first."""
        pending = StateReader(state, f"{self.name} state").optional_blob("pending_rx",
                                                                          MAX_PACKET)
        with self.lock:
            super().restore(state)
            if pending is not None:
                self._rx_buffer[:len(pending)] = pending
                self._pending = memoryview(self._rx_buffer)[:len(pending)]

    # -- transmit: guest -> TAP ----------------------------------------------------

    def process_queue(self, index: int) -> bool:
        if index == TX:
            detoured = self.stats.get("mmds_tx_frames", 0)
            sent = serve_limited(self, self.queues[TX], self.limiters["tx_rate_limiter"][0],
                                 CHAINS_PER_SLICE, self._tx_cost, self._transmit)
            self.stats["requests"] += sent
            if self.mmds is not None and self.stats["mmds_tx_frames"] != detoured:
                self._deliver_mmds()        # the stack's answers to what it was sent
            return sent >= CHAINS_PER_SLICE
        return self._deliver()          # the guest gave us receive buffers

    @staticmethod
    def _tx_cost(chain: Chain) -> int:
        """A frame's length, vnet header included; a frame _transmit() refuses is
        not charged (Firecracker checks its size first too)."""
        if chain.writable_buffers or not VNET_HDR_SIZE <= chain.readable_bytes <= MAX_PACKET:
            return UNLIMITED
        return chain.readable_bytes

    def _transmit(self, chain: Chain) -> int:
        """Send one frame (vnet header first) to the TAP; the guest gets its
        buffers back whatever happens to it."""
        if chain.writable_buffers:
            raise QueueError("virtio-net transmit buffers must be device-readable")
        frame = chain.reader()
        length = frame.available_bytes()
        if not VNET_HDR_SIZE <= length <= MAX_PACKET:
            self.stats["errors"] += 1
            return 0
        if self.mmds is not None and self._detour(chain, length):
            return 0
        try:
            os.writev(self.fd, frame.views())
            self.stats["tx_packets"] += 1
            self.stats["bytes_written"] += length - VNET_HDR_SIZE
        except OSError:
            self.stats["errors"] += 1     # the host side is down: the frame is lost
        return 0

    def _detour(self, chain: Chain, length: int) -> bool:
        """Give a transmitted frame to the MMDS stack if it claims it; True if so.
        Only the headers are read until then.  A guest that rewrites the frame
        between the look and the copy gets it to the TAP as it then is (Firecracker
        accepts the same race: the host's firewall, not the MMDS, guards the TAP)."""
        assert self.mmds is not None
        peek = chain.reader()
        head = peek.read(min(length, MMDS_PEEK))
        if not self.mmds.claims(head[VNET_HDR_SIZE:]):
            return False
        flags, gso_type = head[0], head[1]
        frame = head[VNET_HDR_SIZE:] + b"".join(peek.views())
        # A checksum left to the device, or a GSO frame (whose checksum always is),
        # is partial: the stack does not check it.
        partial = bool(flags & VNET_HDR_F_NEEDS_CSUM) or gso_type != VNET_HDR_GSO_NONE
        if not self.mmds.detour(frame, needs_csum=partial):
            return False
        self.stats["mmds_tx_frames"] += 1
        # Not traffic the limiter meters (Firecracker gives the budget back too).
        limiter = self.limiters["tx_rate_limiter"][0]
        limiter.manual_replenish(1, TokenKind.OPS)
        limiter.manual_replenish(length, TokenKind.BYTES)
        return True

    # -- receive: TAP -> guest -----------------------------------------------------

    def tap_readable(self) -> None:
        """The TAP has frames (I/O thread).  The TAP's fd is watched level-triggered:
        frames left after a slice bring us back on the next round."""
        self.serve(self._deliver)

    def _deliver(self, tap: bool = True) -> bool:
        """Deliver up to CHAINS_PER_SLICE frames, the MMDS stack's first, then the
        TAP's unless `tap` is False; True if that budget ran out."""
        queue = self.queues[RX]
        limiter = self.limiters["rx_rate_limiter"][0]
        delivered = 0
        starved = False             # the MMDS has a frame and the guest no buffers
        while delivered < CHAINS_PER_SLICE:
            if self.mmds is not None:
                placed = self._place_mmds()
                if placed:
                    delivered += 1
                    continue
                if placed is False:
                    starved = True
                    if tap:
                        self.watch_tap(False)   # no buffers: wait for the guest's RX kick
                    break
            if not tap:
                break
            if limiter.is_blocked:
                # Throttled: read nothing more from the TAP until the timer fires.
                self.stats["throttled"] += 1
                self.watch_tap(False)
                break
            if self._pending is None:
                try:
                    n = os.readv(self.fd, [self._rx_buffer])
                except BlockingIOError:
                    break
                except OSError:
                    self.stats["errors"] += 1
                    break
                self._pending = memoryview(self._rx_buffer)[:n]
            size = len(self._pending)
            charged = limiter.enabled and queue.has_available()
            if charged and not limiter.consume_request(size):
                self.stats["throttled"] += 1
                self.watch_tap(False)   # the frame waits here, the rest in the TAP
                break
            if not self._place(self._pending):
                if charged:             # not delivered after all: the budget back
                    limiter.manual_replenish(1, TokenKind.OPS)
                    limiter.manual_replenish(size, TokenKind.BYTES)
                self.watch_tap(False)   # no buffers: wait for the guest's RX kick
                break
            self._pending = None
            delivered += 1
        if tap and not starved and self._pending is None and not limiter.is_blocked:
            self.watch_tap(True)
        if delivered:
            assert self.interrupt is not None
            self.interrupt.signal_used(queue)
        if self.mmds is not None:
            self._arm_mmds()
        return delivered >= CHAINS_PER_SLICE

    # -- the MMDS stack's frames -----------------------------------------------------

    def _place_mmds(self) -> bool | None:
        """Deliver the MMDS stack's next frame: True if done, False if it waits for
        receive buffers, None if the stack has nothing.  A frame is taken from the
        stack only when there are buffers: taking it counts it as sent."""
        assert self.mmds is not None
        if self._mmds_pending is None:
            if not self.queues[RX].has_available():
                return False if self.mmds.has_frames() else None
            frame = self.mmds.pop_frame()
            if frame is None:
                return None
            # A zeroed header (num_buffers set by _place): flags 0, for the stack's
            # checksums are complete.
            self._mmds_pending = memoryview(bytes(VNET_HDR_SIZE) + frame)
        if not self._place(self._mmds_pending):
            return False
        self._mmds_pending = None
        self.stats["mmds_rx_frames"] += 1
        return True

    def _deliver_mmds(self) -> None:
        """The stack's frames after a TX kick or its timer: a slice now, the rest
        through the RX queue's own scheduling, behind the other devices."""
        if self._deliver(tap=False):
            self._resume(RX)

    def mmds_timer_fired(self) -> None:
        """The MMDS stack's timerfd fired (I/O thread): run its timers, deliver."""
        assert self._mmds_timer is not None
        with self.lock:
            self._mmds_timer.fired()
            self._mmds_armed = None
        self.serve(self._mmds_tick)

    def _mmds_tick(self) -> bool:
        assert self.mmds is not None
        self.mmds.tick()
        self._deliver_mmds()
        return False

    def _arm_mmds(self) -> None:
        """Set the timer for the stack's next deadline, unless it fires before then
        already (a timer that fires early just finds nothing to do)."""
        assert self.mmds is not None and self._mmds_timer is not None
        deadline = self.mmds.next_deadline()
        if deadline is None or (self._mmds_armed is not None and self._mmds_armed <= deadline):
            return
        self._mmds_timer.arm(int((deadline - self.mmds.clock()) * 1e9))
        self._mmds_armed = deadline

    def _place(self, packet: memoryview) -> bool:
        """Copy one frame (vnet header first) into RX chains; False if none are free."""
        queue = self.queues[RX]
        if not queue.has_available():
            return False
        if not packet:
            self.stats["rx_dropped"] += 1          # nothing to deliver, not even a header
            return True
        mergeable = self.acked(F_MRG_RXBUF)
        frame = Reader([packet])
        used: list[tuple[Chain, int]] = []
        while frame.available_bytes():
            chain = queue.pop()
            if chain is None:
                if len(used) < queue.size:
                    # Out of buffers mid-frame: give them back untouched and wait for
                    # the guest to add more (the bytes copied so far get rewritten).
                    queue.unpop(len(used))
                    return False
                # The whole ring cannot hold this frame: drop it, return the chains empty.
                for taken, _ in used:
                    queue.push_used(taken.head, 0)
                self.stats["rx_dropped"] += 1
                return True
            used.append((chain, self._fill(chain, frame)))
            if not mergeable:
                break
        if frame.available_bytes():
            self.stats["rx_dropped"] += 1          # the frame did not fit a single chain
        self._set_num_buffers(used[0][0], len(used))
        for chain, written in used:
            queue.push_used(chain.head, written)
        self.stats["rx_packets"] += 1
        self.stats["bytes_read"] += len(packet) - VNET_HDR_SIZE
        return True

    def _fill(self, chain: Chain, frame: Reader) -> int:
        """Copy as much of the rest of the frame as fits into chain; returns how much."""
        if chain.readable_buffers:
            raise QueueError("virtio-net receive buffers must be device-writable")
        buffers = chain.writer()
        for piece in frame.views(min(frame.available_bytes(), buffers.available_bytes())):
            buffers.write(piece)
        return buffers.bytes_written

    def _set_num_buffers(self, first: Chain, count: int) -> None:
        """5.1.6.4: the frame's header, in its first chain, says how many chains it took."""
        header = first.writer()
        if header.available_bytes() >= VNET_HDR_SIZE:
            header.skip(NUM_BUFFERS_OFFSET)
            header.write_obj(NUM_BUFFERS, count)

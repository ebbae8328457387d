"""virtio-vsock (virtio 1.2, section 5.10), its host side Firecracker's Unix-socket
muxer (pyvmm.devices.vsock_uds).

Three queues (5.10.2): the guest's receive buffers (rx), the packets it sends
(tx), and buffers for device events (event).  The config space is the guest's
CID, le64 (5.10.4).  Only VIRTIO_F_VERSION_1 (and the ring features every
device has) is offered: stream sockets need nothing more, and
VIRTIO_VSOCK_F_SEQPACKET (bit 1) is not implemented, so it is never offered.

A packet (5.10.6) is a 44-byte header and `len` bytes of data, in whatever
descriptors the driver chose (Linux 6.1 puts the header and the data of both
directions in separate ones): the chain cursors read and write them, and the
data moves between guest RAM and the host sockets through views, with no copy
in Python.

What the device does with a broken packet (Firecracker's device.rs): a TX
chain too short for its header or its `len`, with device-writable buffers, or
longer than MAX_PKT_BUF_SIZE is returned unread and counted; an RX chain that
cannot hold a header is returned empty.  Only a broken ring (pyvmm's queue
checks) fails the device (2.1.2).

Snapshots (Firecracker's persist.rs and snapshot docs): the device state is
the config and the queues; the connections are host sockets and do not
survive.  A restored device drops them all and sends the guest
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (5.10.6.7) in its first event buffer, so
that the guest resets its sockets and reads its CID again.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Callable

from pyvmm.devices.virtio.chain import Chain
from pyvmm.devices.virtio.device import CHAINS_PER_SLICE, VirtioDevice, VirtioInterrupt
from pyvmm.devices.vsock_uds import HEADER, HEADER_SIZE, MAX_PKT_BUF_SIZE, PacketHeader
from pyvmm.memory import GuestMemory

if TYPE_CHECKING:
    from pyvmm.devices.vsock_uds import VsockMuxer

DEVICE_ID_VSOCK = 19                     # 5.10.1
RX, TX, EVENT = 0, 1, 2                  # 5.10.2
QUEUE_SIZE = 256                         # Firecracker's FIRECRACKER_MAX_QUEUE_SIZE
CONFIG = struct.Struct("<Q")             # struct virtio_vsock_config: le64 guest_cid (5.10.4)
F_STREAM, F_SEQPACKET = 0, 1             # 5.10.3: neither is offered (see the docstring)
EVENT_TRANSPORT_RESET = 0                # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (5.10.6.7)
EVENT_LAYOUT = struct.Struct("<I")       # struct virtio_vsock_event: le32 id


class Vsock(VirtioDevice):
    device_id = DEVICE_ID_VSOCK
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)
    name = "virtio-vsock"

    def __init__(self, guest_cid: int, backend: "VsockMuxer") -> None:
        super().__init__()
        self.guest_cid = guest_cid
        self.backend = backend
        self.config = bytearray(CONFIG.pack(guest_cid))
        self.stats.update(rx_packets=0, tx_packets=0, tx_dropped=0, rx_bad_buffers=0,
                          events=0)
        # One dict of counters: the muxer's (connections, refusals, drops) show in
        # the device's report (LinuxVm.stats()) beside ours.
        self.stats.update(backend.stats)
        backend.stats = self.stats
        self.reset_event_pending = False          # TRANSPORT_RESET owed (a restore)
        # Set by the builder: start/stop the I/O thread watching backend.fd.
        self.watch_backend: Callable[[bool], None] = lambda on: None

    # -- lifecycle -----------------------------------------------------------------

    def activate(self, memory: GuestMemory, interrupt: VirtioInterrupt) -> None:
        super().activate(memory, interrupt)
        self.watch_backend(True)
        if self.reset_event_pending:
            self.backend.wake()         # the event goes out on the I/O thread

    def reset(self) -> None:
        """The driver reset us: every connection goes (the listening socket stays)."""
        with self.lock:
            super().reset()
            self.watch_backend(False)
            self.backend.reset()
            self.reset_event_pending = False

    def stop_serving(self) -> None:
        super().stop_serving()
        self.watch_backend(False)

    def close(self) -> None:
        self.backend.close()

    def restore(self, state: object) -> None:
        """As VirtioDevice.restore (the config must hold the same guest CID: the
        configuration decides it); the connections are gone and the guest is told."""
        with self.lock:
            super().restore(state)
            self.config[:] = CONFIG.pack(self.guest_cid)
            self.backend.reset()
            self.reset_event_pending = True

    # -- the queues (I/O thread, serving lock held) ------------------------------------

    def process_queue(self, index: int) -> bool:
        if index == TX:
            sent = self.serve_each(self.queues[TX], self._transmit)
            if self._deliver():         # answers (RESPONSE, RST, credit) go out at once
                self.backend.wake()
            return sent >= CHAINS_PER_SLICE
        if index == RX:
            return self._deliver()
        self._send_reset_event()
        return False

    def backend_ready(self) -> None:
        """The muxer's epoll fd is readable (I/O thread): sockets, timers, a wake-up."""
        self.serve(self._serve_backend)

    def _serve_backend(self) -> bool:
        self.backend.handle_events()
        self._send_reset_event()
        if self._deliver():
            self.backend.wake()         # more for the guest: after the other fds
        return False

    def _transmit(self, chain: Chain) -> int:
        """One guest packet to the muxer; the chain goes back unwritten either way."""
        packet = chain.reader()
        if chain.writable_buffers or packet.available_bytes() < HEADER_SIZE:
            self.stats["tx_dropped"] += 1
            return 0
        header = PacketHeader._make(packet.read_obj(HEADER))
        if header.length > MAX_PKT_BUF_SIZE or header.length > packet.available_bytes():
            self.stats["tx_dropped"] += 1
            return 0
        self.stats["tx_packets"] += 1
        self.stats["requests"] += 1
        self.stats["bytes_written"] += header.length
        self.backend.send_packet(header, packet)
        return 0

    def _deliver(self) -> bool:
        """Fill RX buffers with what the muxer owes the guest, at most
        CHAINS_PER_SLICE of them; True if that budget ran out with more owed."""
        queue = self.queues[RX]
        delivered = 0
        while delivered < CHAINS_PER_SLICE and self.backend.has_pending_rx():
            chain = queue.pop()
            if chain is None:
                break                   # the guest's RX kick brings us back
            written = self._receive(chain)
            if written is None:
                queue.unpop(1)
                break
            queue.push_used(chain.head, written)
            delivered += 1
        if delivered:
            assert self.interrupt is not None
            self.interrupt.signal_used(queue)
        return delivered >= CHAINS_PER_SLICE and self.backend.has_pending_rx()

    def _receive(self, chain: Chain) -> int | None:
        """One packet into an RX chain: bytes written, or None if nothing was owed."""
        if chain.readable_buffers or chain.total_bytes < HEADER_SIZE:
            self.stats["rx_bad_buffers"] += 1
            return 0
        buffers = chain.writer()
        data = buffers.split_at(HEADER_SIZE)
        header = self.backend.recv_packet(data)
        if header is None:
            return None
        buffers.write_obj(HEADER, *header)
        self.stats["rx_packets"] += 1
        self.stats["bytes_read"] += header.length
        return HEADER_SIZE + header.length

    def _send_reset_event(self) -> None:
        """VIRTIO_VSOCK_EVENT_TRANSPORT_RESET into the first event buffer, if one is owed
        and the guest has given one (else its event-queue kick brings us back)."""
        if not self.reset_event_pending:
            return
        queue = self.queues[EVENT]
        if not queue.ready:
            return
        chain = queue.pop()
        if chain is None:
            return
        written = 0
        if not chain.readable_buffers and chain.total_bytes >= EVENT_LAYOUT.size:
            chain.writer().write_obj(EVENT_LAYOUT, EVENT_TRANSPORT_RESET)
            written = EVENT_LAYOUT.size
            self.reset_event_pending = False
            self.stats["events"] += 1
        queue.push_used(chain.head, written)
        assert self.interrupt is not None
        self.interrupt.signal_used(queue)

"""What the virtio device tests share: guest RAM, a random disk image, an interrupt counter.

Import the fixtures into a test module (`from tests.framework.virtio import memory,
disk`) to use them there.
"""
from __future__ import annotations

import os

import pytest

from pyvmm.memory import GuestMemory, MiB

MEM = 4 * MiB                 # the guest RAM a device test's rings and buffers live in
DISK_SECTORS = 2048           # a 1 MiB image


class Irq:
    """Counts the interrupts a transport raises (its raise_irq callable)."""

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


# -- virtio-vsock: the guest side, played by a test ---------------------------------------

class GuestVsock:
    """A virtio-vsock device on a transport, its three queues driven as Linux 6.1's
    virtio_transport drives them (a 44-byte header buffer and a 4 KiB data buffer per
    RX chain, eight 4-byte event buffers), with no VM: the test is the guest.

    `pump()` serves the muxer's sockets and timers on the calling thread, as the I/O
    thread does in a VM; `recv()` returns the packets the device put in RX buffers."""

    CID = 3
    QUEUE_SIZE = 64
    RX_DATA = 4096                          # VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE
    RX_CHAINS = 16
    EVENT_BUFFERS = 8

    def __init__(self, memory: GuestMemory, uds_path: str, cid: int = CID) -> None:
        from pyvmm.devices.virtio import mmio
        from pyvmm.devices.virtio.driver import HostDriver
        from pyvmm.devices.virtio.vsock import Vsock
        from pyvmm.devices.vsock_uds import VsockMuxer
        self.memory = memory
        self.cid = cid
        self.muxer = VsockMuxer(cid, uds_path)
        self.device = Vsock(cid, self.muxer)
        self.irq = Irq()
        self.transport = mmio.VirtioMmio(self.device, memory, self.irq)
        self.rx, self.tx, self.event = (
            HostDriver(self.transport, memory, base=0x10000 + 0x10000 * q,
                       queue_size=self.QUEUE_SIZE, queue=q) for q in range(3))
        self.rx_buffers: dict[int, tuple[int, int]] = {}    # head -> (header, data) addresses
        self.tx_area = 0x100000              # TX packets are written here, round robin
        self.tx_next = 0
        self.events: list[int] = []
        self.event_buffers: dict[int, int] = {}

    def start(self) -> "GuestVsock":
        self.rx.negotiate()
        for driver in (self.rx, self.tx, self.event):
            driver.configure_queue()
        self.rx.driver_ok()
        for n in range(self.RX_CHAINS):
            self.post_rx(n)
        self.rx.kick()
        for n in range(self.EVENT_BUFFERS):
            addr = 0x300000 + 16 * n
            self.event_buffers[self.event.submit([(addr, 4, True)])] = addr
        self.event.kick()
        return self

    def post_rx(self, slot: int) -> None:
        header, data = 0x220000 + 64 * slot, 0x280000 + self.RX_DATA * slot
        head = self.rx.submit([(header, 44, True), (data, self.RX_DATA, True)])
        self.rx_buffers[head] = (header, data, slot)

    # -- guest -> host -------------------------------------------------------------------

    def send(self, op: int, src_port: int, dst_port: int, data: bytes = b"", *,
             flags: int = 0, buf_alloc: int = 256 * 1024, fwd_cnt: int = 0,
             dst_cid: int = 2, src_cid: int | None = None, socket_type: int = 1,
             length: int | None = None) -> None:
        """One packet on the TX queue (header and data in two buffers, as Linux 6.1)."""
        from pyvmm.devices.vsock_uds import HEADER
        header = HEADER.pack(self.cid if src_cid is None else src_cid, dst_cid, src_port,
                             dst_port, len(data) if length is None else length, socket_type,
                             op, flags, buf_alloc, fwd_cnt)
        addr = self.tx_area + (self.tx_next % 16) * 0x11000
        self.tx_next += 1
        self.memory.write(addr, header)
        buffers = [(addr, len(header), False)]
        if data:
            self.memory.write(addr + 0x40, data)
            buffers.append((addr + 0x40, len(data), False))
        self.tx.submit(buffers)
        self.tx.kick()
        assert len(self.tx.used()) == 1

    # -- host -> guest -------------------------------------------------------------------

    def pump(self, rounds: int = 50) -> None:
        """Serve the muxer's ready fds (the I/O thread's job) until none are ready."""
        import select
        for _ in range(rounds):
            ready, _, _ = select.select([self.muxer.fd], [], [], 0)
            if not ready:
                return
            self.device.backend_ready()

    def recv(self) -> list[tuple]:
        """The packets delivered since the last call, as (PacketHeader, data); their
        buffers go back to the device."""
        from pyvmm.devices.vsock_uds import HEADER, PacketHeader
        packets = []
        used = self.rx.used()
        for head, length in used:
            header_addr, data_addr, slot = self.rx_buffers.pop(head)
            header = PacketHeader._make(HEADER.unpack(self.memory.read(header_addr, 44)))
            assert length == 44 + header.length
            packets.append((header, self.memory.read(data_addr, header.length)))
            self.post_rx(slot)
        if used:
            self.rx.kick()
        return packets

    def recv_events(self) -> list[int]:
        ids = []
        for head, length in self.event.used():
            ids.append(self.memory.read_int(self.event_buffers[head], 4))
        return ids

    def close(self) -> None:
        self.transport.close()

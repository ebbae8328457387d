"""A virtio driver in Python that talks to our device models with no guest.

It plays the part of Linux's virtio_mmio + virtio_ring: it negotiates
features through the register file and places descriptor tables and rings in
guest RAM.  Tests use it to check devices and to attack them with malformed
rings; benches use it to measure the queue code without KVM.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.device import ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK
from pyvmm.devices.virtio.queue import DESC_SIZE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvmm.memory import GuestMemory


def _w32(transport: mmio.VirtioMmio, offset: int, value: int) -> None:
    transport.write(offset, (value & 0xFFFFFFFF).to_bytes(4, "little"))


def _r32(transport: mmio.VirtioMmio, offset: int) -> int:
    return int.from_bytes(transport.read(offset, 4), "little")


@dataclass
class QueueLayout:
    desc: int
    avail: int
    used: int
    size: int


class HostDriver:
    """Drives one of a device's queues (`queue`, 0 by default) from the host, using
    RAM from `base` upward.  setup() does the whole initialisation (3.1.1) for
    queue 0 alone; for more queues, one driver per queue: negotiate() on one,
    configure_queue() on each, then driver_ok() on one."""

    def __init__(self, transport: mmio.VirtioMmio, memory: GuestMemory, base: int = 0x10000,
                 queue_size: int = 16, features: int | None = None, queue: int = 0) -> None:
        self.t = transport
        self.memory = memory
        self.queue = queue
        self.size = queue_size
        self.layout = QueueLayout(base, base + DESC_SIZE * queue_size,
                                  base + 0x1000 * ((DESC_SIZE * queue_size + 0x1000) // 0x1000
                                                   + 1), queue_size)
        self.data = self.layout.used + 0x2000       # buffers start here
        self.avail_idx = 0
        self.used_seen = 0
        self.features = features
        self.next_desc = 0

    def setup(self, ready: bool = True) -> None:
        self.negotiate()
        self.configure_queue(ready)
        self.driver_ok()

    def negotiate(self) -> None:
        """Reset the device, then offer back the features (all it offers by default)."""
        t = self.t
        _w32(t, mmio.STATUS, 0)
        _w32(t, mmio.STATUS, ACKNOWLEDGE | DRIVER)
        offered = 0
        for sel in (0, 1):
            _w32(t, mmio.DEVICE_FEATURES_SEL, sel)
            offered |= _r32(t, mmio.DEVICE_FEATURES) << (32 * sel)
        wanted = offered if self.features is None else self.features
        for sel in (0, 1):
            _w32(t, mmio.DRIVER_FEATURES_SEL, sel)
            _w32(t, mmio.DRIVER_FEATURES, wanted >> (32 * sel))
        _w32(t, mmio.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)

    def configure_queue(self, ready: bool = True) -> None:
        t = self.t
        _w32(t, mmio.QUEUE_SEL, self.queue)
        _w32(t, mmio.QUEUE_NUM, self.size)
        lay = self.layout
        for low, addr in ((mmio.QUEUE_DESC_LOW, lay.desc), (mmio.QUEUE_AVAIL_LOW, lay.avail),
                          (mmio.QUEUE_USED_LOW, lay.used)):
            _w32(t, low, addr)
            _w32(t, low + 4, addr >> 32)
        self.memory.fill(lay.desc, 0x3000)
        if ready:
            _w32(t, mmio.QUEUE_READY, 1)

    def driver_ok(self) -> None:
        _w32(self.t, mmio.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)

    @property
    def status(self) -> int:
        return _r32(self.t, mmio.STATUS)

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.memory.write(self.layout.desc + DESC_SIZE * index,
                          struct.pack("<QIHH", addr, length, flags, nxt))

    def submit(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Chain (addr, len, device_writable) buffers from descriptor 0; returns head."""
        head = self.next_desc
        n = len(buffers)
        for i, (addr, length, writable) in enumerate(buffers):
            index = (head + i) % self.size
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | \
                (VIRTQ_DESC_F_NEXT if i < n - 1 else 0)
            self.write_desc(index, addr, length, flags, (index + 1) % self.size)
        self.next_desc = (head + n) % self.size
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        lay = self.layout
        self.memory.write_int(lay.avail + 4 + 2 * (self.avail_idx % self.size), 2, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_int(lay.avail + 2, 2, self.avail_idx)

    def kick(self) -> None:
        self.t.notify(self.queue)

    def used(self) -> list[tuple[int, int]]:
        """New (id, len) used elements since the last call."""
        lay = self.layout
        idx = self.memory.read_int(lay.used + 2, 2)
        out = []
        while self.used_seen != idx:
            slot = self.used_seen % self.size
            out.append(struct.unpack("<II", self.memory.read(lay.used + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

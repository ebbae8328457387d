"""The virtio-mmio transport, version 2 (virtio 1.2, section 4.2), and the
device base class that virtio-blk, -net and -rng build on.

The register file is a Python device on the MMIO bus: the guest touches it at
set-up time and once per interrupt (status, ack).  The hot register,
QueueNotify, never exits to userspace: each queue has an ioeventfd on it, and
the I/O thread serves the queue.  Interrupts go through an irqfd.
"""
from __future__ import annotations

import functools
import os
import struct
import threading
from typing import TYPE_CHECKING, Callable

from pyvmm.devices.virtio.queue import QueueError, Virtqueue
from pyvmm.memory import GuestMemory

if TYPE_CHECKING:
    from pyvmm.devices.iothread import IoThread
    from pyvmm.machine import Machine

MMIO_WINDOW = 0x1000                   # each device takes 4 KiB: virtio_mmio.device=4K@...
MAGIC = 0x74726976                     # "virt"
VERSION = 2                            # modern (non-legacy) virtio-mmio
VENDOR_ID = 0x4D565950                 # "PYVM"

# Register offsets (4.2.2, include/uapi/linux/virtio_mmio.h)
MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_AVAIL_LOW, QUEUE_AVAIL_HIGH = 0x090, 0x094
QUEUE_USED_LOW, QUEUE_USED_HIGH = 0x0A0, 0x0A4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

INT_VRING, INT_CONFIG = 1, 2           # InterruptStatus bits

# Device status (2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
DEVICE_NEEDS_RESET, FAILED = 64, 128

# Feature bits (6)
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32


class VirtioDevice:
    """A device behind the transport.  Subclasses set the class attributes and
    implement process_queue(); config space is `self.config` (bytes)."""

    device_id = 0
    queue_sizes: tuple[int, ...] = (256,)
    name = "virtio"

    def __init__(self) -> None:
        self.features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | \
            (1 << VIRTIO_RING_F_INDIRECT_DESC)
        self.config = bytearray()
        self.queues = [Virtqueue(size) for size in self.queue_sizes]
        self.transport: "VirtioMmio | None" = None
        self.stats: dict[str, int] = {"requests": 0, "bytes_read": 0, "bytes_written": 0,
                                      "errors": 0}

    def process_queue(self, index: int) -> None:
        """Serve what the driver made available on queue `index` (I/O thread)."""
        raise NotImplementedError

    def activate(self) -> None:
        """The driver is ready (DRIVER_OK); queues are valid."""

    def reset(self) -> None:
        """The driver reset the device; drop in-flight state."""

    def failed(self) -> None:
        """The device stopped serving (NEEDS_RESET); stop any backend polling."""

    def acked(self, bit: int) -> bool:
        return bool(self.transport and self.transport.driver_features >> bit & 1)

    def signal_used(self, queue: Virtqueue) -> None:
        if self.transport and queue.needs_interrupt():
            self.transport.interrupt(INT_VRING)


class VirtioMmio:
    """The virtio-mmio register file for one device."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory,
                 raise_irq: Callable[[], None]) -> None:
        self.device = device
        device.transport = self
        self.memory = memory
        self._raise_irq = raise_irq
        self.lock = threading.RLock()   # vCPU threads (registers) vs the I/O thread (queues)
        self.on_activate: Callable[["VirtioMmio"], None] | None = None
        self.on_reset: Callable[["VirtioMmio"], None] | None = None
        self.error: str | None = None
        self.eventfds: list[int] = []      # irqfd and ioeventfds (attach()), closed with us
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        for queue in self.device.queues:
            queue.reset()

    @property
    def active(self) -> bool:
        return bool(self.status & DRIVER_OK) and not self.status & DEVICE_NEEDS_RESET

    # -- guest register access (vCPU threads) --------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= CONFIG:
                return self._read_config(offset - CONFIG, size)
            value = self._read_register(offset) if size == 4 else 0
        return value.to_bytes(4, "little")[:size] + bytes(max(0, size - 4))

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            if offset >= CONFIG:
                return                          # no writable config fields in our devices
            if len(data) != 4:
                return                          # 4.2.2: registers take 32-bit accesses only
            self._write_register(offset, int.from_bytes(data, "little"))

    def _read_config(self, offset: int, size: int) -> bytes:
        config = self.device.config
        if offset + size > len(config):
            return bytes(size)
        return bytes(config[offset:offset + size])

    def _queue(self) -> Virtqueue | None:
        queues = self.device.queues
        return queues[self.queue_sel] if self.queue_sel < len(queues) else None

    def _read_register(self, offset: int) -> int:
        queue = self._queue()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return (self.device.features >> (32 * self.device_features_sel)) & 0xFFFFFFFF \
                if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return queue.max_size if queue else 0
        if offset == QUEUE_READY:
            return int(queue.ready) if queue else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        queue = self._queue()
        configurable = queue is not None and not queue.ready and not self.status & DRIVER_OK
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.driver_features_sel < 2 and not self.status & FEATURES_OK:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | \
                    (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NUM and configurable:
            queue.size = value
        elif offset in (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_AVAIL_LOW, QUEUE_AVAIL_HIGH,
                        QUEUE_USED_LOW, QUEUE_USED_HIGH) and configurable:
            self._set_queue_address(queue, offset, value)
        elif offset == QUEUE_READY and queue is not None:
            queue.ready = bool(value & 1)
        elif offset == QUEUE_NOTIFY:
            # Only reached when no ioeventfd is registered (tests, or before activation).
            if self.active and value < len(self.device.queues):
                self.notify(value)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == STATUS:
            self._set_status(value)

    @staticmethod
    def _set_queue_address(queue: Virtqueue, offset: int, value: int) -> None:
        attr = {QUEUE_DESC_LOW: "desc_addr", QUEUE_DESC_HIGH: "desc_addr",
                QUEUE_AVAIL_LOW: "avail_addr", QUEUE_AVAIL_HIGH: "avail_addr",
                QUEUE_USED_LOW: "used_addr", QUEUE_USED_HIGH: "used_addr"}[offset]
        old = getattr(queue, attr)
        if offset & 4:                                  # the *_HIGH registers
            setattr(queue, attr, (old & 0xFFFFFFFF) | (value << 32))
        else:
            setattr(queue, attr, (old & ~0xFFFFFFFF) | value)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            offered = self.device.features
            if self.driver_features & ~offered or not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                value &= ~FEATURES_OK       # 3.1.1: the driver re-reads and sees the refusal
        if value & DRIVER_OK and not self.status & DRIVER_OK:
            self.status = value
            self._activate()
            return
        self.status = (self.status & DEVICE_NEEDS_RESET) | value

    def _activate(self) -> None:
        event_idx = bool(self.driver_features >> VIRTIO_RING_F_EVENT_IDX & 1)
        indirect = bool(self.driver_features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        try:
            for queue in self.device.queues:
                if queue.ready:
                    queue.activate(self.memory, event_idx, indirect)
        except QueueError as exc:
            self.fail(str(exc))
            return
        self.device.activate()
        if self.on_activate:
            self.on_activate(self)

    def reset(self) -> None:
        if self.on_reset:
            self.on_reset(self)
        self.device.reset()
        self._reset_registers()
        self.error = None

    # -- device side (I/O thread) --------------------------------------------------

    def notify(self, index: int) -> None:
        """The driver kicked queue `index`."""
        if index < len(self.device.queues) and self.device.queues[index].ready:
            self.serve(lambda: self.device.process_queue(index))

    def serve(self, work: Callable[[], None]) -> None:
        """Run device work on the queues (I/O thread); a broken ring fails the device."""
        with self.lock:
            if not self.active:
                return
            try:
                work()
            except QueueError as exc:
                self.fail(str(exc))

    def fail(self, reason: str) -> None:
        """The driver broke the protocol: stop serving until it resets us (2.1.2)."""
        self.error = reason
        self.device.stats["errors"] += 1
        self.status |= DEVICE_NEEDS_RESET
        self.device.failed()
        if self.status & DRIVER_OK:
            self.interrupt(INT_CONFIG)

    def close(self) -> None:
        """Release the device's backend and our eventfds; the I/O thread must be stopped."""
        close = getattr(self.device, "close", None)
        if close is not None:
            close()
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []

    def config_changed(self) -> None:
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            self.interrupt(INT_CONFIG)

    def interrupt(self, bits: int) -> None:
        self.interrupt_status |= bits
        self._raise_irq()


def attach(machine: "Machine", iothread: "IoThread", device: VirtioDevice, index: int,
           name: str) -> VirtioMmio:
    """Put device on the MMIO bus as the index-th virtio-mmio device (its window and
    IRQ are pyvmm.layout's): interrupts leave through an irqfd, and each queue's
    kick reaches the I/O thread through an ioeventfd, so the vCPU never exits for
    either.  transport.close() releases the device and the eventfds (stop the I/O
    thread first)."""
    from pyvmm.layout import virtio_window
    from pyvmm.machine import Bus
    base, irq = virtio_window(index)
    eventfds: list[int] = []

    def eventfd() -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        eventfds.append(fd)
        return fd
    try:
        irqfd = eventfd()
        machine.vm.irqfd(irqfd, irq)
        transport = VirtioMmio(device, machine.memory, eventfd_irq(irqfd))
        transport.eventfds = eventfds
        if hasattr(device, "watch_tap"):
            device.watch_tap = functools.partial(iothread.watch, device.fd, device.tap_readable)
        machine.add_device(Bus.MMIO, base, MMIO_WINDOW, transport, name[:23])
        for queue in range(len(device.queues)):
            kick = eventfd()
            # A 4-byte write of the queue's index to QueueNotify signals `kick`
            # inside KVM; the vCPU never exits for it.
            machine.vm.ioeventfd(kick, base + QUEUE_NOTIFY, 4, datamatch=queue)
            iothread.add_eventfd(kick, functools.partial(transport.notify, queue))
    except BaseException:
        for fd in eventfds:
            os.close(fd)
        raise
    return transport


def eventfd_irq(fd: int) -> Callable[[], None]:
    """An interrupt raiser that signals an irqfd."""
    packed = struct.pack("<Q", 1)
    return lambda: os.write(fd, packed)

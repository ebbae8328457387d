"""The virtio-mmio transport, version 2 (virtio 1.2, section 4.2): the register
file that puts a VirtioDevice (pyvmm.devices.virtio.device) on the MMIO bus.

The register file is a Python device on the MMIO bus: the guest touches it at
set-up time and once per interrupt (status, ack).  The hot register,
QueueNotify, never exits to userspace: each queue has an ioeventfd on it, and
the I/O thread serves the queue.  Interrupts go through an irqfd.

Locks: `lock` guards the registers and is never held across queue work, so a
vCPU reading InterruptStatus, acknowledging an interrupt or reading the
config space never waits for a request.  A Status write that resets or
activates the device also takes the device's serving lock (first, then
ours): it waits for the request being served, at most one slice of
CHAINS_PER_SLICE chains, and no queue is touched after the reset.
"""
from __future__ import annotations

import functools
import os
import struct
from typing import TYPE_CHECKING, Callable

import threading

from pyvmm.devices.virtio.chain import QueueError
from pyvmm.devices.virtio.device import DEVICE_NEEDS_RESET, DRIVER_OK, FEATURE_PAGES, \
    FEATURES_OK, INT_CONFIG, INT_VRING, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, \
    VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, VirtioInterrupt
from pyvmm.devices.virtio.queue import Virtqueue
from pyvmm.devices.virtio.state import U32_MAX, StateError, StateReader
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

# The per-queue address registers (4.2.2): which Virtqueue field each sets, and
# whether it holds the high 32 bits.
QUEUE_ADDRESS_REGISTERS = {
    QUEUE_DESC_LOW: ("desc_addr", False), QUEUE_DESC_HIGH: ("desc_addr", True),
    QUEUE_AVAIL_LOW: ("avail_addr", False), QUEUE_AVAIL_HIGH: ("avail_addr", True),
    QUEUE_USED_LOW: ("used_addr", False), QUEUE_USED_HIGH: ("used_addr", True),
}


class VirtioMmio:
    """The virtio-mmio register file for one device (locks: the module docstring).

    `defer` runs a call later on the I/O thread (attach() sets it): a queue
    whose slice ran out of budget continues there.  Without one (tests, the
    bench) the kick serves slice after slice until the queue is empty."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory,
                 raise_irq: Callable[[], None]) -> None:
        self.device = device
        self.memory = memory
        self.lock = threading.RLock()      # the registers' (fail() runs inside _activate)
        self.interrupt = VirtioInterrupt(raise_irq, self.fail)
        self.error: str | None = None
        self.eventfds: list[int] = []      # irqfd and ioeventfds (attach()), closed with us
        self.defer: Callable[[Callable[[], None]], None] | None = None
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt.clear()

    @property
    def active(self) -> bool:
        return bool(self.status & DRIVER_OK) and not self.status & DEVICE_NEEDS_RESET

    @property
    def interrupt_status(self) -> int:
        return self.interrupt.status

    # -- guest register access (vCPU threads) --------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= CONFIG:
                return self.device.read_config(offset - CONFIG, size)
            value = self._read_register(offset) if size == 4 else 0
        return value.to_bytes(4, "little")[:size] + bytes(max(0, size - 4))

    def write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG:
            return                              # no writable config fields in our devices
        if len(data) != 4:
            return                              # 4.2.2: registers take 32-bit accesses only
        value = int.from_bytes(data, "little")
        if offset == QUEUE_NOTIFY:
            # Only reached when no ioeventfd is registered (tests, or before activation);
            # served like a kick, with no register lock held.
            if self.active and value < len(self.device.queues):
                self.notify(value)
        elif offset == STATUS:
            with self.device.lock, self.lock:   # resets and activations wait for a request
                self._write_status(value)
        else:
            with self.lock:
                self._write_register(offset, value)

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
                if self.device_features_sel < FEATURE_PAGES else 0
        if offset == QUEUE_NUM_MAX:
            return queue.max_size if queue else 0
        if offset == QUEUE_READY:
            return int(queue.ready) if queue else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt.status
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.device.config_generation
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        """Any register but Status and QueueNotify.  A queue's registers change only
        before DRIVER_OK: the I/O thread never serves a queue that is being set up."""
        queue = self._queue()
        settable = queue is not None and not self.status & DRIVER_OK
        configurable = settable and not queue.ready
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.driver_features_sel < FEATURE_PAGES and not self.status & FEATURES_OK:
                self.device.ack_features(self.driver_features_sel, value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NUM and configurable:
            queue.size = value
        elif offset in QUEUE_ADDRESS_REGISTERS and configurable:
            self._set_queue_address(queue, offset, value)
        elif offset == QUEUE_READY and settable:
            queue.ready = bool(value & 1)
        elif offset == INTERRUPT_ACK:
            self.interrupt.acknowledge(value)

    def _write_status(self, value: int) -> None:
        """A Status write, under both locks."""
        self._set_status(value)
        if not self.active and self.device.serving:
            self.device.stop_serving()          # DRIVER_OK taken back, or NEEDS_RESET written

    @staticmethod
    def _set_queue_address(queue: Virtqueue, offset: int, value: int) -> None:
        attr, high = QUEUE_ADDRESS_REGISTERS[offset]
        old = getattr(queue, attr)
        if high:
            setattr(queue, attr, (old & 0xFFFFFFFF) | (value << 32))
        else:
            setattr(queue, attr, (old & ~0xFFFFFFFF) | value)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            if not self._features_acceptable():
                value &= ~FEATURES_OK       # 3.1.1: the driver re-reads and sees the refusal
        if value & DRIVER_OK and not self.status & DRIVER_OK:
            self.status = value
            self._activate()
            return
        self.status = (self.status & DEVICE_NEEDS_RESET) | value

    def _features_acceptable(self) -> bool:
        """Only bits the device offers, and VERSION_1: we are not a legacy device."""
        acked = self.device.acked_features
        return not acked & ~self.device.features and bool(acked >> VIRTIO_F_VERSION_1 & 1)

    def _activate(self) -> None:
        try:
            self._activate_queues()
        except QueueError as exc:
            self.fail(str(exc))
            return
        self.device.activate(self.memory, self.interrupt)

    def _activate_queues(self) -> None:
        """Check each ready queue's layout against guest RAM; QueueError if unusable."""
        event_idx = self.device.acked(VIRTIO_RING_F_EVENT_IDX)
        indirect = self.device.acked(VIRTIO_RING_F_INDIRECT_DESC)
        for queue in self.device.queues:
            if queue.ready:
                queue.activate(self.memory, event_idx, indirect)

    def reset(self) -> None:
        with self.device.lock, self.lock:
            self.device.reset()
            self._reset_registers()
            self.error = None

    # -- device side (I/O thread) --------------------------------------------------

    def notify(self, index: int) -> None:
        """The driver kicked queue `index`: serve one slice of it; if the budget ran
        out, the rest comes later (defer), after the other devices' work."""
        queues = self.device.queues
        if index >= len(queues):
            return
        serve_slice = functools.partial(self.device.process_queue, index)
        while queues[index].ready and self.device.serve(serve_slice):
            if self.defer is not None:
                self.defer(functools.partial(self.notify, index))
                return

    def fail(self, reason: str) -> None:
        """The driver broke the protocol, or serving it raised: stop serving until
        it resets us (2.1.2).  Takes only the register lock: the I/O thread calls
        it holding the serving lock, which comes first."""
        with self.lock:
            self.error = reason
            self.device.stats["errors"] += 1
            self.device.record_failure(reason)
            self.status |= DEVICE_NEEDS_RESET
            self.device.stop_serving()
            if self.status & DRIVER_OK:
                self.interrupt.signal_config()

    def report(self) -> dict:
        """The device's counters, why it last failed and its last failure messages:
        what LinuxVm.stats() shows for a virtio device."""
        return dict(self.device.stats, error=self.error,
                    recent_errors=list(self.device.recent_errors))

    def close(self) -> None:
        """Release the device's backend and our eventfds; the I/O thread must be stopped."""
        self.device.close()
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []

    # -- saved state -----------------------------------------------------------------

    def save(self) -> dict:
        """The registers and the device's state, as a JSON-able dict."""
        with self.device.lock, self.lock:
            return {"status": self.status, "device_features_sel": self.device_features_sel,
                    "driver_features_sel": self.driver_features_sel,
                    "queue_sel": self.queue_sel, "interrupt_status": self.interrupt.status,
                    "error": self.error, "device": self.device.save()}

    def restore(self, state: object) -> None:
        """Take what save() returned (on the same guest memory): the device serves
        again from where it was if the driver had set DRIVER_OK.  A StateError,
        with the device left reset, if anything in it is unusable."""
        saved = StateReader(state, f"virtio-mmio state of {self.device.name}")
        status = saved.number("status", U32_MAX)
        selects = [saved.number(key, U32_MAX) for key in
                   ("device_features_sel", "driver_features_sel", "queue_sel")]
        interrupt_status = saved.number("interrupt_status", INT_VRING | INT_CONFIG)
        error = saved.optional_text("error")
        with self.device.lock, self.lock:
            self.reset()
            self.device.restore(saved.record("device"))
            if status & FEATURES_OK and not self._features_acceptable():
                self.reset()
                raise StateError(f"the saved {self.device.name} state has FEATURES_OK with "
                                 f"features {self.device.acked_features:#x}, which it does "
                                 f"not offer (or without VERSION_1)")
            self.status = status
            self.device_features_sel, self.driver_features_sel, self.queue_sel = selects
            self.interrupt.status, self.error = interrupt_status, error
            if self.active:
                self._reactivate()

    def _reactivate(self) -> None:
        try:
            self._activate_queues()
        except QueueError as exc:
            self.reset()
            raise StateError(f"the saved {self.device.name} state cannot be activated: "
                             f"{exc}") from None
        self.device.activate(self.memory, self.interrupt)


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
        transport.defer = iothread.call_soon
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

"""The virtio device contract (Firecracker's VirtioDevice trait), independent of
the transport that puts a device on a bus.

A device owns its queues, its config space and what the driver acked.  It
gets guest memory and its interrupt only when the driver is ready
(activate(), at DRIVER_OK), serves its queues under its own lock, and can
save and restore all of its state as a plain dict.

Threads: the I/O thread serves queue kicks and backend events (a TAP); vCPU
threads reset and activate the device through the transport; the API thread
may swap a disk.  `lock`, the device's serving lock, orders those: it is held
across queue work and taken by whatever changes queue state.  The transport's
registers have a lock of their own, never held across queue work, so a vCPU
reading InterruptStatus never waits for a disk request.  Lock order: the
serving lock first, then the transport's.

Budgets (what one guest can make the VMM do):
- a queue kick serves at most CHAINS_PER_SLICE chains, then the device yields
  and the transport reschedules it behind the other devices (no kick lost);
- a chain is at most its queue's size in descriptors, indirect tables included;
- a device's own per-request Python memory is at most REQUEST_MEMORY_BOUND
  bytes beside the chain's views (one small memoryview per descriptor);
- any exception while serving fails the device the virtio way (2.1.2:
  DEVICE_NEEDS_RESET and a configuration change interrupt): it is counted,
  and its message joins the last RECENT_ERRORS kept, nothing more.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable

from pyvmm.devices.iothread import describe_error
from pyvmm.devices.virtio.chain import Chain
from pyvmm.devices.virtio.queue import QueueState, Virtqueue
from pyvmm.devices.virtio.state import U32_MAX, U64_MAX, StateError, StateReader, \
    encode_bytes
from pyvmm.memory import GuestMemory

# Device status bits (2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
DEVICE_NEEDS_RESET, FAILED = 64, 128

# InterruptStatus bits (4.2.2): used buffers, configuration change
INT_VRING, INT_CONFIG = 1, 2

# Reserved feature bits (6)
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

FEATURE_PAGES = 2                      # 64 feature bits, selected 32 at a time (4.2.2)
MAX_CONFIG_SIZE = 0x1000 - 0x100       # what fits a virtio-mmio window after the registers

CHAINS_PER_SLICE = 64                  # chains served per kick before the device yields
REQUEST_MEMORY_BOUND = 64 * 1024       # a request's own buffers (rng bytes, zeroes), at most
RECENT_ERRORS = 8                      # failure messages a device keeps for its stats


class VirtioInterrupt:
    """A device's line to its driver (Firecracker's IrqTrigger): the InterruptStatus
    bits the transport shows, and the IRQ raised when one is set."""

    def __init__(self, raise_irq: Callable[[], None],
                 needs_reset: Callable[[str], None]) -> None:
        self.status = 0
        self._raise_irq = raise_irq
        self._needs_reset = needs_reset
        # The I/O thread sets bits while a vCPU acknowledges others: `|=` and `&=`
        # are a read and a write each, so they take turns.  Held for no I/O.
        self._status_lock = threading.Lock()

    def signal_used(self, queue: Virtqueue) -> None:
        """Used buffers were returned on `queue`: interrupt if the driver wants it."""
        if queue.needs_interrupt():
            self._trigger(INT_VRING)

    def signal_config(self) -> None:
        self._trigger(INT_CONFIG)

    def signal_needs_reset(self, reason: str) -> None:
        """The driver broke the protocol: DEVICE_NEEDS_RESET, then a configuration
        change notification (2.1.2)."""
        self._needs_reset(reason)

    def acknowledge(self, bits: int) -> None:
        with self._status_lock:
            self.status &= ~bits

    def clear(self) -> None:
        with self._status_lock:
            self.status = 0

    def _trigger(self, bits: int) -> None:
        with self._status_lock:
            self.status |= bits
        self._raise_irq()


class VirtioDevice:
    """A device behind a transport.  Subclasses set the class attributes and
    implement process_queue(); they extend activate(), reset(), stop_serving(),
    close(), save() and restore() for what they hold beyond the queues.

    `stats` holds counters only (the metrics take per-period deltas of them);
    `recent_errors` the last failure messages."""

    device_id = 0
    queue_sizes: tuple[int, ...] = (256,)
    name = "virtio"

    def __init__(self) -> None:
        self.features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | \
            (1 << VIRTIO_RING_F_INDIRECT_DESC)
        self.config = bytearray()
        self.queues = [Virtqueue(size) for size in self.queue_sizes]
        self.stats: dict[str, int] = {"requests": 0, "bytes_read": 0, "bytes_written": 0,
                                      "errors": 0, "failures": 0}
        self.recent_errors: collections.deque[str] = collections.deque(maxlen=RECENT_ERRORS)
        self.lock = threading.RLock()          # the serving lock (module docstring)
        self.acked_features = 0            # what the driver wrote, checked at FEATURES_OK
        self.config_generation = 0         # bumped on each config change (4.2.2)
        self.memory: GuestMemory | None = None
        self.interrupt: VirtioInterrupt | None = None
        self.serving = False               # activated and not stopped: queue work runs

    # -- the contract --------------------------------------------------------------

    def process_queue(self, index: int) -> bool:
        """Serve what the driver made available on queue `index` (I/O thread, locked),
        at most CHAINS_PER_SLICE chains; True if the budget ran out first."""
        raise NotImplementedError

    def activate(self, memory: GuestMemory, interrupt: VirtioInterrupt) -> None:
        """The driver is ready (DRIVER_OK); the transport has activated the queues."""
        self.memory, self.interrupt, self.serving = memory, interrupt, True

    def reset(self) -> None:
        """The driver reset the device (status 0): back to as constructed."""
        with self.lock:
            self.acked_features = 0
            self.config_generation = 0
            self.memory, self.interrupt, self.serving = None, None, False
            for queue in self.queues:
                queue.reset()

    def stop_serving(self) -> None:
        """Serve nothing until activated again: the driver broke the protocol
        (DEVICE_NEEDS_RESET) or took DRIVER_OK back."""
        self.serving = False

    def close(self) -> None:
        """Release the backend (a file, a TAP); the device is not used again."""

    def save(self) -> dict:
        with self.lock:
            return {"device": self.name, "acked_features": self.acked_features,
                    "config": encode_bytes(self.config),
                    "config_generation": self.config_generation,
                    "queues": [queue.save() for queue in self.queues]}

    def restore(self, state: object) -> None:
        """Take what save() returned, inactive (the transport activates the device
        again if the driver had); StateError, with nothing applied, if it is unusable."""
        saved = StateReader(state, f"{self.name} state")
        kind = saved.text("device")
        if kind != self.name:
            raise StateError(f"the saved state is a {kind[:40]!r} device's, not a {self.name}'s")
        acked = saved.number("acked_features", U64_MAX)
        config = saved.blob("config", MAX_CONFIG_SIZE)
        if len(config) != len(self.config):
            raise StateError(f"the saved {self.name} config space is {len(config)} bytes; "
                             f"this device's is {len(self.config)}")
        generation = saved.number("config_generation", U32_MAX)
        queues = [QueueState.parse(queue)
                  for queue in saved.items("queues", len(self.queues))]
        with self.lock:
            self.reset()
            self.acked_features, self.config_generation = acked, generation
            self.config[:] = config
            for queue, queue_state in zip(self.queues, queues):
                queue.load(queue_state)

    # -- for subclasses ------------------------------------------------------------

    def acked(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def ack_features(self, page: int, value: int) -> None:
        """The driver wrote 32 bits of DriverFeatures (`page` 0 or 1)."""
        shift = 32 * page
        self.acked_features = (self.acked_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def read_config(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.config):
            return bytes(size)
        return bytes(self.config[offset:offset + size])

    def serve(self, work: Callable[[], bool]) -> bool:
        """Run queue work (I/O thread): a kick, or a backend with data for the guest;
        returns what work returned (True: its budget ran out, call again).  Whatever
        it raises (a broken ring, guest memory, a backend bug) stops the device
        until the driver resets it; the VMM and the other devices carry on."""
        with self.lock:
            if not self.serving:
                return False
            try:
                return work()
            except Exception as exc:  # noqa: BLE001 - the guest must not reach the I/O thread
                assert self.interrupt is not None
                self.interrupt.signal_needs_reset(describe_error(exc))
                return False

    def record_failure(self, reason: str) -> None:
        """Count a failure and keep its message among the last few."""
        self.stats["failures"] += 1
        self.recent_errors.append(reason)

    def serve_each(self, queue: Virtqueue, serve: Callable[[Chain], int | None],
                   budget: int = CHAINS_PER_SLICE) -> int:
        """Serve the available chains on `queue`, at most `budget` (serve returns the
        bytes it wrote into a chain, or None: the chain is in flight and the device
        returns it later), then interrupt the driver once if it wants; returns how many."""
        served = used = 0
        while served < budget and (chain := queue.pop()) is not None:
            written = serve(chain)
            if written is not None:
                queue.push_used(chain.head, written)
                used += 1
            served += 1
        if used:
            assert self.interrupt is not None
            self.interrupt.signal_used(queue)
        return served

    def config_changed(self) -> None:
        """The device changed its config space: a new generation, and a notification
        once the driver is ready (before DRIVER_OK it reads the config afresh)."""
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self.interrupt is not None:
            self.interrupt.signal_config()

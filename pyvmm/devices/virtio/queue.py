"""Split virtqueues (virtio 1.2, section 2.7), read defensively.

The guest owns the rings and may put anything in them.  Every descriptor's
address and length is checked against guest RAM before it is touched, empty
ones too; a chain is at most the queue size long, an indirect table's too
(2.7.5.3.1), so that a loop ends and a chain's views are O(queue size); any
rule broken raises QueueError: the device then marks itself NEEDS_RESET
instead of serving a request it cannot trust.
"""
from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

from pyvmm.devices.virtio.chain import Chain, QueueError
from pyvmm.devices.virtio.state import U16_MAX, U32_MAX, U64_MAX, StateReader
from pyvmm.kvm import lib
from pyvmm.memory import GuestMemory, GuestMemoryError

MAX_QUEUE_SIZE = 32768                # 2.7: Queue Size is at most 32768 for split rings
DESC_SIZE = 16                        # 2.7.5: le64 addr, le32 len, le16 flags, le16 next
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
# Ring layouts (2.7.6, 2.7.8): flags(2) idx(2) ring[size] then the event word.
RING_HEADER = 4
USED_ELEM_SIZE = 8                    # le32 id, le32 len
MAX_CHAIN_BYTES = 1 << 32             # a chain's total length must fit the used ring's le32
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_new_tuple = tuple.__new__             # Chain(...) without NamedTuple's slower __new__


@dataclass(frozen=True)
class QueueState:
    """What save() keeps of a queue: the driver's layout and both sides' indices."""
    size: int
    ready: bool
    desc_addr: int
    avail_addr: int
    used_addr: int
    next_avail: int
    next_used: int
    event_idx: bool
    indirect: bool
    signalled_used: int | None        # the used index last interrupted for (EVENT_IDX)

    @classmethod
    def parse(cls, state: object) -> "QueueState":
        """Read a saved queue; StateError if any field is of the wrong type or range.
        Whether the layout fits guest RAM is checked when the queue is activated."""
        saved = StateReader(state, "virtqueue")
        return cls(size=saved.number("size", U32_MAX), ready=saved.flag("ready"),
                   desc_addr=saved.number("desc_addr", U64_MAX),
                   avail_addr=saved.number("avail_addr", U64_MAX),
                   used_addr=saved.number("used_addr", U64_MAX),
                   next_avail=saved.number("next_avail", U16_MAX),
                   next_used=saved.number("next_used", U16_MAX),
                   event_idx=saved.flag("event_idx"), indirect=saved.flag("indirect"),
                   signalled_used=saved.optional_number("signalled_used", U16_MAX))


class Virtqueue:
    """Device side of one split virtqueue.

    The three rings are checked against guest RAM once, at activation, and
    then used through memoryviews of exactly their size: every access after
    that is an unpack_from/pack_into at an offset inside a checked view, with
    no per-access walk of the memory map (the hot path of every request)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.next_avail = 0           # our copy of the avail index we have consumed up to
        self.next_used = 0            # the used index we publish next
        self.event_idx = False        # VIRTIO_RING_F_EVENT_IDX negotiated
        self.indirect = False         # VIRTIO_RING_F_INDIRECT_DESC negotiated
        self.memory: GuestMemory | None = None
        self._signalled_used: int | None = None
        self._desc = self._avail = self._used = memoryview(b"")
        self._avail_event_at = self._used_event_at = 0

    # -- saved state -------------------------------------------------------------

    def save(self) -> dict:
        return dataclasses.asdict(QueueState(
            self.size, self.ready, self.desc_addr, self.avail_addr, self.used_addr,
            self.next_avail, self.next_used, self.event_idx, self.indirect,
            self._signalled_used))

    def load(self, state: QueueState) -> None:
        """Take a saved state, inactive: activate() checks it against guest RAM."""
        self.reset()
        self.size, self.ready = state.size, state.ready
        self.desc_addr, self.avail_addr, self.used_addr = \
            state.desc_addr, state.avail_addr, state.used_addr
        self.next_avail, self.next_used = state.next_avail, state.next_used
        self.event_idx, self.indirect = state.event_idx, state.indirect
        self._signalled_used = state.signalled_used

    # -- set-up ------------------------------------------------------------------

    def activate(self, memory: GuestMemory, event_idx: bool, indirect: bool) -> None:
        """Check the driver's layout once; raises QueueError if it is unusable."""
        size = self.size
        if size == 0 or size > self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two up to {self.max_size}")
        rings = []
        for name, addr, length, align in (
                ("descriptor table", self.desc_addr, DESC_SIZE * size, 16),
                ("available ring", self.avail_addr, RING_HEADER + 2 * size + 2, 2),
                ("used ring", self.used_addr, RING_HEADER + USED_ELEM_SIZE * size + 2, 4)):
            if addr % align or not memory.contains(addr, length):
                raise QueueError(f"the {name} at {addr:#x} is misaligned or outside guest RAM")
            rings.append(memory.view(addr, length))
        self._desc, self._avail, self._used = rings
        self._used_event_at = RING_HEADER + 2 * size         # in the avail ring (2.7.10)
        self._avail_event_at = RING_HEADER + USED_ELEM_SIZE * size   # in the used ring
        self.memory = memory
        self.event_idx = event_idx
        self.indirect = indirect

    # -- the available ring ------------------------------------------------------

    def _mem(self) -> GuestMemory:
        if self.memory is None:
            raise QueueError("the queue is not active")
        return self.memory

    def avail_idx(self) -> int:
        self._mem()
        return _U16.unpack_from(self._avail, 2)[0]

    def has_available(self) -> bool:
        return self.avail_idx() != self.next_avail

    def pop(self) -> Chain | None:
        """The next available chain, or None.  Raises QueueError on a bad ring."""
        mem = self._mem()
        avail = _U16.unpack_from(self._avail, 2)[0]
        pending = (avail - self.next_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise QueueError(f"avail->idx {avail} is {pending} ahead of us on a "
                             f"{self.size}-entry ring")
        slot = self.next_avail & (self.size - 1)
        head = _U16.unpack_from(self._avail, RING_HEADER + 2 * slot)[0]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        self._publish_avail_event()
        return self._walk(mem, head)

    def unpop(self, count: int) -> None:
        """Give back the last `count` chains popped and not yet used, so that a
        device short of buffers can retry them later (QEMU's virtqueue_unpop).

        avail_event is left where the pops put it, at the driver's index: a
        device that gives chains back is waiting for more, so the driver must
        kick on its next addition.  Rewinding avail_event as well would ask
        for a kick at an index the driver has already passed: none would come.
        """
        self.next_avail = (self.next_avail - count) & 0xFFFF

    def _publish_avail_event(self) -> None:
        if self.event_idx:
            # 2.7.10: tell the driver which avail index to notify us at.
            _U16.pack_into(self._used, self._avail_event_at, self.next_avail)

    def _walk(self, mem: GuestMemory, head: int) -> Chain:
        table, count = self._desc, self.size
        index, seen, total = head, 0, 0
        # Views of the buffers, made while checking them: the cursors' whole
        # cost of reaching guest RAM.  Device-readable ones come first (2.7.4.2),
        # so one index splits them from the device-writable ones.
        views: list[memoryview] = []
        view_of = mem.view
        readable: tuple[int, int, int] | None = None   # (views, bytes, buffers) before
        in_indirect = False                            # the first writable buffer
        while True:
            seen += 1
            if seen > count:
                raise QueueError("descriptor chain is longer than its table: a loop")
            if index >= count:
                raise QueueError(f"descriptor index {index} is outside a {count}-entry table")
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # Only as the chain's one descriptor in the ring's table (2.7.5.3.1):
                # the indirect table's then counts from 0, so `seen` counts buffers.
                if not self.indirect or in_indirect or seen > 1:
                    raise QueueError("indirect descriptor where none is allowed")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError("an indirect descriptor must not have NEXT set")
                if length == 0 or length % DESC_SIZE:
                    raise QueueError(f"indirect table length {length} is not a multiple of 16")
                if length // DESC_SIZE > self.size:
                    # 2.7.5.3.1: no chain longer than the queue size, indirect ones included.
                    raise QueueError(f"indirect table of {length // DESC_SIZE} descriptors on "
                                     f"a {self.size}-entry queue")
                if not mem.contains(addr, length):
                    raise QueueError(f"indirect table at {addr:#x}+{length} is outside guest RAM")
                table, count = mem.view(addr, length), length // DESC_SIZE
                index, seen, in_indirect = 0, 0, True
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                if readable is None:
                    readable = len(views), total, seen - 1
            elif readable is not None:
                raise QueueError("a device-readable buffer follows a device-writable one")
            try:
                view = view_of(addr, length)    # an empty buffer must be in RAM too
            except GuestMemoryError:
                raise QueueError(f"buffer {addr:#x}+{length:#x} is outside guest RAM") \
                    from None
            if flags & VIRTQ_DESC_F_WRITE and mem.device_dirty is not None:
                mem.mark_dirty(addr, length)          # for Diff snapshots
            if length:
                views.append(view)
            total += length
            if total >= MAX_CHAIN_BYTES:
                raise QueueError("descriptor chain is longer than 4 GiB")
            if not flags & VIRTQ_DESC_F_NEXT:
                split, readable_bytes, readable_buffers = \
                    (len(views), total, seen) if readable is None else readable
                return _new_tuple(Chain, (head, views, split, readable_bytes, total,
                                          readable_buffers, seen - readable_buffers))
            index = nxt

    # -- the used ring -----------------------------------------------------------

    def push_used(self, head: int, written: int) -> None:
        """Return a chain to the driver, `written` bytes filled in."""
        self._mem()
        slot = self.next_used & (self.size - 1)
        _USED_ELEM.pack_into(self._used, RING_HEADER + USED_ELEM_SIZE * slot, head,
                             written & 0xFFFFFFFF)
        self.next_used = (self.next_used + 1) & 0xFFFF
        # x86 keeps stores in order: the element is visible before the index.
        _U16.pack_into(self._used, 2, self.next_used)
        if self.memory is not None and self.memory.device_dirty is not None:
            self.memory.mark_dirty(self.used_addr, len(self._used))     # Diff snapshots

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what we just used (2.7.7, 2.7.10)."""
        self._mem()
        lib.pv_mb()           # our used->idx store must be visible before we read its flags
        if not self.event_idx:
            return not _U16.unpack_from(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
        used_event = _U16.unpack_from(self._avail, self._used_event_at)[0]
        old, new = self._signalled_used, self.next_used
        self._signalled_used = new
        if old is None:
            return True       # nothing signalled since activation: always interrupt once
        # vring_need_event(): did used_event fall in [old, new)?
        return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF

"""Descriptor chains and the cursors devices read and write them through
(rust-vmm virtio-queue's DescriptorChain, Reader and Writer).

A chain's device-readable descriptors form one byte stream and its
device-writable ones another (2.7.4.2: readable ones always come first).
Devices ask a cursor for "the next 16 bytes" or "write this", and never add
up descriptor offsets themselves: 2.6.4 says a device must not assume how the
driver split a request into descriptors, and the bounds are checked here,
once.  Views are memoryviews of guest RAM, so preadv/pwritev/writev move data
between guest buffers and files with no copy in Python.
"""
from __future__ import annotations

import struct
from typing import NamedTuple, TypeVar

from pyvmm.errors import PyvmmError


class QueueError(PyvmmError):
    """The driver broke a virtqueue rule; the device must be reset."""


class ChainTooShort(QueueError):
    """A request needs more bytes than the driver's buffers hold."""


class Chain(NamedTuple):
    """One request, as the queue found it checking each buffer against guest RAM:
    views of its non-empty buffers, the first `split` of them (`readable_bytes`
    in all) device-readable and the rest device-writable, and how many buffers
    (empty ones too) each direction has.  Devices use the cursors, not the views."""
    head: int
    views: list[memoryview]
    split: int
    readable_bytes: int
    total_bytes: int
    readable_buffers: int
    writable_buffers: int

    def reader(self) -> "Reader":
        """A cursor over the device-readable bytes, in order."""
        return Reader(self.views[:self.split], self.readable_bytes)

    def writer(self) -> "Writer":
        """A cursor over the device-writable bytes, in order."""
        return Writer(self.views[self.split:], self.total_bytes - self.readable_bytes)


CursorT = TypeVar("CursorT", bound="_Cursor")


class _Cursor:
    """A position in a sequence of guest buffers; what is behind it is consumed.
    Requests are a handful of buffers, read or written a few times each: the
    common cases (the whole rest, the start of the current buffer) take no loop."""

    __slots__ = ("_views", "_next", "_left", "_length")
    direction = "buffer"

    def __init__(self, views: list[memoryview], length: int | None = None) -> None:
        self._views = views             # owned: the front one is sliced as it is consumed
        self._next = 0                  # the first view not wholly consumed
        self._left = self._length = sum(map(len, views)) if length is None else length

    def available_bytes(self) -> int:
        return self._left

    def views(self, count: int | None = None) -> list[memoryview]:
        """Consume the next `count` bytes (all that are left by default) and return
        them as views of guest RAM, for preadv/pwritev/writev."""
        if count is None or count == self._left:
            rest = self._views[self._next:]
            self._next = len(self._views)
            self._left = 0
            return rest
        return self._take(count)

    def skip(self, count: int) -> None:
        self._take(count)

    def split_at(self: CursorT, offset: int) -> CursorT:
        """Keep the next `offset` bytes; return a cursor over the rest (rust-vmm's
        split_at: e.g. virtio-blk's status byte, the last writable one)."""
        if not 0 <= offset <= self._left:
            raise self._short(offset)
        views, rest_length = self._views, self._left - offset
        if views and rest_length == len(views[-1]):     # the rest is the last buffer
            self._views, self._next = views[self._next:-1], 0
            self._length -= rest_length
            self._left = offset
            return type(self)(views[-1:], rest_length)
        index, inside = self._next, offset
        while index < len(views) and inside >= len(views[index]):
            inside -= len(views[index])         # whole buffers stay on our side
            index += 1
        if inside:                              # the split falls inside views[index]
            view = views[index]
            kept, rest = views[self._next:index] + [view[:inside]], \
                [view[inside:]] + views[index + 1:]
        else:
            kept, rest = views[self._next:index], views[index:]
        self._views, self._next, self._left = kept, 0, offset
        self._length -= rest_length
        return type(self)(rest, rest_length)

    def _front(self, count: int) -> memoryview | None:
        """The next `count` bytes as one view, consumed, if one buffer holds them."""
        if self._next < len(self._views):
            view = self._views[self._next]
            if len(view) == count:              # a whole buffer: a header, a status byte
                self._next += 1
                self._left -= count
                return view
            if len(view) > count:
                self._views[self._next] = view[count:]
                self._left -= count
                return view[:count]
        return None

    def _short(self, count: int) -> ChainTooShort:
        return ChainTooShort(f"the request needs {count} more {self.direction} bytes "
                             f"and the driver's buffers hold {self._left}")

    def _take(self, count: int) -> list[memoryview]:
        if count > self._left or count < 0:
            raise self._short(count)
        views, index = self._views, self._next
        taken: list[memoryview] = []
        wanted = count
        while wanted:
            view = views[index]
            if len(view) > wanted:
                taken.append(view[:wanted])
                views[index] = view[wanted:]
                break
            taken.append(view)
            wanted -= len(view)
            index += 1
        self._next = index
        self._left -= count
        return taken


class Reader(_Cursor):
    """The device-readable part of a chain (rust-vmm's Reader)."""

    __slots__ = ()
    direction = "device-readable"

    def read(self, count: int) -> bytes:
        front = self._front(count)
        if front is not None:
            return bytes(front)
        return b"".join(self._take(count))

    def read_obj(self, layout: struct.Struct) -> tuple:
        front = self._front(layout.size)
        if front is not None:
            return layout.unpack(front)
        return layout.unpack(b"".join(self._take(layout.size)))

    @property
    def bytes_read(self) -> int:
        return self._length - self._left


class Writer(_Cursor):
    """The device-writable part of a chain (rust-vmm's Writer)."""

    __slots__ = ()
    direction = "device-writable"

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of `data`; ChainTooShort (and nothing written) if it does not fit."""
        front = self._front(len(data))
        if front is not None:
            front[:] = data
            return
        source, start = memoryview(data), 0      # slices of a view copy nothing
        for view in self._take(len(data)):
            view[:] = source[start:start + len(view)]
            start += len(view)

    def write_obj(self, layout: struct.Struct, *values: object) -> None:
        front = self._front(layout.size)
        if front is not None:
            layout.pack_into(front, 0, *values)
            return
        self.write(layout.pack(*values))

    @property
    def bytes_written(self) -> int:
        return self._length - self._left

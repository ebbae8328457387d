"""An asynchronous disk engine on io_uring (Firecracker's io_engine "Async"), apart
from any front end: the mechanism is csrc/uring.c (liburing, through our cffi
extension), the policy is here.

A request is queued with readv()/writev()/fdatasync() and an opaque `request`
object (the front end's); its tag in the ring is a slot number, so completions
may come in any order and reap() gives each back with its result (bytes moved,
or -errno).  Queued requests go to the kernel at submit(): one io_uring_enter
for a whole batch.  The kernel signals completions on `eventfd` (registered
with io_uring_register_eventfd), which the I/O thread watches.

Budgets: at most `entries` requests are in flight (`free` says how many more
may be queued), the ring has that many SQEs, so queuing never fails for want of
one; the iovecs of queued requests share one array of IOV_POOL entries,
allocated once, reused after each submit (the kernel has copied them by then:
IORING_FEAT_SUBMIT_STABLE).  The iovecs are made from memoryviews with
ffi.from_buffer, never from a number: for virtio-blk they are views of guest
RAM that the virtqueue code checked.

Waiting (drain()) polls the eventfd and reads completions from the shared CQ
ring: no io_uring_enter, so the threads that drain (a vCPU resetting the
device, the API thread closing it) need no io_uring call in their seccomp
filter.  Only submit() enters the kernel, on the I/O thread.

The requests themselves run in the kernel, in io_uring's io-wq worker threads
when they cannot complete inline.  Those are not subject to our seccomp filters
(a filter applies to the threads that installed it).  That is acceptable, and
Firecracker has the same property: the only operations pyvmm ever queues are
readv, writev and fdatasync on the disk image's fd, into and out of guest RAM,
which the I/O thread could do itself with preadv/pwritev/fdatasync.
"""
from __future__ import annotations

import errno
import os
import select
import time
from typing import Any, Sequence

from pyvmm.errors import PyvmmError
from pyvmm.kvm import ffi, lib

IOV_POOL = 1024                 # iovecs of the requests queued between two submits
POLL_SLICE_MS = 10              # drain() re-reads the CQ at least this often


class UringUnavailable(PyvmmError):
    """io_uring cannot be set up on this host (or for this process)."""


def _why(err: int) -> str:
    if err == errno.ENOSYS:
        return "this kernel has no io_uring (or lacks IORING_FEAT_SUBMIT_STABLE, 5.5+)"
    if err == errno.EPERM:
        return ("io_uring is not allowed here (kernel.io_uring_disabled, or a seccomp "
                "filter or container policy)")
    return f"io_uring_setup failed: {os.strerror(err)}"


class Uring:
    """One ring and its eventfd; see the module docstring.  Not thread-safe: the
    front end calls it under its own lock."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        error = ffi.new("int *")
        ring = lib.pv_uring_open(entries, self.eventfd, error)
        if ring == ffi.NULL:
            os.close(self.eventfd)
            raise UringUnavailable(_why(error[0]))
        self._ring = ring
        self._iov = ffi.new("struct pv_iovec[]", IOV_POOL)
        self._iov_used = 0
        self._buffers: list[Any] = []   # from_buffer() cdata of queued iovecs, until submit
        self._tags = ffi.new("uint64_t[]", entries)
        self._results = ffi.new("int32_t[]", entries)
        self._requests: list[Any] = [None] * entries        # by tag
        self._free = list(range(entries - 1, -1, -1))        # tags not in flight
        self._poll = select.poll()
        self._poll.register(self.eventfd, select.POLLIN)
        self.broken: str | None = None   # why submit() failed; nothing more is queued

    @property
    def in_flight(self) -> int:
        """Requests queued or submitted whose completion has not been reaped."""
        return self.entries - len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    # -- queuing ------------------------------------------------------------------

    def readv(self, fd: int, views: Sequence[memoryview], offset: int, request: Any) -> None:
        self._rw(lib.pv_uring_readv, fd, views, offset, request)

    def writev(self, fd: int, views: Sequence[memoryview], offset: int, request: Any) -> None:
        self._rw(lib.pv_uring_writev, fd, views, offset, request)

    def fdatasync(self, fd: int, request: Any) -> None:
        self._check(lib.pv_uring_fdatasync(self._ring, fd, self._take(request)))

    def _rw(self, prep: Any, fd: int, views: Sequence[memoryview], offset: int,
            request: Any) -> None:
        count = len(views)
        if not 0 < count <= IOV_POOL:
            raise ValueError(f"{count} buffers: a request has 1 to {IOV_POOL}")
        if self._iov_used + count > IOV_POOL:
            self.submit()                       # frees the iovec array
        first = self._iov_used
        iov, buffers = self._iov, self._buffers
        for index, view in enumerate(views, first):
            pointer = ffi.from_buffer(view)
            buffers.append(pointer)
            iov[index].base = pointer
            iov[index].len = len(view)
        self._iov_used = first + count
        self._check(prep(self._ring, fd, iov + first, count, offset, self._take(request)))

    def _take(self, request: Any) -> int:
        if self.broken is not None:
            raise OSError(errno.EIO, f"io_uring: {self.broken}")
        if not self._free:
            raise RuntimeError("io_uring: more requests than the ring has entries")
        tag = self._free.pop()
        self._requests[tag] = request
        return tag

    @staticmethod
    def _check(ret: int) -> None:
        if ret < 0:         # no SQE: the budget above makes it impossible
            raise RuntimeError(f"io_uring: cannot queue a request: {os.strerror(-ret)}")

    def submit(self) -> None:
        """Hand every queued request to the kernel.  OSError if it would not take
        them all (then the engine is broken: nothing more is queued, and those
        requests stay in flight, never to complete; the front end fails)."""
        if self._iov_used == 0 and lib.pv_uring_unsubmitted(self._ring) == 0:
            return
        ret = lib.pv_uring_submit(self._ring)
        if ret < 0:
            self.broken = f"submitting failed: {os.strerror(-ret)}"
            raise OSError(-ret, f"io_uring: {self.broken}")
        self._iov_used = 0
        self._buffers.clear()

    # -- completions --------------------------------------------------------------

    def reap(self) -> list[tuple[Any, int]]:
        """The requests that completed since the last reap, with their results (bytes
        moved, or -errno), in completion order.  No system call."""
        count = lib.pv_uring_reap(self._ring, self._tags, self._results, self.entries)
        done = []
        for index in range(count):
            tag = self._tags[index]
            if tag >= self.entries or self._requests[tag] is None:
                continue            # cannot happen: tags are ours; ignore rather than crash
            done.append((self._requests[tag], self._results[index]))
            self._requests[tag] = None
            self._free.append(tag)
        return done

    def clear_eventfd(self) -> None:
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass

    def drain(self, timeout: float) -> list[tuple[Any, int]]:
        """Wait up to timeout seconds for every submitted request; returns the
        completions reaped meanwhile (check in_flight for what is left)."""
        done = self.reap()
        deadline = time.monotonic() + timeout
        while self._submitted_in_flight():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # The I/O thread may read the eventfd first: a wake-up lost that way costs
            # one slice, not the wait.
            self._poll.poll(min(POLL_SLICE_MS, max(1, int(left * 1000))))
            self.clear_eventfd()
            done += self.reap()
        return done

    def _submitted_in_flight(self) -> bool:
        # After a failed submit the unsubmitted requests never complete: not waited for.
        return self.in_flight > (lib.pv_uring_unsubmitted(self._ring) if self.broken else 0)

    def close(self) -> bool:
        """Release the ring and the eventfd; False, and the ring kept (a bounded leak),
        if requests are still in flight: the kernel could still be moving their data
        into memory the caller is about to free.  The caller drains first."""
        if self._ring == ffi.NULL:
            return True
        if self._submitted_in_flight():
            return False
        lib.pv_uring_close(self._ring)
        self._ring = ffi.NULL
        self._buffers.clear()
        os.close(self.eventfd)
        self.eventfd = -1
        return True

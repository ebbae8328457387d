"""virtio-blk (virtio 1.2, section 5.2), the front end of a disk backend
(pyvmm.devices.disk.RawDisk).

A request is parsed through the chain's cursors: a 16-byte header from the
device-readable bytes, the status byte as the last device-writable byte
(5.2.6), and the data in between handed to the backend as views of guest
RAM, so preadv/pwritev move it with no copy in Python.

DISCARD and WRITE_ZEROES are held to the limits the config space advertises
(5.2.4): one segment per request, read through the cursor, and at most
MAX_DISCARD_SECTORS / MAX_WRITE_ZEROES_SECTORS sectors in it; the backend
zeroes with fallocate or from a small fixed buffer.  A request's own Python
memory is its 16-byte header and segment, whatever the guest asks.

A rate limiter (pyvmm.devices.rate_limiter, Firecracker's) may stand in front
of the queue: each request costs one op, and reads and writes their data
length in bytes; a request over budget goes back to the ring untouched and the
queue waits for the limiter's timer.

io_engine "Async" (Firecracker's) moves reads, writes and flushes to io_uring
(pyvmm.devices.uring): they are submitted in a batch per slice and complete out
of order; each completion writes the status byte and returns the chain, one
interrupt per batch.  The limiter charges at submission.  GET_ID, DISCARD,
WRITE_ZEROES and the requests refused up front are answered at once, as with
Sync (the discard and zeroing policy, fallocate modes then writes, stays
synchronous: rare requests, a sequence of attempts).  At most QUEUE_SIZE
requests are in flight (the ring's size); a guest that makes more available
waits for completions, which serve the queue again.  Pausing the VM drains
what is in flight (drain()), save() refuses while anything is, and a reset or
close waits for it first: no request outlives the state it belongs to.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from pyvmm.devices.disk import SECTOR_SIZE, RawDisk
from pyvmm.devices.rate_limiter import OPS_ONLY, UNLIMITED, RateLimited, serve_limited
from pyvmm.devices.disk import DiskError as DiskError    # what Block() raises for a bad image
from pyvmm.devices.virtio.chain import Chain, QueueError, Reader, Writer
from pyvmm.devices.virtio.device import CHAINS_PER_SLICE, MAX_CONFIG_SIZE, VirtioDevice
from pyvmm.devices.virtio.state import StateError, StateReader

if TYPE_CHECKING:
    from pyvmm.config import RateLimiterConfig
    from pyvmm.devices.uring import Uring

DEVICE_ID_BLOCK = 2
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2               # data segments per request, beside header and status
ID_BYTES = 20                          # 5.2.6.1: GET_ID answers a 20-byte serial

# Feature bits (5.2.3)
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types and status (5.2.6)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
HEADER = struct.Struct("<IIQ")          # struct virtio_blk_req: type, reserved, sector
STATUS = struct.Struct("<B")            # the u8 status, the last device-writable byte
SEGMENT = struct.Struct("<QII")         # discard/write-zeroes: sector, num_sectors, flags
F_UNMAP = 1                             # the segment's flags: unmap (write zeroes only)
# What the config space advertises (5.2.4), and what requests are held to.
MAX_DISCARD_SECTORS = 1 << 22           # 2 GiB: punching a hole is metadata work
MAX_DISCARD_SEGMENTS = 1                # as QEMU: no user API sends more
DISCARD_SECTOR_ALIGNMENT = 1
MAX_WRITE_ZEROES_SECTORS = 1 << 16      # 32 MiB: at most 512 writes where fallocate fails
MAX_WRITE_ZEROES_SEGMENTS = 1
IO_ENGINES = ("Sync", "Async")
# How long in-flight Async requests are waited for: pausing (the I/O thread's own
# pause() gives up at 5 s), and a reset or close (the guest's buffers must not be
# written once the driver has them back).
PAUSE_DRAIN_SECONDS = 4.0
RESET_DRAIN_SECONDS = 30.0


class RequestError(Exception):
    """A well-formed chain carrying a request we answer with an error status."""

    def __init__(self, status: int) -> None:
        self.status = status


class Block(VirtioDevice, RateLimited):
    device_id = DEVICE_ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)
    name = "virtio-blk"

    def __init__(self, path: Path, read_only: bool = False, serial: str = "",
                 rate_limiter: "RateLimiterConfig | None" = None, flush: bool = True,
                 io_engine: str = "Sync") -> None:
        """flush: offer VIRTIO_BLK_F_FLUSH (a drive's cache_type Writeback; Firecracker's
        Unsafe offers no flush, so the guest never asks for one)."""
        super().__init__()
        self.init_limiters({"rate_limiter": (rate_limiter, 0)})
        self.read_only = read_only
        self.serial = serial.encode()[:ID_BYTES]
        self.disk = RawDisk(path, read_only)
        self.io_engine = io_engine
        self.engine: "Uring | None" = self._open_engine(io_engine) if io_engine != "Sync" \
            else None
        self._generation = 0        # bumped by reset(): older completions are dropped
        self._starved = False       # the ring was full: completions serve the queue again
        self.features |= (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE)
        if flush:
            self.features |= 1 << VIRTIO_BLK_F_FLUSH
        if read_only:
            self.features |= 1 << VIRTIO_BLK_F_RO
        else:
            self.features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        self.stats.update(bytes_discarded=0, bytes_zeroed=0)
        self.config = self._build_config()

    def _build_config(self) -> bytearray:
        # struct virtio_blk_config (5.2.4), fields up to write_zeroes_may_unmap.
        config = bytearray(60)
        struct.pack_into("<Q", config, 0, self.disk.size // SECTOR_SIZE)   # capacity
        struct.pack_into("<I", config, 12, SEG_MAX)                         # seg_max
        struct.pack_into("<I", config, 20, SECTOR_SIZE)                     # blk_size
        struct.pack_into("<III", config, 36, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS,
                         DISCARD_SECTOR_ALIGNMENT)
        struct.pack_into("<II", config, 48, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEGMENTS)
        config[56] = 1                                      # write_zeroes_may_unmap
        return config

    def _open_engine(self, io_engine: str) -> "Uring":
        """The io_uring of io_engine "Async"; DiskError, in one line naming the drive,
        if the host cannot give us one (the image is closed again)."""
        from pyvmm.devices.uring import Uring, UringUnavailable
        try:
            if io_engine not in IO_ENGINES:
                raise UringUnavailable(f"io_engine must be {' or '.join(IO_ENGINES)}")
            return Uring(QUEUE_SIZE)        # the queue's size: never short of an SQE
        except UringUnavailable as exc:
            self.disk.close()
            drive = self.serial.decode(errors="replace") or str(self.disk.path)
            raise DiskError(f'drive {drive}: io_engine "Async" cannot be used: {exc}; '
                            f'use io_engine "Sync"') from None

    def replace_backing(self, path: Path) -> None:
        """Swap the image (Firecracker's PATCH /drives), between requests: new
        capacity, config interrupt.  DiskError, and the old image kept, if the new
        one cannot be used."""
        with self.lock:
            if not self._drain(PAUSE_DRAIN_SECONDS):
                raise DiskError(f"{self.engine.in_flight if self.engine else 0} requests "
                                f"to {self.disk.path} are still in flight: try again")
            self.disk.replace(path)
            self.config[:] = self._build_config()
            self.config_changed()

    def close(self) -> None:
        if self.engine is not None:
            with self.lock:
                self._drain(RESET_DRAIN_SECONDS, push=False)
                if not self.engine.close():
                    # Guest RAM could still be written: keep the ring (and its memory
                    # pinned by the kernel) rather than free it under a request.
                    self.record_failure(f"close: {self.engine.in_flight} io_uring requests "
                                        f"still in flight; the ring is left open")
        self.disk.close()
        self.close_limiters()

    def reset(self) -> None:
        """As VirtioDevice.reset, once no Async request is in flight: the driver gets
        its buffers back with the reset, and no completion may write them later."""
        with self.lock:
            if self.engine is not None:
                self._drain(RESET_DRAIN_SECONDS, push=False)
                if self.engine.in_flight:
                    self.record_failure(f"reset: {self.engine.in_flight} io_uring requests "
                                        f"did not complete in {RESET_DRAIN_SECONDS:.0f} s")
            self._generation += 1           # whatever completes late is dropped
            self._starved = False
            super().reset()

    def save(self) -> dict:
        """As VirtioDevice.save; refused while Async requests are in flight (pausing
        the VM drains them: a request still in flight after that is a stuck disk)."""
        with self.lock:
            if self.engine is not None and self.engine.in_flight:
                from pyvmm.snapshot.format import SnapshotError
                raise SnapshotError(f"{self.name} {self.serial.decode(errors='replace')}: "
                                    f"{self.engine.in_flight} io_uring requests are still in "
                                    f"flight; pause the VM again (it drains them) and retry")
            return super().save()

    def restore(self, state: object) -> None:
        """As VirtioDevice.restore; the saved config space (the capacity) must be
        this image's, or the guest would see a disk of the wrong size."""
        saved = StateReader(state, f"{self.name} state").blob("config", MAX_CONFIG_SIZE)
        if saved != self.config:
            raise StateError(f"the saved {self.name} config space does not match disk "
                             f"image {self.disk.path} ({self.disk.size // SECTOR_SIZE} "
                             f"sectors): restore onto the image the snapshot was taken with")
        super().restore(state)

    # -- requests ----------------------------------------------------------------

    def process_queue(self, index: int) -> bool:
        limiter = self.limiters["rate_limiter"][0]
        if self.engine is None:
            return serve_limited(self, self.queues[index], limiter, CHAINS_PER_SLICE,
                                 self._cost, self._serve) >= CHAINS_PER_SLICE
        budget = min(CHAINS_PER_SLICE, self.engine.free)
        try:
            served = serve_limited(self, self.queues[index], limiter, budget, self._cost,
                                   self._serve) if budget else 0
        finally:
            self.engine.submit()        # the batch, also what was queued before a raise
        if budget < CHAINS_PER_SLICE and served == budget:
            self._starved = True        # the ring is full: engine_ready() serves on
            return False
        return served >= CHAINS_PER_SLICE

    # -- Async completions -----------------------------------------------------------

    def engine_ready(self) -> None:
        """The ring's eventfd fired (I/O thread): return the completed requests, one
        interrupt for the batch, and serve the queue again if the ring had been full."""
        with self.lock:
            if self.engine is None:
                return
            self._finish(self.engine.reap())
            resume = self._starved and self.serving and self.queues[0].memory is not None
            self._starved = False
        if resume:
            self._resume(0)

    def drain(self, timeout: float = PAUSE_DRAIN_SECONDS) -> bool:
        """Complete what is in flight, waiting up to timeout (the I/O thread, before it
        parks for a pause); True if nothing is left.  A queue that had filled the ring
        is served again after the pause (the eventfd is left signalled for it)."""
        with self.lock:
            drained = self._drain(timeout)
            if self._starved and self.engine is not None:
                os.eventfd_write(self.engine.eventfd, 1)
            return drained

    def _drain(self, timeout: float, push: bool = True) -> bool:
        if self.engine is None:
            return True
        done = self.engine.drain(timeout)
        if push:
            self._finish(done)
        return not self.engine.in_flight

    def _finish(self, done: list) -> None:
        """Status byte and used element for each completion (bytes moved, or -errno);
        one interrupt for them all.  Completions from before a reset are dropped."""
        queue, pushed = self.queues[0], 0
        active = queue.memory is not None
        for (generation, head, status_byte, rtype, length), result in done:
            ok = result >= 0 if rtype == T_FLUSH else result == length
            if not ok:
                self.stats["errors"] += 1   # -errno, or a short read/write
            elif rtype == T_IN:
                self.stats["bytes_read"] += length
            elif rtype == T_OUT:
                self.stats["bytes_written"] += length
            if not active or generation != self._generation:
                continue
            status_byte.write_obj(STATUS, S_OK if ok else S_IOERR)
            queue.push_used(head, (length if ok and rtype == T_IN else 0) + STATUS.size)
            pushed += 1
        if pushed and self.interrupt is not None:
            self.interrupt.signal_used(queue)

    def _submit(self, rtype: int, sector: int, request: Reader, reply: Writer,
                head: int, status_byte: Writer) -> bool:
        """Queue a read, write or flush on the ring; False for a request answered at
        once (_dispatch).  Checked as the Sync path checks it; RequestError if refused."""
        engine = self.engine
        assert engine is not None
        if rtype == T_IN and reply.available_bytes():
            if request.available_bytes():
                raise RequestError(S_IOERR)   # data for us to read: not a read request
            length = reply.available_bytes()
            offset = self._check_range(sector, length)
            engine.readv(self.disk.fd, reply.views(),
                         offset, (self._generation, head, status_byte, T_IN, length))
            return True
        if rtype == T_OUT and request.available_bytes():
            if reply.available_bytes() or self.read_only:
                raise RequestError(S_IOERR)
            length = request.available_bytes()
            offset = self._check_range(sector, length)
            engine.writev(self.disk.fd, request.views(),
                          offset, (self._generation, head, status_byte, T_OUT, length))
            return True
        if rtype == T_FLUSH and not self.read_only:
            engine.fdatasync(self.disk.fd, (self._generation, head, status_byte, T_FLUSH, 0))
            return True
        return False

    @staticmethod
    def _cost(chain: Chain) -> int:
        """What a request costs the limiter in bytes (Firecracker's: the data of a
        read or write; other requests take only an op).  A chain too short for a
        header and status is not charged: _serve() fails the device for it."""
        writable = chain.total_bytes - chain.readable_bytes
        if chain.readable_bytes < HEADER.size or writable < STATUS.size:
            return UNLIMITED
        rtype = chain.reader().read_obj(HEADER)[0]
        if rtype == T_IN:
            return writable - STATUS.size
        if rtype == T_OUT:
            return chain.readable_bytes - HEADER.size
        return OPS_ONLY

    def _serve(self, chain: Chain) -> int | None:
        """Handles one request; returns the bytes written into guest buffers, or
        None if it went to the Async engine (its completion returns the chain)."""
        request, reply = chain.reader(), chain.writer()
        if request.available_bytes() < HEADER.size:
            raise QueueError("virtio-blk request without a readable 16-byte header")
        data_length = reply.available_bytes() - STATUS.size
        if data_length < 0:
            raise QueueError("virtio-blk request without a writable status byte")
        rtype, _, sector = request.read_obj(HEADER)
        status_byte = reply.split_at(data_length)
        status, written = S_OK, 0
        self.stats["requests"] += 1
        try:
            if self.engine is not None and \
                    self._submit(rtype, sector, request, reply, chain.head, status_byte):
                return None
            written = self._dispatch(rtype, sector, request, reply)
        except RequestError as exc:
            status = exc.status
        except OSError:
            status = S_IOERR
        if status != S_OK:
            self.stats["errors"] += 1
        status_byte.write_obj(STATUS, status)
        return written + STATUS.size

    def _dispatch(self, rtype: int, sector: int, request: Reader, reply: Writer) -> int:
        """Carries out a request whose data is `request` (after the header) or
        `reply` (before the status byte); returns the bytes written into reply."""
        if rtype == T_IN:
            return self._read(sector, request, reply)
        if rtype == T_OUT:
            self._write(sector, request, reply)
            return 0
        if rtype == T_FLUSH:
            self.disk.flush()
            return 0
        if rtype == T_GET_ID:
            return self._get_id(reply)
        if rtype == T_DISCARD and not self.read_only:
            self._discard(request)
            return 0
        if rtype == T_WRITE_ZEROES and not self.read_only:
            self._write_zeroes(request)
            return 0
        raise RequestError(S_UNSUPP if rtype not in (T_DISCARD, T_WRITE_ZEROES) else S_IOERR)

    def _read(self, sector: int, request: Reader, reply: Writer) -> int:
        if request.available_bytes():
            raise RequestError(S_IOERR)       # data for us to read: not a read request
        length = reply.available_bytes()
        offset = self._check_range(sector, length)
        if self.disk.read_into(reply.views(), offset) != length:
            raise RequestError(S_IOERR)
        self.stats["bytes_read"] += length
        return length

    def _write(self, sector: int, request: Reader, reply: Writer) -> None:
        if reply.available_bytes():
            raise RequestError(S_IOERR)       # room for data to us: not a write request
        length = request.available_bytes()
        offset = self._check_range(sector, length)
        if self.read_only or self.disk.write_from(request.views(), offset) != length:
            raise RequestError(S_IOERR)
        self.stats["bytes_written"] += length

    def _get_id(self, reply: Writer) -> int:
        if not reply.available_bytes():
            raise RequestError(S_IOERR)
        ident = self.serial.ljust(ID_BYTES, b"\0")[:min(ID_BYTES, reply.available_bytes())]
        reply.write(ident)
        return len(ident)

    def _check_range(self, sector: int, length: int) -> int:
        offset = sector * SECTOR_SIZE
        if length % SECTOR_SIZE or offset + length > self.disk.size:
            raise RequestError(S_IOERR)
        return offset

    def _discard(self, request: Reader) -> None:
        for offset, length, flags in self._segments(request, MAX_DISCARD_SEGMENTS,
                                                    MAX_DISCARD_SECTORS):
            if flags & F_UNMAP:
                raise RequestError(S_UNSUPP)  # 5.2.6.2: unmap is for write zeroes only
            self.disk.discard(offset, length)
            self.stats["bytes_discarded"] += length

    def _write_zeroes(self, request: Reader) -> None:
        for offset, length, flags in self._segments(request, MAX_WRITE_ZEROES_SEGMENTS,
                                                    MAX_WRITE_ZEROES_SECTORS):
            self.disk.write_zeroes(offset, length, unmap=bool(flags & F_UNMAP))
            self.stats["bytes_zeroed"] += length

    def _segments(self, request: Reader, max_segments: int,
                  max_sectors: int) -> Iterator[tuple[int, int, int]]:
        """The request's segments as (offset, length, flags) in bytes, one at a time,
        each checked against the limits the config space advertises."""
        data = request.available_bytes()
        if not data or data % SEGMENT.size:
            raise RequestError(S_IOERR)
        if data // SEGMENT.size > max_segments:
            raise RequestError(S_UNSUPP)      # more segments than max_*_seg: as QEMU
        for _ in range(data // SEGMENT.size):
            sector, count, flags = request.read_obj(SEGMENT)
            if flags & ~F_UNMAP:
                raise RequestError(S_UNSUPP)  # reserved flag bits
            if count > max_sectors:
                raise RequestError(S_IOERR)
            length = count * SECTOR_SIZE
            yield self._check_range(sector, length), length, flags

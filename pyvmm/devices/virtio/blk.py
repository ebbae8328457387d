"""virtio-blk on a raw image file (virtio 1.2, section 5.2).

Data moves with preadv/pwritev straight between the file and guest RAM (views
of the memfd mapping), so a request costs no copy in Python.
"""
from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

from pyvmm.devices.virtio.mmio import VirtioDevice
from pyvmm.devices.virtio.queue import Chain, Descriptor, QueueError
from pyvmm.errors import PyvmmError

DEVICE_ID_BLOCK = 2
SECTOR_SIZE = 512
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
HEADER = struct.Struct("<IIQ")          # type, reserved, sector
SEGMENT = struct.Struct("<QII")         # discard/write-zeroes: sector, num_sectors, flags
MAX_DISCARD_SECTORS = 1 << 22           # 2 GiB per request
MAX_DISCARD_SEGMENTS = 1

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


class DiskError(PyvmmError):
    """A disk image that cannot be opened as asked."""


class RequestError(Exception):
    """A well-formed chain carrying a request we answer with an error status."""

    def __init__(self, status: int) -> None:
        self.status = status


_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode: os.posix_fallocate cannot punch holes."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Block(VirtioDevice):
    device_id = DEVICE_ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)
    name = "virtio-blk"

    def __init__(self, path: Path, read_only: bool = False, serial: str = "") -> None:
        super().__init__()
        self.read_only = read_only
        self.serial = serial.encode()[:ID_BYTES]
        self.fd = -1
        self.path = path
        self._open(path)
        self.features |= (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_FLUSH) | \
            (1 << VIRTIO_BLK_F_BLK_SIZE)
        if read_only:
            self.features |= 1 << VIRTIO_BLK_F_RO
        else:
            self.features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        self._build_config()

    def _open(self, path: Path) -> None:
        try:
            fd = os.open(path, (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError(f"cannot open disk image {path}: {exc.strerror}") from None
        size = os.fstat(fd).st_size
        if size % SECTOR_SIZE:
            os.close(fd)
            raise DiskError(f"disk image {path} is {size} bytes, not a multiple of 512")
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.path, self.size = fd, path, size

    def _build_config(self) -> None:
        # struct virtio_blk_config (5.2.4), fields up to write_zeroes_may_unmap.
        config = bytearray(60)
        struct.pack_into("<Q", config, 0, self.size // SECTOR_SIZE)        # capacity
        struct.pack_into("<I", config, 12, SEG_MAX)                         # seg_max
        struct.pack_into("<I", config, 20, SECTOR_SIZE)                     # blk_size
        struct.pack_into("<III", config, 36, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, 1)
        struct.pack_into("<II", config, 48, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS)
        config[56] = 1                                                      # may unmap
        self.config = config

    def replace_backing(self, path: Path) -> None:
        """Swap the image (Firecracker's PATCH /drives): new capacity, config interrupt."""
        self._open(path)
        self._build_config()
        if self.transport:
            self.transport.config_changed()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- requests ----------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        queue = self.queues[index]
        served = 0
        while (chain := queue.pop()) is not None:
            queue.push_used(chain.head, self._serve(chain))
            served += 1
        if served:
            self.signal_used(queue)

    def _serve(self, chain: Chain) -> int:
        """Handles one request; returns the bytes written into guest buffers."""
        descs = chain.descriptors
        if len(descs) < 2 or descs[0].writable or descs[0].length < HEADER.size:
            raise QueueError("virtio-blk request without a readable 16-byte header")
        status_desc = descs[-1]
        if not status_desc.writable or status_desc.length < 1:
            raise QueueError("virtio-blk request without a writable status byte")
        memory = self.transport.memory
        rtype, _, sector = HEADER.unpack(memory.read(descs[0].addr, HEADER.size))
        data = list(descs[1:-1])
        status, written = S_OK, 0
        self.stats["requests"] += 1
        try:
            written = self._dispatch(rtype, sector, data)
        except RequestError as exc:
            status = exc.status
        except OSError:
            status = S_IOERR
        if status != S_OK:
            self.stats["errors"] += 1
        # The status byte is the last byte of the last descriptor (5.2.6).
        memory.write(status_desc.addr + status_desc.length - 1, bytes([status]))
        return written + 1

    def _dispatch(self, rtype: int, sector: int, data: list[Descriptor]) -> int:
        memory = self.transport.memory
        if rtype in (T_IN, T_OUT):
            if any(d.writable != (rtype == T_IN) for d in data):
                raise RequestError(S_IOERR)
            length = sum(d.length for d in data)
            offset = self._check_range(sector, length)
            views = [memory.view(d.addr, d.length) for d in data if d.length]
            if rtype == T_IN:
                done = os.preadv(self.fd, views, offset) if views else 0
                if done != length:
                    raise RequestError(S_IOERR)
                self.stats["bytes_read"] += done
                return done
            if self.read_only:
                raise RequestError(S_IOERR)
            done = os.pwritev(self.fd, views, offset) if views else 0
            if done != length:
                raise RequestError(S_IOERR)
            self.stats["bytes_written"] += done
            return 0
        if rtype == T_FLUSH:
            if not self.read_only:
                os.fdatasync(self.fd)
            return 0
        if rtype == T_GET_ID:
            target = next((d for d in data if d.writable), None)
            if target is None:
                raise RequestError(S_IOERR)
            ident = self.serial.ljust(ID_BYTES, b"\0")[:min(ID_BYTES, target.length)]
            memory.write(target.addr, ident)
            return len(ident)
        if rtype in (T_DISCARD, T_WRITE_ZEROES) and not self.read_only:
            self._discard_or_zero(rtype, data)
            return 0
        raise RequestError(S_UNSUPP if rtype not in (T_DISCARD, T_WRITE_ZEROES) else S_IOERR)

    def _check_range(self, sector: int, length: int) -> int:
        offset = sector * SECTOR_SIZE
        if length % SECTOR_SIZE or offset + length > self.size:
            raise RequestError(S_IOERR)
        return offset

    def _discard_or_zero(self, rtype: int, data: list[Descriptor]) -> None:
        memory = self.transport.memory
        blob = b"".join(memory.read(d.addr, d.length) for d in data if not d.writable)
        if not blob or len(blob) % SEGMENT.size:
            raise RequestError(S_IOERR)
        for i in range(0, len(blob), SEGMENT.size):
            sector, count, _flags = SEGMENT.unpack_from(blob, i)
            if count > MAX_DISCARD_SECTORS:
                raise RequestError(S_IOERR)
            offset = self._check_range(sector, count * SECTOR_SIZE)
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if rtype == T_DISCARD else \
                FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            try:
                _fallocate(self.fd, mode, offset, count * SECTOR_SIZE)
            except OSError:
                if rtype == T_DISCARD:
                    continue          # discard is advisory
                os.pwrite(self.fd, bytes(count * SECTOR_SIZE), offset)

"""Disk image backends, apart from any front end (kvmtool's disk/).

RawDisk is a raw image file.  Data moves with preadv/pwritev between the file
and the caller's memoryviews (views of guest RAM for virtio-blk), so a request
costs no copy in Python.  I/O goes through the host page cache, like QEMU's
cache=writeback; flush() makes it durable.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Sequence

from pyvmm.errors import PyvmmError

SECTOR_SIZE = 512                       # images are whole sectors: what a block device sees

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
ZERO_CHUNK = 1 << 20                    # the pwrite fallback writes zeroes this much at a time


class DiskError(PyvmmError):
    """A disk image that cannot be opened as asked."""


_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode: os.posix_fallocate cannot punch holes."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open_image(path: Path, read_only: bool) -> tuple[int, int]:
    """(fd, size) of an image that is whole sectors; DiskError otherwise."""
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as exc:
        raise DiskError(f"cannot open disk image {path}: {exc.strerror}") from None
    size = os.fstat(fd).st_size
    if size % SECTOR_SIZE:
        os.close(fd)
        raise DiskError(f"disk image {path} is {size} bytes, not a multiple of 512")
    return fd, size


class RawDisk:
    """A raw image file, read-only or read-write.  Offsets and lengths are in
    bytes; the front end checks them against `size`.  OSError means an I/O error."""

    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.read_only = read_only
        self.fd, self.size = _open_image(path, read_only)
        self.path = path

    def read_into(self, buffers: Sequence[memoryview], offset: int) -> int:
        """Fill buffers from the image at offset; returns the bytes read."""
        return os.preadv(self.fd, buffers, offset) if buffers else 0

    def write_from(self, buffers: Sequence[memoryview], offset: int) -> int:
        """Write buffers to the image at offset; returns the bytes written."""
        return os.pwritev(self.fd, buffers, offset) if buffers else 0

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Give the range's blocks back to the host; advisory, so where the file
        system cannot punch holes nothing happens."""
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError:
            pass

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero the range: fallocate where the file system can, else write zeroes."""
        try:
            _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError:
            pass
        end = offset + length
        while offset < end:
            offset += os.pwrite(self.fd, bytes(min(ZERO_CHUNK, end - offset)), offset)

    def replace(self, path: Path) -> None:
        """Switch to another image, same mode; on DiskError the old one stays."""
        fd, size = _open_image(path, self.read_only)
        self.close()
        self.fd, self.size, self.path = fd, size, path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

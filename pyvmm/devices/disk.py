"""Disk image backends, apart from any front end (kvmtool's disk/).

RawDisk is a raw image: a regular file or a block device.  Data moves with
preadv/pwritev between the image and the caller's memoryviews (views of guest
RAM for virtio-blk), so a request costs no copy in Python.  I/O goes through
the host page cache, like QEMU's cache=writeback; flush() makes it durable.

An image is locked while open (flock: exclusive for read-write, shared for
read-only), so two VMs never write one image at once.  Zeroing uses fallocate
where the image allows it, else writes from one fixed ZERO_CHUNK buffer.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from pathlib import Path
from typing import Sequence

from pyvmm.errors import PyvmmError

SECTOR_SIZE = 512                       # images are whole sectors: what a block device sees

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272               # <linux/fs.h>: _IOR(0x12, 114, size_t)
ZERO_CHUNK = 64 * 1024                  # the pwrite fallback writes zeroes this much at a time
_ZEROES = memoryview(bytes(ZERO_CHUNK))  # allocated once: zeroing allocates nothing per request


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


def _open_file(path: Path, read_only: bool) -> int:
    """An fd on a regular file or block device (O_NONBLOCK at open: a FIFO must
    not block us before we can refuse it); DiskError otherwise."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise DiskError(f"cannot open disk image {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise DiskError(f"disk image {path} is not a regular file or a block device")
    os.set_blocking(fd, True)
    return fd


def _lock(fd: int, path: Path, read_only: bool) -> None:
    """Take the image's advisory lock for our mode; DiskError if another holder
    (another VM, or another drive of this one) has it the other way."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DiskError(f"cannot lock disk image {path}: {exc.strerror}") from None
        raise DiskError(f"disk image {path} is in use: another VM holds it "
                        f"{'for writing' if read_only else 'open'}") from None


def _image_size(fd: int, path: Path) -> int:
    """The image's size in bytes: st_size for a file, BLKGETSIZE64 for a block device
    (whose st_size is 0); DiskError unless it is whole sectors."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        size = struct.unpack("<Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]
    else:
        size = os.fstat(fd).st_size
    if size % SECTOR_SIZE:
        raise DiskError(f"disk image {path} is {size} bytes, not a multiple of 512")
    return size


def _open_image(path: Path, read_only: bool) -> tuple[int, int]:
    """(fd, size) of a locked image that is whole sectors; DiskError otherwise."""
    fd = _open_file(path, read_only)
    try:
        _lock(fd, path, read_only)
        return fd, _image_size(fd, path)
    except BaseException:
        os.close(fd)
        raise


def _same_file(fd_a: int, fd_b: int) -> bool:
    a, b = os.fstat(fd_a), os.fstat(fd_b)
    return (a.st_dev, a.st_ino, a.st_rdev) == (b.st_dev, b.st_ino, b.st_rdev)


class RawDisk:
    """A raw image, read-only or read-write.  Offsets and lengths are in bytes;
    the front end checks them against `size`.  OSError means an I/O error."""

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
        """Give the range's blocks back to the host; advisory, so where the image
        cannot punch holes nothing happens."""
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError:
            pass

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Zero the range: fallocate where the image can (punching a hole if the
        driver allows unmapping: it reads back as zeroes), else write zeroes."""
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if unmap:
            modes.append(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                _fallocate(self.fd, mode, offset, length)
                return
            except OSError:
                pass
        self._write_zeroes_from_buffer(offset, length)

    def _write_zeroes_from_buffer(self, offset: int, length: int) -> None:
        """pwrite from the one ZERO_CHUNK buffer, short writes continued."""
        end = offset + length
        while offset < end:
            written = os.pwrite(self.fd, _ZEROES[:min(ZERO_CHUNK, end - offset)], offset)
            if written <= 0:
                raise OSError(errno.EIO, f"zeroing stopped at byte {offset}")
            offset += written

    def replace(self, path: Path) -> None:
        """Switch to another image, same mode; on DiskError the old one stays.  The
        same image again (e.g. grown on the host) keeps its fd and lock, with its new size."""
        fd = _open_file(path, self.read_only)
        try:
            same = _same_file(fd, self.fd)
            if not same:
                _lock(fd, path, self.read_only)
            size = _image_size(self.fd if same else fd, path)
        except BaseException:
            os.close(fd)
            raise
        if same:
            os.close(fd)                # closing it does not drop the lock ours holds
        else:
            self.close()
            self.fd = fd
        self.size, self.path = size, path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

"""Snapshot memory files: guest RAM's regions one after the other, page for page.

A Full snapshot's file holds every page that is not zero (zero pages are left
as holes: an idle 2 GiB guest takes the disk space of what it touched); a
Diff snapshot's holds only the pages dirtied since the last snapshot, at their
offsets, the rest are holes.  The state file of a Diff snapshot records which
pages those are (a bitmap per region), and merge() uses that record, not the
holes, so a file system without holes cannot turn a diff into zeroes.
"""
from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path
from typing import Iterator

from pyvmm.layout import PAGE_SIZE
from pyvmm.memory import GuestMemory
from pyvmm.snapshot.format import SnapshotError

CHUNK = 2 << 20               # how much of a region is checked for zeroes at a time
ZERO_CHUNK = bytes(CHUNK)


@contextlib.contextmanager
def _new_file(path: str | os.PathLike, size: int) -> Iterator[int]:
    """A new memory file of `size` bytes (holes), owner-only, written under a temporary
    name and renamed over `path` once complete.  The rename matters: the file at
    `path` may be the very one this VM's memory is mapped from (a restored VM
    snapshotted again); truncating it would pull pages from under the mapping."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
    except OSError as exc:
        raise SnapshotError(f"cannot create the memory file {os.fspath(path)}: "
                            f"{exc.strerror}") from None
    try:
        os.ftruncate(fd, size)
        yield fd
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def file_data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each stretch of [start, end) in the file that is not a hole
    (SEEK_DATA/SEEK_HOLE), clipped to the range."""
    offset = start
    while offset < end:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            return                              # ENXIO: only holes from here on
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        offset = hole


def _data_extents(memory: GuestMemory, index: int) -> Iterator[tuple[int, int]]:
    """(start, end) offsets in a region that may hold non-zero bytes."""
    region = memory.regions[index]
    if memory.backend == "memfd":
        # The memfd knows which of its pages were ever written: skip the holes.
        yield from file_data_extents(region.memfd, 0, region.size)
        return
    if memory.backend == "file":
        yield from _file_backed_extents(memory, index)
        return
    # Anonymous memory behind a userfaultfd: a page never touched here is still the
    # handler's to give, so every page is read (and faulted in) and zero runs skipped.
    view = memoryview(region.mm)
    for start in range(0, region.size, CHUNK):
        end = min(start + CHUNK, region.size)
        if view[start:end] != ZERO_CHUNK[:end - start]:
            yield start, end


# /proc/pid/pagemap, one u64 per page (Documentation/admin-guide/mm/pagemap.rst).
PAGEMAP_PRESENT, PAGEMAP_SWAPPED, PAGEMAP_FILE_OR_SHARED = 1 << 63, 1 << 62, 1 << 61
PAGEMAP_ENTRIES_PER_CHUNK = CHUNK // PAGE_SIZE


def _file_backed_extents(memory: GuestMemory, index: int) -> Iterator[tuple[int, int]]:
    """A region mapped private from a memory file holds, page by page, either the
    file's bytes or this process's own copy (a page written since): the file's data
    extents plus the pages /proc/self/pagemap shows as private.  Everything else is
    a hole in the file and was never written: zero.  (Scanning for zeroes instead
    reads every page: 0.66 s for 256 MiB.)"""
    region = memory.regions[index]
    pages = region.size // PAGE_SIZE
    marked = bytearray(pages)
    file_offset = sum(r.size for r in memory.regions[:index])
    for start, end in file_data_extents(region.memfd, file_offset, file_offset + region.size):
        first, last = (start - file_offset) // PAGE_SIZE, -(-(end - file_offset) // PAGE_SIZE)
        marked[first:last] = b"\1" * (last - first)
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        entries = os.pread(pagemap.fileno(), 8 * pages, region.host_addr // PAGE_SIZE * 8)
    zero = bytes(8 * PAGEMAP_ENTRIES_PER_CHUNK)
    for chunk_start in range(0, pages, PAGEMAP_ENTRIES_PER_CHUNK):
        raw = entries[8 * chunk_start:8 * (chunk_start + PAGEMAP_ENTRIES_PER_CHUNK)]
        if raw == zero[:len(raw)]:
            continue                            # nothing mapped here at all
        for i, entry in enumerate(memoryview(raw).cast("Q")):
            if entry & PAGEMAP_SWAPPED or (entry & PAGEMAP_PRESENT and
                                           not entry & PAGEMAP_FILE_OR_SHARED):
                marked[chunk_start + i] = 1     # our private copy of the page
    page = 0
    while True:
        first = marked.find(1, page)
        if first < 0:
            return
        last = marked.find(0, first)
        last = pages if last < 0 else last
        yield first * PAGE_SIZE, last * PAGE_SIZE
        page = last


def write_full(memory: GuestMemory, path: str | os.PathLike) -> int:
    """All of guest RAM into a new file; the bytes written (holes not counted)."""
    written = 0
    with _new_file(path, memory.size) as fd:
        file_offset = 0
        for index, region in enumerate(memory.regions):
            view = memoryview(region.mm)
            for start, end in _data_extents(memory, index):
                _pwrite_all(fd, view[start:end], file_offset + start)
                written += end - start
            file_offset += region.size
    return written


def page_runs(bitmap: bytes | bytearray, pages: int) -> Iterator[tuple[int, int]]:
    """(first page, page count) of each run of set bits."""
    run_start = None
    for byte_index, byte in enumerate(bitmap):
        if byte == 0 and run_start is None:
            continue
        if byte == 0xFF and run_start is not None:
            continue
        for bit in range(8):
            page = byte_index * 8 + bit
            if page >= pages:
                break
            if byte >> bit & 1:
                if run_start is None:
                    run_start = page
            elif run_start is not None:
                yield run_start, page - run_start
                run_start = None
    if run_start is not None:
        yield run_start, pages - run_start


def write_diff(memory: GuestMemory, path: str | os.PathLike,
               bitmaps: list[bytearray]) -> int:
    """The pages set in bitmaps (one per region) into a new sparse file; bytes written."""
    written = 0
    with _new_file(path, memory.size) as fd:
        file_offset = 0
        for region, bitmap in zip(memory.regions, bitmaps):
            view = memoryview(region.mm)
            for first, count in page_runs(bitmap, region.size // PAGE_SIZE):
                start, end = first * PAGE_SIZE, (first + count) * PAGE_SIZE
                _pwrite_all(fd, view[start:end], file_offset + start)
                written += end - start
            file_offset += region.size
    return written


def encode_bitmaps(bitmaps: list[bytearray]) -> list[str]:
    return [base64.b64encode(bytes(b)).decode("ascii") for b in bitmaps]


def decode_bitmaps(encoded: object, layout: list[tuple[int, int]]) -> list[bytes]:
    """A Diff state's dirty-page bitmaps, checked against its memory layout."""
    if type(encoded) is not list or len(encoded) != len(layout):
        raise SnapshotError(f"the snapshot's dirty-page record does not match its "
                            f"{len(layout)} memory region(s)")
    bitmaps = []
    for text, (_, size) in zip(encoded, layout):
        try:
            bitmap = base64.b64decode(text, validate=True)
        except (TypeError, ValueError):
            raise SnapshotError("the snapshot's dirty-page record is not base64") from None
        if len(bitmap) * 8 < size // PAGE_SIZE or len(bitmap) > size // PAGE_SIZE // 8 + 8:
            raise SnapshotError("the snapshot's dirty-page record has the wrong size")
        bitmaps.append(bitmap)
    return bitmaps


def open_memory_file(path: str | os.PathLike, size: int) -> int:
    """The memory file, read-only, checked to be exactly `size` bytes."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(f"cannot open the memory file {name}: {exc.strerror}") from None
    actual = os.fstat(fd).st_size
    if actual != size:
        os.close(fd)
        raise SnapshotError(f"the memory file {name} is {actual} bytes; the snapshot's "
                            f"guest has {size}: pass the memory file taken with this "
                            "snapshot")
    return fd


def merge(base_path: str | os.PathLike, diff_path: str | os.PathLike,
          layout: list[tuple[int, int]], bitmaps: list[bytes]) -> int:
    """Copy a Diff snapshot's pages onto its base memory file, in place; bytes copied."""
    size = sum(s for _, s in layout)
    diff = open_memory_file(diff_path, size)
    try:
        try:
            base = os.open(base_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise SnapshotError(f"cannot open the base memory file {os.fspath(base_path)}: "
                                f"{exc.strerror}") from None
        try:
            if os.fstat(base).st_size != size:
                raise SnapshotError(f"the base memory file {os.fspath(base_path)} is "
                                    f"{os.fstat(base).st_size} bytes; the diff's guest has "
                                    f"{size}")
            copied, file_offset = 0, 0
            for (_, region_size), bitmap in zip(layout, bitmaps):
                for first, count in page_runs(bitmap, region_size // PAGE_SIZE):
                    start = file_offset + first * PAGE_SIZE
                    end = start + count * PAGE_SIZE
                    for offset in range(start, end, CHUNK):     # bounded memory
                        data = os.pread(diff, min(CHUNK, end - offset), offset)
                        _pwrite_all(base, memoryview(data), offset)
                    copied += end - start
                file_offset += region_size
            os.fsync(base)
            return copied
        finally:
            os.close(base)
    finally:
        os.close(diff)

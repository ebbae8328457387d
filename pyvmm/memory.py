"""Guest RAM: memfd-backed regions, the x86 memory map, bounds-checked access.

Every access names a guest-physical range and must lie inside one RAM region;
anything else raises GuestMemoryError before a byte of host memory is touched.
Regions are memfd-backed so that snapshots can save them and other processes
(vhost-user style backends) can map them later.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

from pyvmm.errors import PyvmmError
from pyvmm.layout import GiB, KiB, MiB, MMIO_GAP_END, MMIO_GAP_START, PAGE_SIZE  # noqa: F401

MIN_MEM_SIZE = 1 * MiB
MAX_MEM_SIZE = 1 << 46          # far beyond any guest we run; a bound for bad config


class GuestMemoryError(PyvmmError):
    """A guest address or length outside guest RAM, or a bad memory size."""


@dataclass
class Region:
    """One KVM memory slot: [gpa, gpa + size) backed by `mm`."""
    gpa: int
    size: int
    slot: int
    memfd: int          # the memfd; the memory file (a dup) when mapped from one; -1: none
    mm: mmap.mmap
    host_addr: int = 0
    _keepalive: object = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size


def x86_layout(mem_size: int) -> list[tuple[int, int]]:
    """(gpa, size) of each RAM region for mem_size bytes of guest RAM: below the
    MMIO gap, then above 4 GiB (pyvmm.layout)."""
    if mem_size < MIN_MEM_SIZE or mem_size > MAX_MEM_SIZE or mem_size % PAGE_SIZE:
        raise GuestMemoryError(
            f"guest memory size {mem_size} is invalid: use a multiple of 4 KiB between "
            f"{MIN_MEM_SIZE // MiB} MiB and {MAX_MEM_SIZE // GiB} GiB")
    low = min(mem_size, MMIO_GAP_START)
    layout = [(0, low)]
    if mem_size > low:
        layout.append((MMIO_GAP_END, mem_size - low))
    return layout


class GuestMemory:
    """All of a guest's RAM.

    Backends: a fresh memfd per region (shared, the default), or a snapshot's
    memory file mapped private (`from_file`: pages come in from the file on first
    touch, copy-on-write, and clones of one snapshot share the page cache), or
    anonymous private memory that a userfaultfd handler fills (`anonymous`).
    """

    # How the regions are backed: "memfd", "file" (private) or "anonymous".
    backend = "memfd"

    def __init__(self, layout: list[tuple[int, int]], name: str = "pyvmm-guest", *,
                 file: int | None = None, anonymous: bool = False) -> None:
        """file: an fd whose bytes are the regions one after the other (a snapshot's
        memory file), mapped MAP_PRIVATE; anonymous: MAP_PRIVATE|MAP_ANONYMOUS."""
        from pyvmm.kvm.ioctl import ffi   # the native build is only needed for host addresses
        self.regions: list[Region] = []
        # Pages our own devices wrote (the KVM dirty log does not see them), by
        # (slot, page); None when dirty pages are not tracked.
        self.device_dirty: set[tuple[int, int]] | None = None
        if file is not None:
            self.backend = "file"
        elif anonymous:
            self.backend = "anonymous"
        try:
            offset = 0
            for slot, (gpa, size) in enumerate(sorted(layout)):
                if self.regions and gpa < self.regions[-1].end:
                    raise GuestMemoryError(f"memory regions overlap at {gpa:#x}")
                prot = mmap.PROT_READ | mmap.PROT_WRITE
                if file is not None:
                    fd = os.dup(file)
                    mm = mmap.mmap(fd, size, mmap.MAP_PRIVATE, prot, offset=offset)
                elif anonymous:
                    fd = -1
                    mm = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot)
                else:
                    fd = os.memfd_create(f"{name}-{slot}", os.MFD_CLOEXEC)
                    os.ftruncate(fd, size)
                    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
                offset += size
                keep = ffi.from_buffer(mm)
                region = Region(gpa, size, slot, fd, mm,
                                int(ffi.cast("uintptr_t", keep)), keep)
                self.regions.append(region)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_file(cls, layout: list[tuple[int, int]], fd: int) -> "GuestMemory":
        """RAM whose contents are the file's (a snapshot's memory), mapped private."""
        return cls(layout, file=fd)

    @property
    def layout(self) -> list[tuple[int, int]]:
        return [(r.gpa, r.size) for r in self.regions]

    # -- pages our devices write (for Diff snapshots) ----------------------------

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Record that a device wrote [gpa, gpa+length); a no-op unless tracking."""
        dirty = self.device_dirty
        if dirty is None or length <= 0:
            return
        region, offset = self._locate(gpa, length)     # devices write only inside RAM
        dirty.update((region.slot, page) for page in
                     range(offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE + 1))

    @classmethod
    def x86(cls, mem_size: int) -> "GuestMemory":
        return cls(x86_layout(mem_size))

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    # -- translation -----------------------------------------------------------

    def _locate(self, gpa: int, length: int) -> tuple[Region, int]:
        """The region holding all of [gpa, gpa+length) and the offset in it."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range: address {gpa:#x}, length {length}")
        for region in self.regions:
            if region.gpa <= gpa < region.end or (length == 0 and gpa == region.end):
                offset = gpa - region.gpa
                if length > region.size - offset:
                    break
                return region, offset
        raise GuestMemoryError(
            f"guest range {gpa:#x}+{length:#x} is outside guest RAM")

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._locate(gpa, length)
            return True
        except GuestMemoryError:
            return False

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM; no copy."""
        region, offset = self._locate(gpa, length)
        return memoryview(region.mm)[offset:offset + length]

    def host_address(self, gpa: int, length: int) -> int:
        """The host virtual address of [gpa, gpa+length), for C code."""
        region, offset = self._locate(gpa, length)
        return region.host_addr + offset

    # -- copying ---------------------------------------------------------------

    def read(self, gpa: int, length: int) -> bytes:
        region, offset = self._locate(gpa, length)
        return region.mm[offset:offset + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        region, offset = self._locate(gpa, len(data))
        region.mm[offset:offset + len(data)] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * length)

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def write_struct(self, gpa: int, fmt: str, *values: object) -> None:
        self.write(gpa, struct.pack(fmt, *values))

    def read_struct(self, gpa: int, fmt: str) -> tuple:
        return struct.unpack(fmt, self.read(gpa, struct.calcsize(fmt)))

    def close(self) -> None:
        from pyvmm.kvm.ioctl import ffi
        for region in self.regions:
            if region._keepalive is not None:
                ffi.release(region._keepalive)
                region._keepalive = None
            try:
                region.mm.close()
            except BufferError:
                pass            # a view is still alive; the mapping goes with it
            if region.memfd >= 0:
                os.close(region.memfd)
        self.regions = []

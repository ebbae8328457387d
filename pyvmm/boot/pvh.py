"""ELF vmlinux through the PVH entry (xen/include/public/arch-x86/hvm/start_info.h).

The kernel's ELF notes carry XEN_ELFNOTE_PHYS32_ENTRY: a 32-bit protected-mode
entry, called with paging off and EBX pointing at struct hvm_start_info.  It
skips the bzImage decompressor, which matters where ring 0 is emulated.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.boot.errors import BootError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, EM_X86_64 = 2, 1, 62
PT_LOAD, PT_NOTE = 1, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_INFO_VERSION = 1           # version 1 has the memory map
MAX_SEGMENTS = 64


@dataclass(frozen=True)
class Segment:
    paddr: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class PvhKernel:
    entry: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def _notes(blob: bytes):
    offset = 0
    while offset + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, offset)
        offset += 12
        name = blob[offset:offset + namesz].rstrip(b"\0")
        offset += (namesz + 3) & ~3
        desc = blob[offset:offset + descsz]
        offset += (descsz + 3) & ~3
        if len(desc) != descsz:
            return
        yield name, ntype, desc


def parse_pvh_elf(data: bytes, what: str = "kernel") -> PvhKernel:
    if len(data) < 64 or not is_elf(data):
        raise BootError(f"{what} is not an ELF file")
    if data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        raise BootError(f"{what} is not a 64-bit little-endian ELF")
    (e_machine,) = struct.unpack_from("<H", data, 18)
    if e_machine != EM_X86_64:
        raise BootError(f"{what} is an ELF for machine {e_machine}, not x86-64")
    e_phoff, = struct.unpack_from("<Q", data, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    if e_phnum == 0 or e_phnum > MAX_SEGMENTS or e_phentsize < 56 or \
            e_phoff + e_phnum * e_phentsize > len(data):
        raise BootError(f"{what} has a bad ELF program header table")
    segments, entry = [], None
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = \
            struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_offset + p_filesz > len(data) or p_filesz > p_memsz:
            raise BootError(f"{what} is truncated or corrupt: segment {i} lies outside the file")
        blob = data[p_offset:p_offset + p_filesz]
        if p_type == PT_LOAD and p_memsz:
            segments.append(Segment(p_paddr, bytes(blob), p_memsz))
        elif p_type == PT_NOTE:
            for name, ntype, desc in _notes(blob):
                if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
                    entry = int.from_bytes(desc, "little")
    if entry is None:
        raise BootError(f"{what} is an ELF without a PVH entry note "
                        "(XEN_ELFNOTE_PHYS32_ENTRY): build it with CONFIG_PVH=y, or boot its bzImage")
    if not segments:
        raise BootError(f"{what} has no loadable segments")
    return PvhKernel(entry, tuple(segments))

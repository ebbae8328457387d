"""A 64-bit x86 ELF executable's loadable segments, entry point and notes.

Shared by the two ways pyvmm loads an ELF kernel: a vmlinux through its PVH
note (pyvmm.boot.pvh), and the vmlinux a bzImage carries, decompressed on the
host (pyvmm.boot.payload).  Every offset and size is checked against the file,
so a corrupt ELF ends in a BootError, never an IndexError or a huge slice.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pyvmm.boot.errors import BootError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, EM_X86_64 = 2, 1, 62
PT_LOAD, PT_NOTE = 1, 4
MAX_SEGMENTS = 64
ELF64_HEADER_SIZE = 64
ELF64_PHDR_SIZE = 56


@dataclass(frozen=True)
class Segment:
    paddr: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class Note:
    name: bytes
    type: int
    desc: bytes


@dataclass(frozen=True)
class Elf:
    entry: int                       # e_entry
    segments: tuple[Segment, ...]    # PT_LOAD, in file order
    notes: tuple[Note, ...]          # from every PT_NOTE

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def _notes(blob: bytes) -> Iterator[Note]:
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
        yield Note(name, ntype, desc)


def parse_elf(data: bytes, what: str = "kernel") -> Elf:
    """The loadable segments of an x86-64 ELF; a BootError if it is not one or is corrupt."""
    if len(data) < ELF64_HEADER_SIZE or not is_elf(data):
        raise BootError(f"{what} is not an ELF file")
    if data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        raise BootError(f"{what} is not a 64-bit little-endian ELF")
    (e_machine,) = struct.unpack_from("<H", data, 18)
    if e_machine != EM_X86_64:
        raise BootError(f"{what} is an ELF for machine {e_machine}, not x86-64")
    (e_entry, e_phoff) = struct.unpack_from("<QQ", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    if e_phnum == 0 or e_phnum > MAX_SEGMENTS or e_phentsize < ELF64_PHDR_SIZE or \
            e_phoff + e_phnum * e_phentsize > len(data):
        raise BootError(f"{what} has a bad ELF program header table")
    segments: list[Segment] = []
    notes: list[Note] = []
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = \
            struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_offset + p_filesz > len(data) or p_filesz > p_memsz:
            raise BootError(f"{what} is truncated or corrupt: segment {i} lies outside the file")
        blob = data[p_offset:p_offset + p_filesz]
        if p_type == PT_LOAD and p_memsz:
            segments.append(Segment(p_paddr, bytes(blob), p_memsz))
        elif p_type == PT_NOTE:
            notes.extend(_notes(blob))
    if not segments:
        raise BootError(f"{what} has no loadable segments")
    return Elf(e_entry, tuple(segments), tuple(notes))

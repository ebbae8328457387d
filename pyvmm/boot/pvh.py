"""ELF vmlinux through the PVH entry (xen/include/public/arch-x86/hvm/start_info.h).

The kernel's ELF notes carry XEN_ELFNOTE_PHYS32_ENTRY: a 32-bit protected-mode
entry, called with paging off and EBX pointing at struct hvm_start_info.  It
skips the bzImage decompressor, which matters where ring 0 is emulated.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyvmm.boot.elf import Segment, is_elf, parse_elf  # noqa: F401 - is_elf is re-exported
from pyvmm.boot.errors import BootError

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_INFO_VERSION = 1           # version 1 has the memory map


@dataclass(frozen=True)
class PvhKernel:
    entry: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def parse_pvh_elf(data: bytes, what: str = "kernel") -> PvhKernel:
    elf = parse_elf(data, what)
    entry = None
    for note in elf.notes:
        if note.name == b"Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY and \
                len(note.desc) in (4, 8):
            entry = int.from_bytes(note.desc, "little")
    if entry is None:
        raise BootError(f"{what} is an ELF without a PVH entry note "
                        "(XEN_ELFNOTE_PHYS32_ENTRY): build it with CONFIG_PVH=y, or boot its bzImage")
    return PvhKernel(entry, elf.segments)

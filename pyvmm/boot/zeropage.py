"""The zero page (struct boot_params, arch/x86/include/uapi/asm/bootparam.h)
and the e820 memory map that both boot paths share."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.boot.bzimage import CAN_USE_HEAP, SETUP_HEADER_OFFSET, SetupHeader
from pyvmm.layout import EBDA_START, HIMEM_START
from pyvmm.memory import GuestMemory

E820_RAM, E820_RESERVED = 1, 2
E820_MAX_ENTRIES = 128               # the zero page has room for 128 (E820_MAX_ENTRIES_ZEROPAGE)
# struct boot_params offsets
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_TYPE_OF_LOADER = 0x210
BP_LOADFLAGS = 0x211
BP_RAMDISK_IMAGE = 0x218
BP_RAMDISK_SIZE = 0x21C
BP_HEAP_END_PTR = 0x224
BP_CMD_LINE_PTR = 0x228
BP_E820_TABLE = 0x2D0
LOADER_UNDEFINED = 0xFF              # boot.rst: "0xFF = undefined"
ZERO_PAGE_SIZE = 4096


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int


def e820_map(memory: GuestMemory) -> list[E820Entry]:
    """Low RAM up to the EBDA, then RAM from 1 MiB; the 640K-1M hole stays out."""
    entries = []
    for region in memory.regions:
        if region.gpa == 0:
            entries.append(E820Entry(0, min(EBDA_START, region.size), E820_RAM))
            if region.end > HIMEM_START:
                entries.append(E820Entry(HIMEM_START, region.end - HIMEM_START, E820_RAM))
        else:
            entries.append(E820Entry(region.gpa, region.size, E820_RAM))
    return entries


def build_zero_page(header: SetupHeader, e820: list[E820Entry], cmdline_addr: int,
                    initrd_addr: int, initrd_size: int) -> bytes:
    page = bytearray(ZERO_PAGE_SIZE)
    page[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(header.raw)] = header.raw
    page[BP_TYPE_OF_LOADER] = LOADER_UNDEFINED
    page[BP_LOADFLAGS] |= CAN_USE_HEAP
    struct.pack_into("<H", page, BP_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", page, BP_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", page, BP_RAMDISK_IMAGE, initrd_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, BP_EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    struct.pack_into("<I", page, BP_RAMDISK_SIZE, initrd_size & 0xFFFFFFFF)
    struct.pack_into("<I", page, BP_EXT_RAMDISK_SIZE, initrd_size >> 32)
    page[BP_E820_ENTRIES] = len(e820[:E820_MAX_ENTRIES])
    for i, entry in enumerate(e820[:E820_MAX_ENTRIES]):
        struct.pack_into("<QQI", page, BP_E820_TABLE + 20 * i, entry.addr, entry.size, entry.type)
    return bytes(page)

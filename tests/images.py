"""Synthetic kernel images for the boot-input tests."""
from __future__ import annotations

import struct

from pyvmm.boot.bzimage import BOOT_FLAG, HDRS_MAGIC, LOADED_HIGH, XLF_KERNEL_64

SETUP_SECTS = 4


def make_bzimage(kernel_size: int = 64 * 1024, version: int = 0x020F, init_size: int = 0,
                 xloadflags: int = XLF_KERNEL_64, cmdline_size: int = 2047,
                 truncate_kernel: int = 0) -> bytes:
    """A bzImage whose setup header is valid and whose payload is `hlt` bytes."""
    setup = bytearray((SETUP_SECTS + 1) * 512)
    setup[0x1F1] = SETUP_SECTS
    struct.pack_into("<I", setup, 0x1F4, kernel_size // 16)           # syssize
    struct.pack_into("<H", setup, 0x1FE, BOOT_FLAG)
    struct.pack_into("<I", setup, 0x202, HDRS_MAGIC)
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)                  # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)                    # kernel_alignment
    setup[0x234] = 1                                                   # relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, 0x1000000)                   # pref_address
    struct.pack_into("<I", setup, 0x260, init_size or kernel_size * 2)
    kernel = b"\xf4" * (kernel_size - truncate_kernel)
    return bytes(setup) + kernel


def make_elf(with_pvh_note: bool, entry: int = 0x1000000, paddr: int = 0x1000000) -> bytes:
    """A minimal x86-64 ELF with one PT_LOAD and, optionally, the PVH note."""
    code = b"\xf4" * 16
    note = b""
    if with_pvh_note:
        note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", entry)
    phnum = 2 if note else 1
    phoff = 64
    data_off = phoff + 56 * phnum
    header = bytearray(64)
    header[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 2, 62, 1, entry, phoff, 0, 0, 64, 56,
                     phnum, 0, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, data_off, paddr, paddr, len(code), len(code), 0x1000)
    if note:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, data_off + len(code), 0, 0, len(note),
                             len(note), 4)
    return bytes(header) + phdrs + code + note

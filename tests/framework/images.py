"""Guest images built in Python: PVH ELF kernels, bzImages and cpio archives.

One builder for every synthetic kernel the tests and benchmarks boot or load:
pvh_elf() writes the ELF (one PT_LOAD with the code, and the Xen PVH entry
note in a PT_NOTE); make_elf(), the echo guest and the tiny guest are code
given to it.  make_bzimage() writes a bzImage with a valid setup header.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Sequence

from pyvmm.boot.bzimage import BOOT_FLAG, HDRS_MAGIC, LOADED_HIGH, XLF_KERNEL_64

KERNEL_ADDR = 0x1000000          # 16 MiB: where the synthetic PVH kernels load by default
SETUP_SECTS = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18

# A PVH kernel in 32-bit protected mode that echoes COM1: it polls LSR for a
# received byte, writes it back to THR, and on '!' pulses the i8042 reset line
# (the VM ends as when Linux reboots: exit code 0).
ECHO_CODE = bytes.fromhex(
    "66bafd03" "ec" "a801" "74f7"       # poll: mov $0x3fd,%dx; in; test $1,%al; jz poll
    "66baf803" "ec" "3c21" "7403"       # mov $0x3f8,%dx; in; cmp $'!',%al; je reset
    "ee" "ebeb"                          # out %al,%dx; jmp poll
    "b0fe" "e664" "f4")                  # reset: mov $0xfe,%al; out %al,$0x64; hlt

# The start-up and memory benchmarks' guest: at its PVH entry (32-bit protected
# mode, paging off) it writes "X\n" to COM1 at once, then halts with interrupts
# off (an idle vCPU).  Loaded at 1 MiB, where QEMU's microvm boots it too.
TINY_CODE = bytes.fromhex(
    "66baf803"                           # mov $0x3f8,%dx
    "b058" "ee"                          # mov $'X',%al; out %al,%dx
    "b00a" "ee"                          # mov $'\n',%al; out %al,%dx
    "fa" "f4" "ebfc")                    # 1: cli; hlt; jmp 1b
TINY_ADDR = 0x100000


def pvh_elf(code: bytes, paddr: int = KERNEL_ADDR, entry: int | None = None,
            pvh_note: bool = True) -> bytes:
    """An x86-64 ELF: the header, one PT_LOAD holding `code` at `paddr`, and
    (pvh_note) a PT_NOTE with the Xen PVH entry point `entry` (default paddr)."""
    entry = paddr if entry is None else entry
    note = b""
    if pvh_note:
        note = struct.pack("<III", 4, 4, XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + \
            struct.pack("<I", entry)
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


def make_elf(with_pvh_note: bool, entry: int = KERNEL_ADDR, paddr: int = KERNEL_ADDR) -> bytes:
    """A minimal PVH ELF whose code is 16 `hlt` bytes (the boot-input tests)."""
    return pvh_elf(b"\xf4" * 16, paddr, entry, with_pvh_note)


def write_echo_guest(path: str | os.PathLike) -> str:
    """The echo guest (ECHO_CODE) as a PVH ELF at 16 MiB; returns the path."""
    Path(path).write_bytes(pvh_elf(ECHO_CODE))
    return str(path)


def tiny_guest() -> bytes:
    """The tiny guest (TINY_CODE) as a PVH ELF at 1 MiB, ~200 bytes."""
    return pvh_elf(TINY_CODE, TINY_ADDR)


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


def cpio_newc(files: Sequence[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive (an initramfs) of (name, mode, data), with its trailer."""
    def entry(ino: int, name: str, mode: int, data: bytes) -> bytes:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join("%08X" % v for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        return hdr.encode() + nb + b"\0" * (-(110 + len(nb)) % 4) + data + \
            b"\0" * (-len(data) % 4)
    parts = [entry(1000 + i, n, m, d) for i, (n, m, d) in enumerate(files)]
    parts.append(entry(0, "TRAILER!!!", 0, b""))
    return b"".join(parts)

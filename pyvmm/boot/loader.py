"""Put a Linux kernel, its initrd and command line into guest RAM.

load_linux() picks the entry path by the file's format: a bzImage goes
through the 64-bit boot protocol, an ELF vmlinux through its PVH note.
Every size and address is checked against guest RAM first, so a bad image
ends in a BootError and never in a write outside guest memory.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pyvmm.boot.bzimage import STARTUP_64_OFFSET, is_bzimage, parse_bzimage
from pyvmm.boot.cpu import EntryState
from pyvmm.boot.errors import BootError
from pyvmm.boot.initrd import check_initrd
from pyvmm.layout import (CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START,
                               PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START,
                               ZERO_PAGE_START)
from pyvmm.boot.mptable import write_mptable
from pyvmm.boot.pvh import HVM_START_INFO_VERSION, HVM_START_MAGIC, is_elf, parse_pvh_elf
from pyvmm.boot.zeropage import build_zero_page, e820_map
from pyvmm.host_files import HostFileError, read_regular_file
from pyvmm.memory import PAGE_SIZE, GuestMemory

MAX_KERNEL_FILE = 512 << 20           # refuse to read absurd files into memory
# Below this the initrd would collide with the kernel's decompression buffer.
MAX_INITRD_ADDR_DEFAULT = 0x37FFFFFF  # boot.rst: the default initrd_addr_max


@dataclass(frozen=True)
class LoadedKernel:
    entry: EntryState
    kernel_end: int
    initrd_addr: int
    initrd_size: int
    cmdline: bytes
    format: str                       # "bzImage" or "pvh"
    # The initrd's format as pyvmm.boot.initrd names it ("cpio", "gzip", ...), or None.
    initrd_format: str | None = None
    # One line for the user about the initrd (a large compressed one on KVM PVM), or None.
    initrd_notice: str | None = None


def _read(path: Path, what: str) -> bytes:
    """A kernel or initrd: a regular file, read with a bound (st_size is not trusted)."""
    try:
        return read_regular_file(path, what, MAX_KERNEL_FILE)
    except HostFileError as exc:
        raise BootError(str(exc)) from None


def _low_ram_end(memory: GuestMemory) -> int:
    return next(r.end for r in memory.regions if r.gpa == 0)


def _place_initrd(memory: GuestMemory, size: int, lowest: int, highest_end: int) -> int:
    """The highest page-aligned address for the initrd between lowest and highest_end."""
    top = min(_low_ram_end(memory), highest_end)
    addr = (top - size) & ~(PAGE_SIZE - 1)
    if size > top or addr < lowest:
        raise BootError(
            f"the initrd ({size >> 10} KiB) does not fit in guest RAM above the kernel: "
            f"give the VM more memory (--mem)")
    return addr


def _check_cmdline(cmdline: str, limit: int) -> bytes:
    data = cmdline.encode()
    if b"\0" in data:
        raise BootError("the kernel command line contains a NUL byte")
    if len(data) >= limit:
        raise BootError(f"the kernel command line is {len(data)} bytes; this kernel accepts at "
                        f"most {limit - 1}")
    return data + b"\0"


def _check_fits(memory: GuestMemory, start: int, size: int, what: str) -> None:
    if not memory.contains(start, size):
        raise BootError(f"the {what} ({size >> 10} KiB at {start:#x}) does not fit in guest "
                        f"RAM ({memory.size >> 20} MiB): give the VM more memory (--mem)")


def load_linux(memory: GuestMemory, kernel_path: Path, initrd_path: Path | None,
               cmdline: str, num_cpus: int) -> LoadedKernel:
    data = _read(kernel_path, "kernel")
    if not data:
        raise BootError(f"kernel {kernel_path} is empty")
    initrd = _read(initrd_path, "initrd") if initrd_path else b""
    # A built-in kernel that cannot unpack this initrd: one BootError before the boot.
    info = check_initrd(initrd, initrd_path, kernel_path) if initrd_path and initrd else None
    write_mptable(memory, num_cpus)
    if is_bzimage(data):
        loaded = _load_bzimage(memory, data, initrd, cmdline, str(kernel_path))
    elif is_elf(data):
        loaded = _load_pvh(memory, data, initrd, cmdline, str(kernel_path))
    else:
        raise BootError(f"kernel {kernel_path} is neither a bzImage nor an ELF vmlinux")
    return replace(loaded, initrd_format=info and info.format,
                   initrd_notice=info and info.notice)


def _load_bzimage(memory: GuestMemory, data: bytes, initrd: bytes, cmdline: str,
                  what: str) -> LoadedKernel:
    image = parse_bzimage(data, what)
    header = image.header
    # The decompressor works in place up to init_size bytes past the load address.
    kernel_span = max(len(image.kernel), header.init_size)
    _check_fits(memory, HIMEM_START, kernel_span, "kernel and its decompression space")
    cmd = _check_cmdline(cmdline, min(header.cmdline_size + 1, CMDLINE_MAX_SIZE))
    memory.write(HIMEM_START, image.kernel)
    memory.write(CMDLINE_START, cmd)
    kernel_end = HIMEM_START + kernel_span
    initrd_addr = 0
    if initrd:
        initrd_addr = _place_initrd(memory, len(initrd), kernel_end,
                                    (header.initrd_addr_max or MAX_INITRD_ADDR_DEFAULT) + 1)
        memory.write(initrd_addr, initrd)
    memory.write(ZERO_PAGE_START, build_zero_page(header, e820_map(memory), CMDLINE_START,
                                                  initrd_addr, len(initrd)))
    return LoadedKernel(EntryState(HIMEM_START + STARTUP_64_OFFSET, pvh=False), kernel_end,
                        initrd_addr, len(initrd), cmd, "bzImage")


def _load_pvh(memory: GuestMemory, data: bytes, initrd: bytes, cmdline: str,
              what: str) -> LoadedKernel:
    kernel = parse_pvh_elf(data, what)
    for seg in kernel.segments:
        if seg.paddr < HIMEM_START:
            raise BootError(f"{what} has a segment at {seg.paddr:#x}, below 1 MiB where "
                            "pyvmm keeps its boot tables")
        _check_fits(memory, seg.paddr, seg.memsz, "kernel")
    if not any(seg.paddr <= kernel.entry < seg.paddr + seg.memsz for seg in kernel.segments):
        raise BootError(f"{what}'s PVH entry point {kernel.entry:#x} is not inside any of its "
                        "loadable segments: the ELF is corrupt")
    for seg in kernel.segments:
        memory.write(seg.paddr, seg.data)
        memory.fill(seg.paddr + len(seg.data), seg.memsz - len(seg.data))
    cmd = _check_cmdline(cmdline, CMDLINE_MAX_SIZE)
    memory.write(CMDLINE_START, cmd)
    initrd_addr = 0
    if initrd:
        initrd_addr = _place_initrd(memory, len(initrd), kernel.end, MAX_INITRD_ADDR_DEFAULT + 1)
        memory.write(initrd_addr, initrd)
        # struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved
        memory.write_struct(PVH_MODLIST_START, "<QQQQ", initrd_addr, len(initrd), 0, 0)
    e820 = e820_map(memory)[:PVH_MEMMAP_MAX_ENTRIES]
    for i, entry in enumerate(e820):   # struct hvm_memmap_table_entry
        memory.write_struct(PVH_MEMMAP_START + 24 * i, "<QQII", entry.addr, entry.size,
                            entry.type, 0)
    # struct hvm_start_info (version 1)
    memory.write_struct(PVH_INFO_START, "<IIIIQQQQII", HVM_START_MAGIC, HVM_START_INFO_VERSION,
                        0, 1 if initrd else 0, PVH_MODLIST_START if initrd else 0, CMDLINE_START,
                        0, PVH_MEMMAP_START, len(e820), 0)
    return LoadedKernel(EntryState(kernel.entry, pvh=True), kernel.end, initrd_addr, len(initrd),
                        cmd, "pvh")



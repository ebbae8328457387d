"""Put a Linux kernel, its initrd and command line into guest RAM.

load_linux() picks the entry path by the file's format: a bzImage goes
through the 64-bit boot protocol, an ELF vmlinux through its PVH note.
A bzImage's compressed kernel is decompressed on the host where it can be
(pyvmm.boot.payload, cached by pyvmm.boot.kernel_cache), and the kernel entered
where its own decompressor would have jumped; otherwise, or with
host_decompress=False, the bzImage is loaded whole and decompresses itself.
Every size and address is checked against guest RAM first, so a bad image
ends in a BootError and never in a write outside guest memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from pyvmm.boot.bzimage import STARTUP_64_OFFSET, BzImage, is_bzimage, parse_bzimage
from pyvmm.boot.cpu import EntryState
from pyvmm.boot.elf import Elf, parse_elf
from pyvmm.boot.errors import BootError
from pyvmm.boot.initrd import check_initrd
from pyvmm.boot.kernel_cache import KernelCache, bzimage_key
from pyvmm.boot.payload import MAX_DECOMPRESSED, PayloadError, decompress, payload_of
from pyvmm.layout import (CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, IDENTITY_MAP_END,
                          PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START,
                          PVH_MODLIST_START, ZERO_PAGE_START)
from pyvmm.boot.mptable import write_mptable
from pyvmm.boot.pvh import HVM_START_INFO_VERSION, HVM_START_MAGIC, is_elf, parse_pvh_elf
from pyvmm.boot.zeropage import build_zero_page, e820_map
from pyvmm.host_files import HostFileError, read_regular_file
from pyvmm.memory import PAGE_SIZE, GuestMemory

MAX_KERNEL_FILE = 512 << 20           # refuse to read absurd files into memory
# Below this the initrd would collide with the kernel's decompression buffer.
MAX_INITRD_ADDR_DEFAULT = 0x37FFFFFF  # boot.rst: the default initrd_addr_max
MiB = 1 << 20


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
    # A bzImage's compressed kernel: decompressed by the "host", read from the "cache",
    # or left to the "guest"; None for a PVH vmlinux.
    decompression: str | None = None
    # One line for the user saying which of those it was, and why for the guest.
    kernel_notice: str | None = None


# How every kernel_notice starts (benchmarks and tests read it from stderr).
KERNEL_NOTICE = "pyvmm: kernel: "


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
               cmdline: str, num_cpus: int, host_decompress: bool = True,
               cache: KernelCache | None = None) -> LoadedKernel:
    """Load the kernel, initrd and command line.  host_decompress=False always lets a
    bzImage decompress itself; cache is where decompressed kernels are kept (None: none)."""
    data = _read(kernel_path, "kernel")
    if not data:
        raise BootError(f"kernel {kernel_path} is empty")
    initrd = _read(initrd_path, "initrd") if initrd_path else b""
    # A built-in kernel that cannot unpack this initrd: one BootError before the boot.
    info = check_initrd(initrd, initrd_path, kernel_path) if initrd_path and initrd else None
    write_mptable(memory, num_cpus)
    if is_bzimage(data):
        loaded = _load_bzimage(memory, data, initrd, cmdline, str(kernel_path),
                               host_decompress, cache)
    elif is_elf(data):
        loaded = _load_pvh(memory, data, initrd, cmdline, str(kernel_path))
    else:
        raise BootError(f"kernel {kernel_path} is neither a bzImage nor an ELF vmlinux")
    return replace(loaded, initrd_format=info and info.format,
                   initrd_notice=info and info.notice)


def _load_bzimage(memory: GuestMemory, data: bytes, initrd: bytes, cmdline: str,
                  what: str, host_decompress: bool, cache: KernelCache | None) -> LoadedKernel:
    image = parse_bzimage(data, what)
    header = image.header
    cmd = _check_cmdline(cmdline, min(header.cmdline_size + 1, CMDLINE_MAX_SIZE))
    fallback = None
    if host_decompress:
        try:
            elf, decompression, notice = _host_decompressed(memory, image, data, what, cache)
        except PayloadError as exc:
            if not exc.fallback:
                raise BootError(f"{what}: {exc}; --no-host-decompress lets the kernel's own "
                                "decompressor try") from None
            fallback = f"{KERNEL_NOTICE}decompressing in the guest: {exc}"
        else:
            for seg in elf.segments:
                memory.write(seg.paddr, seg.data)
                memory.fill(seg.paddr + len(seg.data), seg.memsz - len(seg.data))
            # The kernel's own startup_64 (arch/x86/kernel/head_64.S), entered as its
            # decompressor enters it: long mode, the kernel identity-mapped, RSI = zero page.
            entry, kernel_end = elf.entry, elf.end
    if not host_decompress or fallback:
        # The decompressor works in place up to init_size bytes past the load address.
        kernel_span = max(len(image.kernel), header.init_size)
        _check_fits(memory, HIMEM_START, kernel_span, "kernel and its decompression space")
        memory.write(HIMEM_START, image.kernel)
        entry, kernel_end = HIMEM_START + STARTUP_64_OFFSET, HIMEM_START + kernel_span
        decompression = "guest"
        notice = fallback or f"{KERNEL_NOTICE}decompressing in the guest (--no-host-decompress)"
    memory.write(CMDLINE_START, cmd)
    initrd_addr = 0
    if initrd:
        initrd_addr = _place_initrd(memory, len(initrd), kernel_end,
                                    (header.initrd_addr_max or MAX_INITRD_ADDR_DEFAULT) + 1)
        memory.write(initrd_addr, initrd)
    memory.write(ZERO_PAGE_START, build_zero_page(header, e820_map(memory), CMDLINE_START,
                                                  initrd_addr, len(initrd)))
    return LoadedKernel(EntryState(entry, pvh=False), kernel_end, initrd_addr, len(initrd),
                        cmd, "bzImage", decompression=decompression, kernel_notice=notice)


def _host_decompressed(memory: GuestMemory, image: BzImage, data: bytes, what: str,
                       cache: KernelCache | None) -> tuple[Elf, str, str]:
    """The vmlinux inside a bzImage, from the cache or decompressed now, checked to be
    loadable the way its decompressor would load it; a PayloadError if it is not."""
    limit = min(MAX_DECOMPRESSED, memory.size)
    key = bzimage_key(data)
    cached = cache.get(key, limit) if cache is not None else None
    if cached is not None:
        try:
            elf = _loadable_vmlinux(memory, image, cached, what)
        except PayloadError:
            cache.drop(key)                  # a stale or damaged entry: decompress afresh
        else:
            return elf, "cache", (f"{KERNEL_NOTICE}decompressed kernel from the cache "
                                  f"({len(cached) / MiB:.1f} MiB)")
    payload = payload_of(image, data)
    started = time.monotonic()
    vmlinux = decompress(payload, limit)
    seconds = time.monotonic() - started
    elf = _loadable_vmlinux(memory, image, vmlinux, what)
    not_cached = cache.put(key, vmlinux) if cache is not None else None
    return elf, "host", (f"{KERNEL_NOTICE}{payload.compression} payload decompressed on the "
                         f"host ({len(payload.data) / MiB:.1f} MiB -> "
                         f"{len(vmlinux) / MiB:.1f} MiB, {seconds:.2f} s)"
                         + (f"; not cached: {not_cached}" if not_cached else ""))


def _loadable_vmlinux(memory: GuestMemory, image: BzImage, vmlinux: bytes, what: str) -> Elf:
    """The decompressor loads vmlinux's segments at output + (p_paddr - LOAD_PHYSICAL_ADDR)
    and, without KASLR, output is LOAD_PHYSICAL_ADDR, which the header gives as
    pref_address (arch/x86/boot/compressed/misc.c, parse_elf): so at their own p_paddr."""
    try:
        elf = parse_elf(vmlinux, f"{what}'s payload")
    except BootError as exc:
        raise PayloadError(f"its payload is not a loadable ELF vmlinux ({exc})",
                           fallback=True) from None
    lowest = min(seg.paddr for seg in elf.segments)
    if lowest != image.header.pref_address:
        raise PayloadError(f"its vmlinux is linked at {lowest:#x}, not at the address its "
                           f"header asks for ({image.header.pref_address:#x})", fallback=True)
    if lowest < HIMEM_START or elf.end > IDENTITY_MAP_END:
        raise PayloadError(f"its vmlinux ({lowest:#x}-{elf.end:#x}) is outside the 1 MiB-"
                           f"{IDENTITY_MAP_END >> 30} GiB the boot page tables map", fallback=True)
    if not any(seg.paddr <= elf.entry < seg.paddr + len(seg.data) for seg in elf.segments):
        raise PayloadError(f"its vmlinux's entry point {elf.entry:#x} is not inside any of "
                           "its loaded segments", fallback=True)
    for seg in elf.segments:
        _check_fits(memory, seg.paddr, seg.memsz, "decompressed kernel")
    return elf


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



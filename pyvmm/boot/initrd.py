"""What an initrd is, before the guest kernel finds out the hard way.

Linux unpacks an initramfs in init/initramfs.c: a sequence of segments, each a
newc cpio archive ("070701", or "070702" with checksums), plain or compressed
by a decompressor the kernel was built with (CONFIG_RD_GZIP, ...), with zero
padding between them (Debian's initrd.img is an uncompressed microcode cpio
followed by a zstd one).  A format the kernel lacks ends in "Initramfs
unpacking failed" and, later, the panic "VFS: Unable to mount root fs on
unknown-block(0,0)", which says nothing about the cause.

inspect() names the segments by their magic.  check_initrd() turns that into
one clear BootError before the boot when the kernel is the built-in guest's
(whose decompressors we know from its config); for other kernels the loader
records the format, and panic_hint() explains the panic afterwards.
"""
from __future__ import annotations

import logging
import lzma
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from pyvmm.boot.errors import BootError

log = logging.getLogger("pyvmm.boot.initrd")

CPIO = "cpio"                         # newc or newc+crc: what Linux unpacks
UNKNOWN = "unknown"
# (format, magic), longest first where one magic is a prefix of another.
MAGICS: tuple[tuple[str, bytes], ...] = (
    (CPIO, b"070701"),
    (CPIO, b"070702"),
    ("odc cpio", b"070707"),          # cpio -H odc: Linux has no unpacker for it
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lz4", b"\x02\x21\x4c\x18"),     # the legacy format (`lz4 -l`): what Linux reads
    ("lz4 frame", b"\x04\x22\x4d\x18"),  # lz4's default format: Linux cannot read it
    ("lzo", b"\x89LZO"),
    ("gzip", b"\x1f\x8b"),
    ("gzip", b"\x1f\x9e"),            # old gzip, accepted by Linux's gunzip
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
)
COMPRESSED = ("gzip", "zstd", "xz", "lz4", "lzma", "bzip2", "lzo")
# CONFIG_RD_* option of each decompressor.
CONFIG_OPTION = {name: f"CONFIG_RD_{name.upper()}" for name in COMPRESSED}
# What firmware/kernel/microvm.config enables: used when the guest's config is missing.
BUILTIN_DEFAULT = frozenset({"gzip", "zstd", "xz", "lz4", "lzma"})
# A compressed initrd larger than this gets the KVM PVM notice.
PVM_SLOW_SIZE = 4 << 20
NEWC_HEADER = 110
CPIO_TRAILER = b"TRAILER!!!"


def detect_format(head: bytes) -> str:
    """The format of one initramfs segment, by the magic at its start: "cpio", one of
    COMPRESSED, "odc cpio", "lz4 frame" or "unknown"."""
    for name, magic in MAGICS:
        if head.startswith(magic):
            return name
    return UNKNOWN


@dataclass(frozen=True)
class InitrdInfo:
    """segments: the format of each segment Linux would meet, in order; scanning stops
    at the first compressed or unrecognised one.  problem: why no Linux can unpack it
    (a corrupt cpio header, a compressed stream that holds no cpio archive), or None."""
    segments: tuple[str, ...]
    problem: str | None = None
    notice: str | None = None          # check_initrd's KVM PVM line (pvm_notice), if any

    @property
    def format(self) -> str:
        """The format that matters: the first segment that is not plain cpio."""
        return next((s for s in self.segments if s != CPIO), CPIO)

    @property
    def compression(self) -> str | None:
        return self.format if self.format in COMPRESSED else None


def _hex(data: bytes, offset: int, count: int = 8) -> int | None:
    field = data[offset:offset + count]
    try:
        return int(field, 16) if len(field) == count and field.isalnum() else None
    except ValueError:
        return None


def _skip_cpio(data: bytes, pos: int) -> tuple[int, str | None]:
    """Walk one newc archive from pos to just past its trailer: (end, problem)."""
    while pos < len(data):
        if data[pos:pos + 6] not in (b"070701", b"070702"):
            return pos, f"a cpio header at byte {pos} is corrupt"
        filesize, namesize = _hex(data, pos + 54), _hex(data, pos + 94)
        if filesize is None or namesize is None or pos + NEWC_HEADER + namesize > len(data):
            return pos, f"a cpio header at byte {pos} is corrupt or truncated"
        name = data[pos + NEWC_HEADER:pos + NEWC_HEADER + namesize].rstrip(b"\0")
        pos += (NEWC_HEADER + namesize + 3) & ~3
        pos += (filesize + 3) & ~3
        if pos > len(data) + 3:
            return len(data), f"the file {name.decode(errors='replace')!r} in it is truncated"
        if name == CPIO_TRAILER:
            return pos, None
    return pos, None                   # no trailer: Linux unpacks what is there


def _peek(data: bytes, fmt: str) -> bytes | None:
    """The first bytes a compressed segment decompresses to, for the formats Python
    reads cheaply: None when not checked (or nothing came out of the first 64 KiB),
    b"" when it does not decompress."""
    try:
        if fmt == "gzip":
            inner = zlib.decompressobj(wbits=31).decompress(data[:1 << 16], 6)
        elif fmt in ("xz", "lzma"):
            inner = lzma.LZMADecompressor().decompress(data[:1 << 16], max_length=6)
        else:                          # zstd, lz4, lzo: no decompressor in Python's library
            return None
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError):
        return b""
    return inner or None


def inspect(data: bytes) -> InitrdInfo:
    """The segments of an initrd (see InitrdInfo).  Reads only headers, and at most the
    first few KiB of a compressed stream; never raises."""
    segments: list[str] = []
    pos = 0
    while True:
        while pos < len(data) and data[pos] == 0:     # padding between segments
            pos += 1
        if pos >= len(data):
            return InitrdInfo(tuple(segments) or (UNKNOWN,),
                              None if segments else "it is empty or all zeros")
        fmt = detect_format(data[pos:pos + 8])
        segments.append(fmt)
        if fmt != CPIO:
            break
        pos, problem = _skip_cpio(data, pos)
        if problem:
            return InitrdInfo(tuple(segments), problem)
    problem = None
    if fmt in COMPRESSED:
        inner = _peek(data[pos:], fmt)
        if inner == b"":
            problem = f"its {fmt} stream does not decompress"
        elif inner is not None and not inner.startswith((b"070701", b"070702")):
            problem = (f"it holds no cpio archive once decompressed (it starts with "
                       f"{inner.hex()}; an old-style initrd disk image needs a kernel with "
                       f"CONFIG_BLK_DEV_RAM)")
    return InitrdInfo(tuple(segments), problem)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def builtin_decompressors(kernel_path: Path) -> frozenset[str] | None:
    """The initramfs decompressors of kernel_path if it is the built-in guest's kernel
    (read from the guest's kernel config), or None for any other kernel."""
    from pyvmm.builtin_guest import find_guest
    guest = find_guest()
    if guest is None or not any(_same_file(kernel_path, p) for p in (guest.bzimage,
                                                                      guest.vmlinux)):
        return None
    try:
        config = (guest.bzimage.parent / "config").read_text(errors="replace").splitlines()
    except OSError:
        return BUILTIN_DEFAULT
    return frozenset(name for name, option in CONFIG_OPTION.items()
                     if f"{option}=y" in config)


def _builtin_problem(info: InitrdInfo, path: Path, decompressors: frozenset[str]) -> str | None:
    fmt = info.format
    usable = ", ".join(sorted(decompressors)) or "none"
    if fmt in COMPRESSED and fmt not in decompressors:
        better = " or ".join(f for f in ("gzip", "zstd") if f in decompressors and not (
            f == "zstd" and _pvm()))              # zstd does not unpack on PVM: PVM_ZSTD
        return f"initrd {path} is {fmt}-compressed, which the built-in kernel cannot " \
               f"unpack: " + (f"recompress it with {better}" if better else "decompress it")
    if info.problem:
        return f"initrd {path} is not a usable initramfs: {info.problem}; rebuild it with " \
               f"`find . | cpio -o -H newc | gzip`"
    if fmt == "odc cpio":
        return f"initrd {path} is an old-format (odc, 070707) cpio archive, which Linux " \
               f"cannot unpack: rebuild it with `cpio -o -H newc`"
    if fmt == "lz4 frame":
        return f"initrd {path} is lz4-compressed in the frame format, which Linux cannot " \
               f"unpack: compress it with `lz4 -l` (the legacy format), gzip or zstd"
    if fmt == UNKNOWN:
        return f"initrd {path} is not an initramfs (a newc cpio archive, plain or " \
               f"compressed with {usable}): make one with `find . | cpio -o -H newc | gzip`"
    return None


# Linux's zstd picks BMI2 code (shlx...) by the CPUID instruction, which on KVM PVM shows
# the host's BMI2 whatever KVM_SET_CPUID2 says, and KVM's emulator cannot run shlx: the
# guest ends in "KVM internal error: instruction emulation failed" while unpacking.
PVM_ZSTD = ("initrd {path} is zstd-compressed, and on this KVM PVM host the guest "
            "kernel's zstd decompressor runs BMI2 instructions that KVM cannot emulate: "
            "recompress it with gzip (or leave it uncompressed)")


def _pvm() -> bool:
    from pyvmm.pvm import is_pvm_host
    return is_pvm_host()


def check_initrd(data: bytes, path: Path, kernel_path: Path) -> InitrdInfo:
    """inspect() the initrd; raise BootError (one line) if the built-in kernel could not
    unpack it; log a warning if it is compressed and large on a KVM PVM host."""
    info = inspect(data)
    if info.format != CPIO or info.problem:
        decompressors = builtin_decompressors(kernel_path)
        if decompressors is not None:
            problem = _builtin_problem(info, path, decompressors)
            if problem:
                raise BootError(problem)
            if info.format == "zstd" and _pvm():
                raise BootError(PVM_ZSTD.format(path=path))
    notice = pvm_notice(info, path, len(data))
    if notice:
        log.warning(notice)
    return replace(info, notice=notice)


def pvm_notice(info: InitrdInfo, path: Path, size: int) -> str | None:
    """The one line about a large compressed initrd on a KVM PVM host, or None."""
    if info.compression is None or size <= PVM_SLOW_SIZE:
        return None
    if not _pvm():
        return None
    return (f"pyvmm: initrd {path} is {size / (1 << 20):.1f} MiB of {info.compression}: on "
            f"this KVM PVM host the guest kernel decompresses it at emulated speed (gzip "
            f"~40 s per MB, xz or lzma minutes); an uncompressed cpio boots faster")


UNMOUNTABLE_ROOT = b"Unable to mount root fs"
UNPACK_FAILED = b"Initramfs unpacking failed: "   # init/initramfs.c, then its reason


def panic_hint(console_history: bytes, initrd_format: str | None) -> str:
    """What to add to "the guest kernel panicked" when the kernel found no root fs after
    an initramfs it probably could not unpack (initrd_format: the loader's), or ""."""
    if initrd_format is None or UNMOUNTABLE_ROOT not in console_history:
        return ""
    at = console_history.rfind(UNPACK_FAILED)
    said = console_history[at + len(UNPACK_FAILED):].split(b"\n")[0].strip().decode(
        errors="replace")[:120] if at >= 0 else ""
    if initrd_format in COMPRESSED:
        option = CONFIG_OPTION[initrd_format]
        if said and "not configured" not in said:
            return f"; the kernel could not unpack the {initrd_format}-compressed initramfs " \
                   f"({said})"
        return (f"; the initramfs is {initrd_format}-compressed and the kernel "
                f"{'lacks' if said else 'probably lacks'} its decompressor ({option}): "
                f"recompress the initramfs with one the kernel has, or leave it uncompressed")
    if initrd_format == "lz4 frame":
        return "; the initramfs is lz4-compressed in the frame format, which Linux cannot " \
               "unpack: compress it with `lz4 -l`"
    if initrd_format in ("odc cpio", UNKNOWN):
        return f"; the initrd is not a newc cpio archive ({initrd_format} format), so the " \
               f"kernel found no root fs in it"
    return ""

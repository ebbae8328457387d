"""bzImage: parse and validate the setup header (Documentation/arch/x86/boot.rst).

We use the 64-bit boot protocol: the protected-mode kernel is copied to 1 MiB
and entered in long mode at load address + 0x200, with RSI pointing at a zero
page whose setup header is a copy of the image's own.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.boot.errors import BootError

SETUP_HEADER_OFFSET = 0x1F1       # boot.rst: "The real-mode kernel header"
SETUP_HEADER_END = 0x268          # through kernel_info_offset (protocol 2.15)
HDRS_MAGIC = 0x53726448           # "HdrS" at 0x202
BOOT_FLAG = 0xAA55                # at 0x1fe
MIN_PROTOCOL = 0x020C             # 2.12: XLF_KERNEL_64 and 64-bit entry
XLF_KERNEL_64 = 1 << 0            # xloadflags: has the 64-bit entry at +0x200
LOADED_HIGH = 1 << 0              # loadflags: protected-mode code at 1 MiB
CAN_USE_HEAP = 1 << 7
STARTUP_64_OFFSET = 0x200
DEFAULT_SETUP_SECTS = 4           # boot.rst: 0 means 4


@dataclass(frozen=True)
class SetupHeader:
    setup_sects: int
    version: int
    loadflags: int
    relocatable_kernel: int
    xloadflags: int
    cmdline_size: int
    initrd_addr_max: int
    kernel_alignment: int
    pref_address: int
    init_size: int
    raw: bytes                    # header bytes 0x1f1..end, copied into the zero page

    @property
    def setup_size(self) -> int:
        return (self.setup_sects or DEFAULT_SETUP_SECTS) * 512 + 512


@dataclass(frozen=True)
class BzImage:
    header: SetupHeader
    kernel: bytes                 # the protected-mode part, loaded at 1 MiB


def _u(data: bytes, offset: int, fmt: str) -> int:
    return struct.unpack_from("<" + fmt, data, offset)[0]


def is_bzimage(data: bytes) -> bool:
    return len(data) >= 0x206 and _u(data, 0x202, "I") == HDRS_MAGIC


def parse_bzimage(data: bytes, what: str = "kernel") -> BzImage:
    if len(data) < SETUP_HEADER_END:
        raise BootError(f"{what} is too short ({len(data)} bytes) to be a bzImage")
    if _u(data, 0x202, "I") != HDRS_MAGIC:
        raise BootError(f"{what} is not a bzImage: no 'HdrS' magic at 0x202")
    if _u(data, 0x1FE, "H") != BOOT_FLAG:
        raise BootError(f"{what} has a bad boot flag (expected 0xaa55 at 0x1fe)")
    version = _u(data, 0x206, "H")
    if version < MIN_PROTOCOL:
        raise BootError(f"{what} uses boot protocol {version >> 8}.{version & 0xff}; "
                        "pyvmm needs 2.12 or later (Linux 3.8+)")
    header = SetupHeader(
        setup_sects=data[0x1F1], version=version, loadflags=data[0x211],
        relocatable_kernel=data[0x234], xloadflags=_u(data, 0x236, "H"),
        cmdline_size=_u(data, 0x238, "I"), initrd_addr_max=_u(data, 0x22C, "I"),
        kernel_alignment=_u(data, 0x230, "I"), pref_address=_u(data, 0x258, "Q"),
        init_size=_u(data, 0x260, "I"),
        raw=bytes(data[SETUP_HEADER_OFFSET:SETUP_HEADER_END]))
    if not header.xloadflags & XLF_KERNEL_64:
        raise BootError(f"{what} has no 64-bit entry point (XLF_KERNEL_64 is clear): "
                        "build it for x86-64")
    if not header.loadflags & LOADED_HIGH:
        raise BootError(f"{what} is a zImage that loads low; only bzImage is supported")
    if header.setup_size >= len(data):
        raise BootError(f"{what} is truncated: its setup code ({header.setup_size} bytes) "
                        f"fills the whole {len(data)}-byte file")
    kernel = bytes(data[header.setup_size:])
    syssize = _u(data, 0x1F4, "I") * 16      # protected-mode size, in 16-byte paragraphs
    if syssize and len(kernel) < syssize:
        raise BootError(f"{what} is truncated: {len(kernel)} of {syssize} bytes of kernel")
    if header.init_size and header.init_size < len(kernel):
        raise BootError(f"{what} has an init_size smaller than the kernel itself")
    return BzImage(header, kernel)

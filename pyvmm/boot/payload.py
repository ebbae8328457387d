"""The compressed kernel inside a bzImage, decompressed on the host.

A bzImage is a small decompressor plus a compressed vmlinux.  Since boot
protocol 2.08 its setup header says where that payload is (payload_offset,
from the start of the protected-mode code, and payload_length).  In the guest
the decompressor unpacks it, loads the ELF's segments at their physical
addresses and jumps to the kernel's 64-bit entry (startup_64) with RSI at the
zero page.  On KVM PVM that decompressor runs in emulated ring 0 (a third of an
LZ4 kernel's boot; minutes for Debian's XZ kernel), and even on hardware it
costs tens of milliseconds of every boot: the host does the same work with a
native library in a fraction of that.

Every payload ends in the uncompressed size, little-endian 32 bits (the
kernel's `size_append`, or gzip's own ISIZE trailer): it bounds what we
decompress.  Libraries, by format (the kernel's magic numbers, lib/decompress.c):
  gzip, xz, lzma, bzip2  the standard library (zlib, lzma, bz2);
  lz4 (legacy frame)     python-lz4's block API (PyPI `lz4`): the legacy frame is
                         only a sequence of sized LZ4 blocks, which it decodes;
  zstd                   python-zstandard (PyPI `zstandard`), the zstd project's
                         reference binding.
Both PyPI packages are maintained bindings of the reference C libraries, with
wheels, and are imported only when a kernel of that format is booted.
"""
from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.boot.bzimage import BzImage
from pyvmm.boot.errors import BootError

PAYLOAD_PROTOCOL = 0x0208        # boot.rst: payload_offset/payload_length since 2.08
HDR_PAYLOAD_OFFSET = 0x248
HDR_PAYLOAD_LENGTH = 0x24C
SIZE_TRAILER = 4                 # the uncompressed size, appended to every payload
# lz4 legacy frame (lz4's doc/lz4_Frame_format.md, "Legacy frame"): a magic, then
# blocks of [u32 compressed size][data], each decompressing to at most 8 MiB.
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20
READ_CHUNK = 8 << 20
# The largest decompressed kernel we accept: Debian's is ~60 MiB; an allyesconfig
# vmlinux.bin a few hundred.  Bounds a hostile payload's output before the guest RAM does.
MAX_DECOMPRESSED = 1 << 30

# lib/decompress.c's compressed_formats, in the order it tries them
MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\x1f\x9e", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00", "lzma"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x89LZO", "lzo"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


class PayloadError(BootError):
    """The payload cannot be decompressed on the host; .fallback says whether the
    in-guest decompressor may still manage (an unsupported format) or not (corrupt)."""

    def __init__(self, message: str, fallback: bool):
        super().__init__(message)
        self.fallback = fallback


@dataclass(frozen=True)
class Payload:
    compression: str
    data: bytes                  # the compressed stream, trailer included
    size: int                    # the uncompressed size its trailer states


def payload_of(image: BzImage, data: bytes) -> Payload:
    """The compressed kernel a bzImage carries; a PayloadError if it has none we can use."""
    header = image.header
    if header.version < PAYLOAD_PROTOCOL:
        raise PayloadError("its boot protocol predates payload_offset (2.08)", fallback=True)
    offset, length = struct.unpack_from("<II", data, HDR_PAYLOAD_OFFSET)
    start = header.setup_size + offset
    if length == 0:
        raise PayloadError("its header gives no payload (payload_length is 0)", fallback=True)
    if length <= SIZE_TRAILER or start + length > len(data):
        raise PayloadError(f"its payload ({length} bytes at {start:#x}) lies outside the "
                           f"{len(data)}-byte file: the bzImage is truncated or corrupt",
                           fallback=False)
    blob = bytes(data[start:start + length])
    compression = next((name for magic, name in MAGICS if blob.startswith(magic)), None)
    if compression is None:
        raise PayloadError(f"its payload starts with {blob[:6].hex()}, not a compression "
                           "format Linux uses", fallback=True)
    (size,) = struct.unpack_from("<I", blob, length - SIZE_TRAILER)
    return Payload(compression, blob, size)


def decompress(payload: Payload, limit: int = MAX_DECOMPRESSED) -> bytes:
    """The payload's contents (the kernel's vmlinux.bin, relocations after it), checked
    against the size its trailer states; at most limit bytes are ever produced."""
    decoder = DECODERS.get(payload.compression)
    if decoder is None:
        raise PayloadError(f"pyvmm cannot decompress {payload.compression} on the host",
                           fallback=True)
    if payload.size > limit:
        raise PayloadError(f"its payload says it holds {payload.size >> 20} MiB, more than "
                           f"the {limit >> 20} MiB pyvmm accepts", fallback=False)
    try:
        out = decoder(payload.data, payload.size)
    except PayloadError:
        raise
    except (OSError, ValueError, EOFError, lzma.LZMAError, zlib.error, RuntimeError) as exc:
        raise PayloadError(f"its {payload.compression} payload is corrupt ({exc})",
                           fallback=False) from None
    except Exception as exc:  # noqa: BLE001 - the bindings raise their own error types
        raise PayloadError(f"its {payload.compression} payload is corrupt "
                           f"({type(exc).__name__}: {exc})", fallback=False) from None
    if len(out) != payload.size:
        raise PayloadError(f"its {payload.compression} payload decompressed to {len(out)} "
                           f"bytes, not the {payload.size} its trailer states: it is truncated "
                           "or corrupt", fallback=False)
    return out


def _bounded(decompressor, data: bytes, size: int) -> bytes:
    """zlib/lzma/bz2 decompressor objects: at most size bytes, and the stream must end."""
    out = decompressor.decompress(data, size + 1)
    if len(out) > size:
        raise PayloadError(f"the payload holds more than the {size} bytes its trailer states",
                           fallback=False)
    if not decompressor.eof:
        raise PayloadError("the payload's compressed stream ends early: it is truncated",
                           fallback=False)
    return out


def _gzip(data: bytes, size: int) -> bytes:
    # gzip's ISIZE is the trailer: the stream includes it
    return _bounded(zlib.decompressobj(16 + zlib.MAX_WBITS), data, size)


def _xz(data: bytes, size: int) -> bytes:
    return _bounded(lzma.LZMADecompressor(lzma.FORMAT_XZ), data[:-SIZE_TRAILER], size)


def _lzma(data: bytes, size: int) -> bytes:
    return _bounded(lzma.LZMADecompressor(lzma.FORMAT_ALONE), data[:-SIZE_TRAILER], size)


def _bzip2(data: bytes, size: int) -> bytes:
    return _bounded(bz2.BZ2Decompressor(), data[:-SIZE_TRAILER], size)


def _zstd(data: bytes, size: int) -> bytes:
    import zstandard
    # The kernel compresses with `zstd -22 --ultra`: windows up to 2^27 bytes.
    reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
        data[:-SIZE_TRAILER], read_across_frames=False)
    out = bytearray()
    while len(out) <= size:                   # read() may return less than asked
        chunk = reader.read(min(READ_CHUNK, size + 1 - len(out)))
        if not chunk:
            break
        out += chunk
    if len(out) > size:
        raise PayloadError(f"the payload holds more than the {size} bytes its trailer states",
                           fallback=False)
    return bytes(out)


def _lz4(data: bytes, size: int) -> bytes:
    import lz4.block
    body = memoryview(data)[:-SIZE_TRAILER]
    if len(body) < 4 or struct.unpack_from("<I", body)[0] != LZ4_LEGACY_MAGIC:
        raise PayloadError("its lz4 payload is not in the legacy frame format Linux uses",
                           fallback=True)
    out = bytearray()
    offset = 4
    while offset < len(body):
        if offset + 4 > len(body):
            raise PayloadError("its lz4 payload ends inside a block header: it is truncated",
                               fallback=False)
        (block_size,) = struct.unpack_from("<I", body, offset)
        offset += 4
        if block_size == LZ4_LEGACY_MAGIC:      # concatenated legacy frames
            continue
        if offset + block_size > len(body):
            raise PayloadError("its lz4 payload ends inside a block: it is truncated",
                               fallback=False)
        room = min(LZ4_LEGACY_BLOCK, size + 1 - len(out))
        if room <= 0:
            raise PayloadError(f"the payload holds more than the {size} bytes its trailer "
                               "states", fallback=False)
        out += lz4.block.decompress(bytes(body[offset:offset + block_size]),
                                    uncompressed_size=room)
        offset += block_size
    return bytes(out)


DECODERS: dict[str, Callable[[bytes, int], bytes]] = {
    "gzip": _gzip, "xz": _xz, "lzma": _lzma, "bzip2": _bzip2, "zstd": _zstd, "lz4": _lz4,
}

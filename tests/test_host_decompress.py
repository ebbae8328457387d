"""Host-side decompression of a bzImage's kernel (pyvmm.boot.payload, .kernel_cache
and the loader's bzImage path), with synthetic bzImages that carry a real compressed
ELF in each format Linux uses, the built-in guest's own bzImage where it is built,
and hostile payloads.  No KVM: the loader writes into a GuestMemory."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct

import lz4.block
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.boot.bzimage import STARTUP_64_OFFSET, parse_bzimage
from pyvmm.boot.errors import BootError
from pyvmm.boot.kernel_cache import KernelCache, bzimage_key
from pyvmm.boot.loader import KERNEL_NOTICE, load_linux
from pyvmm.boot.payload import (HDR_PAYLOAD_LENGTH, HDR_PAYLOAD_OFFSET, LZ4_LEGACY_MAGIC,
                                PayloadError, decompress, payload_of)
from pyvmm.layout import CMDLINE_START, HIMEM_START, ZERO_PAGE_START
from pyvmm.memory import MiB, GuestMemory
from tests.framework.images import make_bzimage, pvh_elf

LOAD_ADDR = 0x1000000                   # LOAD_PHYSICAL_ADDR, the header's pref_address
ENTRY = LOAD_ADDR + 0x40
CODE = bytes(range(256)) * 64           # 16 KiB the test recognises in guest RAM


def vmlinux(paddr: int = LOAD_ADDR, entry: int = ENTRY, code: bytes = CODE) -> bytes:
    """A vmlinux.bin as the kernel's payload holds it: an ELF, relocations after it."""
    return pvh_elf(code, paddr, entry, pvh_note=False) + b"RELOCS" * 10


def _size(data: bytes) -> bytes:
    return struct.pack("<I", len(data))        # the kernel's size_append


def lz4_legacy(data: bytes, block: int = 8 << 20) -> bytes:
    out = struct.pack("<I", LZ4_LEGACY_MAGIC)
    for i in range(0, len(data), block):
        chunk = lz4.block.compress(data[i:i + block], store_size=False)
        out += struct.pack("<I", len(chunk)) + chunk
    return out


# What arch/x86/boot/compressed/Makefile does for each CONFIG_KERNEL_*.
COMPRESSORS = {
    "gzip": lambda d: gzip.compress(d, mtime=0),                    # ISIZE is the trailer
    "xz": lambda d: lzma.compress(d, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + _size(d),
    "lzma": lambda d: lzma.compress(d, lzma.FORMAT_ALONE) + _size(d),
    "bzip2": lambda d: bz2.compress(d) + _size(d),
    # the zstd tool writes a content checksum unless told not to
    "zstd": lambda d: zstandard.ZstdCompressor(level=19, write_checksum=True).compress(d)
    + _size(d),
    "lz4": lambda d: lz4_legacy(d) + _size(d),
}


def compressed_bzimage(payload: bytes, pref_address: int = LOAD_ADDR,
                       version: int = 0x020F) -> bytes:
    """make_bzimage()'s valid header, its protected-mode part a stand-in decompressor
    (`hlt` bytes) followed by payload, which payload_offset/length point at."""
    stub = 4096
    image = bytearray(make_bzimage(kernel_size=stub, version=version,
                                   init_size=stub + 2 * len(payload) + 4 * MiB))
    setup_size = len(image) - stub
    struct.pack_into("<II", image, HDR_PAYLOAD_OFFSET, stub, len(payload))
    struct.pack_into("<Q", image, 0x258, pref_address)
    image += payload + bytes(-len(payload) % 16)     # build.c pads to whole paragraphs
    struct.pack_into("<I", image, 0x1F4, (len(image) - setup_size) // 16)   # syssize
    return bytes(image)


@pytest.fixture()
def memory():
    mem = GuestMemory.x86(64 * MiB)
    yield mem
    mem.close()


@pytest.fixture()
def cache(tmp_path):
    return KernelCache(tmp_path / "cache")


def _load(tmp_path, memory, data: bytes, cache=None, host_decompress=True, initrd=b""):
    path = tmp_path / "bzImage"
    path.write_bytes(data)
    initrd_path = None
    if initrd:
        initrd_path = tmp_path / "initrd"
        initrd_path.write_bytes(initrd)
    return load_linux(memory, path, initrd_path, "console=ttyS0", 1,
                      host_decompress=host_decompress, cache=cache)


@pytest.mark.parametrize("compression", COMPRESSORS)
def test_each_format_is_decompressed_and_loaded_where_its_decompressor_would(
        tmp_path, memory, compression):
    image = compressed_bzimage(COMPRESSORS[compression](vmlinux()))
    loaded = _load(tmp_path, memory, image, initrd=b"INITRD" * 100)
    assert loaded.decompression == "host"
    assert loaded.kernel_notice.startswith(f"{KERNEL_NOTICE}{compression} payload "
                                           "decompressed on the host")
    # the ELF's segment at its p_paddr, entered at e_entry in the 64-bit boot protocol
    assert memory.read(LOAD_ADDR, len(CODE)) == CODE
    assert loaded.entry.rip == ENTRY and not loaded.entry.pvh
    assert loaded.kernel_end == LOAD_ADDR + len(CODE)
    # nothing of the bzImage itself at 1 MiB; the zero page as for any bzImage
    assert memory.read(HIMEM_START, 4) == b"\0" * 4
    assert memory.read(ZERO_PAGE_START + 0x202, 4) == b"HdrS"
    assert memory.read_int(ZERO_PAGE_START + 0x228, 4) == CMDLINE_START
    assert memory.read_int(ZERO_PAGE_START + 0x218, 4) == loaded.initrd_addr
    assert loaded.initrd_addr >= loaded.kernel_end
    assert memory.read(loaded.initrd_addr, 6) == b"INITRD"


def test_bss_is_zeroed(tmp_path, memory):
    memory.write(LOAD_ADDR + len(CODE), b"\xAA" * 4096)
    elf = bytearray(vmlinux())
    # p_memsz (program header 0 at 64, field at +40) past p_filesz: a bss
    struct.pack_into("<Q", elf, 64 + 40, len(CODE) + 4096)
    _load(tmp_path, memory, compressed_bzimage(COMPRESSORS["gzip"](bytes(elf))))
    assert memory.read(LOAD_ADDR + len(CODE), 4096) == b"\0" * 4096


def test_lz4_with_several_blocks(tmp_path, memory):
    data = vmlinux(code=os.urandom(300_000))
    image = compressed_bzimage(lz4_legacy(data, block=64 * 1024) + _size(data))
    assert _load(tmp_path, memory, image).decompression == "host"


def test_the_second_boot_comes_from_the_cache(tmp_path, memory, cache):
    image = compressed_bzimage(COMPRESSORS["xz"](vmlinux()))
    first = _load(tmp_path, memory, image, cache)
    assert first.decompression == "host" and "; not cached" not in first.kernel_notice
    assert cache.path(bzimage_key(image)).read_bytes() == vmlinux()
    memory.fill(LOAD_ADDR, len(CODE))
    second = _load(tmp_path, memory, image, cache)
    assert second.decompression == "cache"
    assert second.kernel_notice.startswith(f"{KERNEL_NOTICE}decompressed kernel from the cache")
    assert memory.read(LOAD_ADDR, len(CODE)) == CODE and second.entry == first.entry


def test_a_damaged_cache_entry_is_replaced(tmp_path, memory, cache):
    image = compressed_bzimage(COMPRESSORS["gzip"](vmlinux()))
    cache.directory.mkdir()
    cache.path(bzimage_key(image)).write_bytes(b"not an ELF at all")
    loaded = _load(tmp_path, memory, image, cache)
    assert loaded.decompression == "host"
    assert cache.path(bzimage_key(image)).read_bytes() == vmlinux()


def test_an_unwritable_cache_only_costs_the_decompression(tmp_path, memory):
    blocker = tmp_path / "file"
    blocker.write_text("")
    loaded = _load(tmp_path, memory, compressed_bzimage(COMPRESSORS["gzip"](vmlinux())),
                   KernelCache(blocker / "cache"))
    assert loaded.decompression == "host" and "not cached: cannot write" in loaded.kernel_notice


def test_the_cache_is_bounded_least_recently_used_first(tmp_path):
    cache = KernelCache(tmp_path / "c", max_bytes=3000)
    for i, key in enumerate("abc"):
        assert cache.put(key, bytes(1000)) is None
        os.utime(cache.path(key), (1000 + i, 1000 + i))
    assert cache.get("a", 10_000) == bytes(1000)     # a use: "a" is now the most recent
    cache.put("d", bytes(1000))
    assert sorted(p.name[0] for p in cache.directory.iterdir()) == ["a", "c", "d"]
    assert cache.put("big", bytes(4000)).startswith("larger than the cache")


def test_the_environment_chooses_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_KERNEL_CACHE", "off")
    assert KernelCache.from_environment() is None
    monkeypatch.setenv("PYVMM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("PYVMM_KERNEL_CACHE_MAX_MB", "5")
    assert KernelCache.from_environment() == KernelCache(tmp_path, 5 * MiB)
    monkeypatch.delenv("PYVMM_KERNEL_CACHE")
    monkeypatch.delenv("PYVMM_CACHE", raising=False)
    monkeypatch.delenv("HOME")
    monkeypatch.setattr("pwd.getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    assert KernelCache.from_environment() is None      # a jail: no home to cache in
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    assert KernelCache.from_environment().directory == tmp_path / "decompressed"


def test_turned_off_the_bzimage_decompresses_itself(tmp_path, memory):
    image = compressed_bzimage(COMPRESSORS["xz"](vmlinux()))
    loaded = _load(tmp_path, memory, image, host_decompress=False)
    assert loaded.decompression == "guest"
    assert loaded.kernel_notice == f"{KERNEL_NOTICE}decompressing in the guest (--no-host-decompress)"
    assert loaded.entry.rip == HIMEM_START + STARTUP_64_OFFSET
    assert memory.read(HIMEM_START, 4) == b"\xf4" * 4
    assert memory.read(LOAD_ADDR, 16) == b"\0" * 16


# Kernels the host path cannot take: the guest decompresses them, and one line says why.
FALLBACKS = {
    "lzo": (lambda: compressed_bzimage(b"\x89LZO\0" + bytes(100) + _size(bytes(200))),
            "cannot decompress lzo"),
    "unknown": (lambda: compressed_bzimage(b"\x00\x01\x02\x03" * 64), "not a compression format"),
    "no payload fields": (lambda: make_bzimage(), "gives no payload"),
    "not an elf": (lambda: compressed_bzimage(COMPRESSORS["gzip"](b"MZ" + bytes(5000))),
                   "not a loadable ELF"),
    "linked elsewhere": (lambda: compressed_bzimage(COMPRESSORS["gzip"](vmlinux()),
                                                    pref_address=0x2000000),
                         "linked at 0x1000000, not at the address its header asks for"),
    "entry outside": (lambda: compressed_bzimage(COMPRESSORS["gzip"](vmlinux(entry=0x5000))),
                      "entry point 0x5000 is not inside"),
    "below 1 MiB": (lambda: compressed_bzimage(COMPRESSORS["gzip"](
        vmlinux(paddr=0x10000, entry=0x10000)), pref_address=0x10000), "outside the 1 MiB"),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_kernels_the_host_cannot_take_decompress_in_the_guest(tmp_path, memory, case):
    build, reason = FALLBACKS[case]
    loaded = _load(tmp_path, memory, build())
    assert loaded.decompression == "guest"
    assert loaded.entry.rip == HIMEM_START + STARTUP_64_OFFSET
    notice = loaded.kernel_notice
    assert notice.startswith(f"{KERNEL_NOTICE}decompressing in the guest: ") and \
        reason in notice and "\n" not in notice, notice


def _corrupt(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 64]) + data[middle + 64:]


# Payloads that are damaged: the guest's decompressor would fail on them too, so the
# boot fails at once with one line (and --no-host-decompress to try anyway).
# An lz4 legacy frame has no checksum: a flipped literal byte inside it is invisible to
# any decompressor, the kernel's included, so "corrupt" is not a case for it.
DAMAGES = [(c, d) for c in COMPRESSORS for d in ("truncated", "corrupt", "wrong size")
           if (c, d) != ("lz4", "corrupt")]


@pytest.mark.parametrize("compression, damage", DAMAGES)
def test_damaged_payloads_fail_with_one_line(tmp_path, memory, compression, damage):
    data = vmlinux(code=os.urandom(20_000))
    payload = COMPRESSORS[compression](data)
    if damage == "truncated":
        payload = payload[:len(payload) * 2 // 3] + _size(data)
    elif damage == "corrupt":
        payload = _corrupt(payload)
    else:
        payload = payload[:-4] + struct.pack("<I", len(data) - 100)
    with pytest.raises(BootError) as error:
        _load(tmp_path, memory, compressed_bzimage(payload))
    message = str(error.value)
    assert "\n" not in message and "bzImage" in message and \
        "--no-host-decompress" in message, message


# A payload larger than guest RAM is refused before it is decompressed; one that
# decompresses but whose kernel does not fit asks for more memory.
TOO_BIG = {"payload": (24, 30, "zstd", "more than the 24 MiB"),
           "kernel": (20, 6, "gzip", "give the VM more memory")}


@pytest.mark.parametrize("case", TOO_BIG)
def test_a_kernel_too_big_for_guest_ram_is_refused(tmp_path, case):
    ram_mib, code_mib, compression, message = TOO_BIG[case]
    small = GuestMemory.x86(ram_mib * MiB)
    try:
        data = vmlinux(code=bytes(code_mib * MiB))
        with pytest.raises(BootError, match=message):
            _load(tmp_path, small, compressed_bzimage(COMPRESSORS[compression](data)))
    finally:
        small.close()


# A hostile bzImage: any payload_offset/length and any bytes where its payload is.
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, (1 << 32) - 1), length=st.integers(0, (1 << 32) - 1),
       head=st.sampled_from([b"", b"\x1f\x8b", b"BZh", b"\x5d\x00", b"\xfd7zXZ\x00",
                             b"\x02\x21\x4c\x18", b"\x28\xb5\x2f\xfd", b"\x89LZO"]),
       body=st.binary(max_size=400), keep_lengths=st.booleans())
def test_hostile_payload_headers_fail_or_fall_back_cleanly(tmp_path, memory, offset, length,
                                                           head, body, keep_lengths):
    payload = head + body
    image = bytearray(compressed_bzimage(payload))
    if not keep_lengths:
        struct.pack_into("<II", image, HDR_PAYLOAD_OFFSET, offset, length)
    try:
        loaded = _load(tmp_path, memory, bytes(image), KernelCache(tmp_path / "c"))
    except BootError as error:
        assert "\n" not in str(error) and str(tmp_path / "bzImage") in str(error)
    else:
        assert loaded.decompression in ("guest", "host")
        assert memory.contains(loaded.entry.rip, 1)


@given(data=st.binary(max_size=2000))
@settings(max_examples=200, deadline=None)
def test_decoders_raise_only_payload_errors(data):
    for compression in COMPRESSORS:
        try:
            decompress(payload_of_bytes(compression, data), limit=1 << 20)
        except PayloadError:
            pass


def payload_of_bytes(compression: str, data: bytes):
    from pyvmm.boot.payload import Payload
    return Payload(compression, data + _size(bytes(1000)), 1000)


def test_the_built_in_bzimage_decompresses_on_the_host(guest, tmp_path):
    """The built-in guest's real LZ4 bzImage: its vmlinux is what its own build left."""
    data = guest.bzimage.read_bytes()
    payload = payload_of(parse_bzimage(data), data)
    assert payload.compression == "lz4"
    kernel = decompress(payload)
    assert kernel[:4] == b"\x7fELF" and len(kernel) == payload.size
    memory = GuestMemory.x86(256 * MiB)
    try:
        loaded = load_linux(memory, guest.bzimage, None, "console=ttyS0", 1,
                            cache=KernelCache(tmp_path))
        assert loaded.decompression == "host" and loaded.entry.rip == LOAD_ADDR
    finally:
        memory.close()

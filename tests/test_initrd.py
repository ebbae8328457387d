"""The initrd a user brings (issue 13): its format by magic, one clear line before the
boot when the built-in kernel cannot unpack it, a panic message that names the format
when another kernel could not, and real boots of compressed busybox initramfs images."""
from __future__ import annotations

import gzip
import lzma
import re
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm import builtin_guest
from pyvmm.boot import initrd as initrd_mod
from pyvmm.boot.errors import BootError
from pyvmm.boot.initrd import CPIO, UNKNOWN, detect_format, inspect, panic_hint
from pyvmm.boot.loader import load_linux
from pyvmm.memory import MiB, GuestMemory
from pyvmm.pvm import is_pvm_host
from tests.framework.images import make_bzimage


def newc(files: dict[str, bytes]) -> bytes:
    """A newc cpio archive of regular files, with its trailer (as `cpio -o -H newc`)."""
    out = b""
    for ino, (name, data) in enumerate(list(files.items()) + [("TRAILER!!!", None)], 1):
        mode = 0 if data is None else 0o100755
        data = data or b""
        nb = name.encode() + b"\0"
        out += ("070701" + "".join("%08X" % v for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))).encode()
        out += nb + b"\0" * (-(110 + len(nb)) % 4) + data + b"\0" * (-len(data) % 4)
    return out


CPIO_BYTES = newc({"init": b"#!/bin/sh\necho hi\n"})

# -- format detection --------------------------------------------------------------------

MAGIC_SAMPLES = {
    "cpio": [b"070701", b"070702"],
    "odc cpio": [b"070707"],
    "gzip": [b"\x1f\x8b\x08\x00", b"\x1f\x9e"],
    "zstd": [b"\x28\xb5\x2f\xfd\x04\x58"],
    "xz": [b"\xfd7zXZ\x00\x00\x01"],
    "lz4": [b"\x02\x21\x4c\x18"],
    "lz4 frame": [b"\x04\x22\x4d\x18"],
    "lzma": [b"\x5d\x00\x00\x80\x00"],
    "bzip2": [b"BZh91AY&SY"],
    "lzo": [b"\x89LZO\x00\r\n"],
    UNKNOWN: [b"", b"\x7fELF", b"INITRD", b"hsqs", b"0707"],
}


@pytest.mark.parametrize("fmt,head", [(f, h) for f, heads in MAGIC_SAMPLES.items()
                                      for h in heads])
def test_each_magic_is_recognised(fmt, head):
    assert detect_format(head + b"\xaa" * 8) == fmt


@given(st.binary(max_size=512))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_crash_the_detector(data):
    info = inspect(data)
    assert info.segments and info.format in {f for f in MAGIC_SAMPLES}


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=len(CPIO_BYTES)))
@settings(max_examples=300, deadline=None)
def test_a_cpio_with_a_damaged_or_random_tail_never_crashes(tail, cut):
    info = inspect(CPIO_BYTES[:cut] + tail)
    assert info.segments


def test_real_compressors_are_recognised_and_looked_into():
    assert inspect(CPIO_BYTES) == initrd_mod.InitrdInfo((CPIO,))
    assert inspect(gzip.compress(CPIO_BYTES)).format == "gzip"
    assert inspect(lzma.compress(CPIO_BYTES)).format == "xz"
    assert inspect(lzma.compress(CPIO_BYTES, format=lzma.FORMAT_ALONE)).format == "lzma"
    for info in (inspect(gzip.compress(CPIO_BYTES)), inspect(lzma.compress(CPIO_BYTES))):
        assert info.problem is None and info.compression in ("gzip", "xz")


def test_segments_after_an_uncompressed_cpio_count():
    """Debian's initrd.img: a microcode cpio, zero padding, then the compressed one."""
    info = inspect(CPIO_BYTES + b"\0" * 12 + gzip.compress(CPIO_BYTES))
    assert info.segments == (CPIO, "gzip") and info.format == "gzip"


def test_a_compressed_non_cpio_and_a_truncated_cpio_are_problems():
    assert "no cpio archive" in inspect(gzip.compress(b"\0" * 1024 + b"ext2")).problem
    assert "does not decompress" in inspect(b"\x1f\x8b\x08\x00garbage-garbage").problem
    assert "truncated" in inspect(newc({"big": b"x" * 4000})[:1000]).problem


# -- the built-in kernel refuses what it cannot unpack, before the boot ---------------------

@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """A built-in guest whose kernel is a stub bzImage and whose config has gzip and zstd."""
    paths = builtin_guest.GuestPaths.in_dir(tmp_path / "guest")
    paths.bzimage.parent.mkdir()
    paths.bzimage.write_bytes(make_bzimage())
    (paths.bzimage.parent / "config").write_text("CONFIG_RD_GZIP=y\nCONFIG_RD_ZSTD=y\n"
                                                 "# CONFIG_RD_BZIP2 is not set\n")
    monkeypatch.setattr(builtin_guest, "find_guest", lambda: paths)
    return paths


@pytest.fixture
def memory():
    mem = GuestMemory.x86(64 * MiB)
    yield mem
    mem.close()


def _load(memory, kernel, tmp_path, data: bytes, name: str = "initrd"):
    path = tmp_path / name
    path.write_bytes(data)
    return load_linux(memory, kernel, path, "console=ttyS0", 1)


@pytest.mark.parametrize("data,message", [
    (b"BZh91AY&SY" + b"\0" * 64,
     "initrd {p} is bzip2-compressed, which the built-in kernel cannot unpack: recompress "
     "it with gzip or zstd"),
    (lzma.compress(CPIO_BYTES),
     "initrd {p} is xz-compressed, which the built-in kernel cannot unpack: recompress it "
     "with gzip or zstd"),
    (b"\x04\x22\x4d\x18" + b"\0" * 64,
     "initrd {p} is lz4-compressed in the frame format, which Linux cannot unpack: compress "
     "it with `lz4 -l` (the legacy format), gzip or zstd"),
    (b"070707" + b"0" * 200,
     "initrd {p} is an old-format (odc, 070707) cpio archive, which Linux cannot unpack: "
     "rebuild it with `cpio -o -H newc`"),
    (b"this is not an initramfs\n" * 40,
     "initrd {p} is not an initramfs (a newc cpio archive, plain or compressed with gzip, "
     "zstd): make one with `find . | cpio -o -H newc | gzip`"),
])
def test_the_builtin_kernel_refuses_in_one_line(fake_builtin, memory, tmp_path, data, message,
                                                monkeypatch):
    monkeypatch.setattr("pyvmm.pvm.is_pvm_host", lambda: False)
    with pytest.raises(BootError) as err:
        _load(memory, fake_builtin.bzimage, tmp_path, data)
    assert str(err.value) == message.format(p=tmp_path / "initrd")
    assert "\n" not in str(err.value)


def test_the_builtin_kernel_takes_what_it_can_unpack(fake_builtin, memory, tmp_path,
                                                     monkeypatch):
    monkeypatch.setattr("pyvmm.pvm.is_pvm_host", lambda: False)
    for data, fmt in ((CPIO_BYTES, "cpio"), (gzip.compress(CPIO_BYTES), "gzip"),
                      (b"\x28\xb5\x2f\xfd" + b"\0" * 64, "zstd")):
        assert _load(memory, fake_builtin.bzimage, tmp_path, data).initrd_format == fmt


def test_zstd_is_refused_on_kvm_pvm(fake_builtin, memory, tmp_path, monkeypatch):
    """Linux's zstd runs BMI2 instructions (shlx) there, which KVM's emulator cannot."""
    monkeypatch.setattr("pyvmm.pvm.is_pvm_host", lambda: True)
    with pytest.raises(BootError, match=r"bzip2-compressed, .*: recompress it with gzip$"):
        _load(memory, fake_builtin.bzimage, tmp_path, b"BZh91AY&SY" + b"\0" * 64)
    with pytest.raises(BootError) as err:
        _load(memory, fake_builtin.bzimage, tmp_path, b"\x28\xb5\x2f\xfd" + b"\0" * 64)
    assert str(err.value) == (
        f"initrd {tmp_path / 'initrd'} is zstd-compressed, and on this KVM PVM host the guest "
        f"kernel's zstd decompressor runs BMI2 instructions that KVM cannot emulate: "
        f"recompress it with gzip (or leave it uncompressed)")


def test_a_foreign_kernel_takes_anything_and_the_format_is_recorded(fake_builtin, memory,
                                                                       tmp_path):
    kernel = tmp_path / "other-bzImage"
    kernel.write_bytes(make_bzimage())
    loaded = _load(memory, kernel, tmp_path, b"BZh91AY&SY" + b"\0" * 64)
    assert loaded.initrd_format == "bzip2"
    assert _load(memory, kernel, tmp_path, b"INITRD" * 10).initrd_format == UNKNOWN


def test_a_large_compressed_initrd_on_pvm_gets_one_line(fake_builtin, memory, tmp_path,
                                                        monkeypatch, caplog):
    monkeypatch.setattr("pyvmm.pvm.is_pvm_host", lambda: True)
    big = b"\x1f\x8b\x08\x00" + b"\0" * (5 * MiB)
    with caplog.at_level("WARNING", logger="pyvmm.boot.initrd"):
        _load(memory, fake_builtin.bzimage, tmp_path, CPIO_BYTES)          # small: nothing
        assert not caplog.records
        info = initrd_mod.check_initrd(big, tmp_path / "big.gz", tmp_path / "other")
    [record] = caplog.records
    assert info.notice == record.getMessage() == (
        f"pyvmm: initrd {tmp_path / 'big.gz'} is 5.0 MiB of gzip: on this KVM PVM host the "
        f"guest kernel decompresses it at emulated speed (gzip ~40 s per MB, xz or lzma "
        f"minutes); an uncompressed cpio boots faster")


# -- a foreign kernel's panic names the format ----------------------------------------------

VFS_PANIC = (b"Kernel panic - not syncing: VFS: Unable to mount root fs on "
             b"unknown-block(0,0)\r\n")


def test_the_panic_names_the_missing_decompressor():
    said = b"Initramfs unpacking failed: compression method gzip not configured\r\n"
    assert panic_hint(b"Unpacking initramfs...\r\n" + said + VFS_PANIC, "gzip") == (
        "; the initramfs is gzip-compressed and the kernel lacks its decompressor "
        "(CONFIG_RD_GZIP): recompress the initramfs with one the kernel has, or leave it "
        "uncompressed")
    assert "probably lacks its decompressor (CONFIG_RD_ZSTD)" in panic_hint(VFS_PANIC, "zstd")
    assert panic_hint(b"Initramfs unpacking failed: junk within compressed archive\r\n"
                      + VFS_PANIC, "xz") == ("; the kernel could not unpack the "
                                             "xz-compressed initramfs (junk within "
                                             "compressed archive)")
    assert panic_hint(VFS_PANIC, None) == "" and panic_hint(b"other panic", "gzip") == ""
    assert panic_hint(VFS_PANIC, "cpio") == ""


# -- with KVM: LinuxVm refuses before any vCPU runs; real boots -------------------------------

@pytest.mark.kvm
def test_microvm_start_refuses_a_non_initramfs_with_the_builtin_kernel(guest, tmp_path):
    from pyvmm.microvm import MicroVM
    bad = tmp_path / "notes.txt"
    bad.write_text("not an initramfs\n" * 100)
    vm = MicroVM(initrd=bad)
    try:
        with pytest.raises(BootError, match=rf"^initrd {re.escape(str(bad))} is not an "
                                            r"initramfs \(a newc cpio archive, plain or "
                                            r"compressed with gzip, lz4, lzma, xz, zstd\)"):
            vm.start()
    finally:
        vm.close()


def _compressed_guest_initramfs(guest, tmp_path, fmt: str):
    """The built-in guest's own busybox initramfs (its /init prints PYVMM-INIT-OK),
    compressed the usual way."""
    raw = guest.initramfs.read_bytes()
    if fmt == "gzip":
        path = tmp_path / "initramfs.cpio.gz"
        path.write_bytes(gzip.compress(raw, compresslevel=6))
    else:
        assert shutil.which("zstd"), "zstd is not installed: scripts/setup installs it"
        path = tmp_path / "initramfs.cpio.zst"
        subprocess.run(["zstd", "-q", "-f", str(guest.initramfs), "-o", str(path)], check=True)
    assert inspect(path.read_bytes()).format == fmt
    return path


@pytest.mark.kvm
@pytest.mark.linux
@pytest.mark.parametrize("fmt", ["gzip", "zstd"])
def test_the_builtin_kernel_boots_a_compressed_busybox_initramfs(guest, tmp_path,
                                                                 microvm_factory, fmt):
    path = _compressed_guest_initramfs(guest, tmp_path, fmt)
    if fmt == "zstd" and is_pvm_host():              # refused before the boot: see above
        with pytest.raises(BootError, match="BMI2 instructions that KVM cannot emulate"):
            microvm_factory.boot(initrd=path)
        return
    vm = microvm_factory.boot(initrd=path)          # waits for the /init's PYVMM-INIT-OK
    assert b"Initramfs unpacking failed" not in vm.capture.tail()

"""Bad kernels, initrds, command lines and sizes: a BootError with one clear
sentence, never a traceback and never a write outside guest RAM."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pyvmm.boot.bzimage import STARTUP_64_OFFSET, parse_bzimage
from pyvmm.boot.errors import BootError
from pyvmm.boot.loader import LoadedKernel, load_linux
from pyvmm.boot.mptable import build_mptable
from pyvmm.layout import CMDLINE_START, HIMEM_START, PVH_INFO_START, ZERO_PAGE_START
from pyvmm.memory import MiB, GuestMemory
from tests.framework.images import make_bzimage, make_elf
from tests.framework.process import run_pyvmm


@pytest.fixture()
def memory():
    mem = GuestMemory.x86(32 * MiB)
    yield mem
    mem.close()


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_valid_bzimage_is_laid_out_per_the_boot_protocol(tmp_path, memory):
    kernel = _write(tmp_path, "bz", make_bzimage())
    initrd = _write(tmp_path, "initrd", b"INITRD" * 1000)
    loaded = load_linux(memory, kernel, initrd, "console=ttyS0", 2)
    assert loaded.format == "bzImage"
    assert loaded.entry.rip == HIMEM_START + 0x200 and not loaded.entry.pvh
    assert memory.read(HIMEM_START, 4) == b"\xf4" * 4
    assert memory.read(CMDLINE_START, 14) == b"console=ttyS0\0"
    assert memory.read_int(ZERO_PAGE_START + 0x228, 4) == CMDLINE_START
    assert memory.read_int(ZERO_PAGE_START + 0x218, 4) == loaded.initrd_addr
    assert memory.read_int(ZERO_PAGE_START + 0x21C, 4) == 6000
    assert memory.read(loaded.initrd_addr, 6) == b"INITRD"
    assert loaded.initrd_addr % 4096 == 0 and loaded.initrd_addr >= loaded.kernel_end
    assert memory.read(ZERO_PAGE_START + 0x202, 4) == b"HdrS"
    assert memory.read_int(ZERO_PAGE_START + 0x1E8, 1) == 2           # e820 entries


def test_a_pvh_elf_gets_a_start_info(tmp_path, memory):
    kernel = _write(tmp_path, "vmlinux", make_elf(with_pvh_note=True))
    loaded = load_linux(memory, kernel, None, "quiet", 1)
    assert loaded.format == "pvh" and loaded.entry.pvh and loaded.entry.rip == 0x1000000
    assert memory.read_int(0x6000, 4) == 0x336EC578


def test_mp_table_checksums_are_zero():
    table = build_mptable(4)
    assert table[:4] == b"_MP_" and sum(table[:16]) % 256 == 0
    length = int.from_bytes(table[16 + 4:16 + 6], "little")
    assert table[16:20] == b"PCMP" and sum(table[16:16 + length]) % 256 == 0


BAD_KERNELS = {
    "empty": (b"", "is empty"),
    "random": (os.urandom(100_000), "neither a bzImage nor an ELF"),
    "elf-without-pvh-note": (make_elf(with_pvh_note=False), "without a PVH entry note"),
    "truncated-bzimage": (make_bzimage(truncate_kernel=32 * 1024), "truncated"),
    "setup-only-bzimage": (make_bzimage()[:2560], "truncated"),
    "old-protocol": (make_bzimage(version=0x020A), "boot protocol 2.10"),
    "no-64-bit-entry": (make_bzimage(xloadflags=0), "no 64-bit entry point"),
}


@pytest.mark.parametrize("name", BAD_KERNELS)
def test_bad_kernels_are_refused_clearly(tmp_path, memory, name):
    data, message = BAD_KERNELS[name]
    with pytest.raises(BootError, match=message):
        load_linux(memory, _write(tmp_path, name, data), None, "", 1)


def test_bad_magic(tmp_path, memory):
    data = bytearray(make_bzimage())
    data[0x202:0x206] = b"XXXX"
    with pytest.raises(BootError, match="neither a bzImage"):
        load_linux(memory, _write(tmp_path, "k", bytes(data)), None, "", 1)
    with pytest.raises(BootError, match="no 'HdrS' magic"):
        parse_bzimage(bytes(data))


def test_cmdline_longer_than_the_kernel_accepts(tmp_path, memory):
    kernel = _write(tmp_path, "bz", make_bzimage(cmdline_size=255))
    with pytest.raises(BootError, match="command line is 300 bytes; this kernel accepts at most 255"):
        load_linux(memory, kernel, None, "x" * 300, 1)


def test_memory_too_small_for_kernel_and_initrd(tmp_path, memory):
    kernel = _write(tmp_path, "bz", make_bzimage(init_size=40 * MiB))
    with pytest.raises(BootError, match="give the VM more memory"):
        load_linux(memory, kernel, None, "", 1)
    small = _write(tmp_path, "bz2", make_bzimage())
    initrd = _write(tmp_path, "initrd", b"\0" * (31 * MiB))
    with pytest.raises(BootError, match="initrd .* does not fit"):
        load_linux(memory, small, initrd, "", 1)


def test_missing_initrd(tmp_path, memory):
    with pytest.raises(BootError, match="initrd .* does not exist"):
        load_linux(memory, _write(tmp_path, "bz", make_bzimage()), tmp_path / "nope", "", 1)


FUZZ_CMDLINE = "console=ttyS0"
FUZZ_INITRD = b"INITRD" * 1000


def assert_loaded_inside_guest_ram(memory: GuestMemory, loaded: LoadedKernel) -> None:
    """What a load that succeeded must have done: its entry point and every range it
    wrote (the kernel, the initrd, the command line, the zero page or PVH start
    info) lie inside guest RAM, and the boot structures point at them."""
    assert memory.contains(loaded.entry.rip, 1), f"entry {loaded.entry.rip:#x} outside RAM"
    assert HIMEM_START < loaded.kernel_end and \
        memory.contains(HIMEM_START, loaded.kernel_end - HIMEM_START), loaded
    assert loaded.initrd_size == len(FUZZ_INITRD) and loaded.initrd_addr >= loaded.kernel_end
    assert memory.contains(loaded.initrd_addr, loaded.initrd_size), loaded
    assert memory.read(loaded.initrd_addr, len(FUZZ_INITRD)) == FUZZ_INITRD
    assert loaded.cmdline == FUZZ_CMDLINE.encode() + b"\0"
    assert memory.read(CMDLINE_START, len(loaded.cmdline)) == loaded.cmdline
    if loaded.format == "bzImage":
        assert loaded.entry.rip == HIMEM_START + STARTUP_64_OFFSET == HIMEM_START + 0x200
        assert not loaded.entry.pvh
        assert memory.contains(ZERO_PAGE_START, 4096)
        assert memory.read_int(ZERO_PAGE_START + 0x228, 4) == CMDLINE_START
        assert memory.read_int(ZERO_PAGE_START + 0x218, 4) == loaded.initrd_addr
        assert memory.read_int(ZERO_PAGE_START + 0x21C, 4) == loaded.initrd_size
    else:
        assert loaded.format == "pvh" and loaded.entry.pvh
        assert memory.contains(PVH_INFO_START, 56)
        assert memory.read_int(PVH_INFO_START, 4) == 0x336EC578         # hvm_start_info magic
        assert memory.read_int(PVH_INFO_START + 24, 8) == CMDLINE_START


def assert_refused_clearly(error: BootError, path) -> None:
    """What a refusal must say: one sentence that names the file or what in it is wrong."""
    message = str(error)
    assert message.strip() and "\n" not in message, repr(message)
    assert str(path) in message or any(
        word in message for word in ("kernel", "initrd", "command line")), message


def load_or_refuse_clearly(tmp_path, memory: GuestMemory, name: str, kernel: bytes) -> None:
    """Load kernel (with an initrd and a command line): either a BootError that names
    the problem, or a load that stayed inside guest RAM."""
    path = _write(tmp_path, name, kernel)
    initrd = _write(tmp_path, "initrd", FUZZ_INITRD)
    try:
        loaded = load_linux(memory, path, initrd, FUZZ_CMDLINE, 1)
    except BootError as error:
        assert_refused_clearly(error, path)
    else:
        assert_loaded_inside_guest_ram(memory, loaded)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corruptions=st.lists(st.tuples(st.integers(0, 0x270), st.integers(0, 255)), max_size=12),
       cut=st.integers(0, 70_000))
def test_corrupted_bzimage_headers_are_refused_or_loaded_inside_guest_ram(
        tmp_path, memory, corruptions, cut):
    data = bytearray(make_bzimage())
    for offset, value in corruptions:
        data[offset] = value
    load_or_refuse_clearly(tmp_path, memory, "fuzz", bytes(data[:len(data) - cut]))


# The PVH entry point is the last four bytes of make_elf()'s image: one that points
# past guest RAM (here 0x7f000000) must be refused, not handed to the vCPU.
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corruptions=st.lists(st.tuples(st.integers(0, 240), st.integers(0, 255)), max_size=12))
@example(corruptions=[(len(make_elf(with_pvh_note=True)) - 1, 0x7F)])
def test_corrupted_elf_headers_are_refused_or_loaded_inside_guest_ram(tmp_path, memory,
                                                                      corruptions):
    data = bytearray(make_elf(with_pvh_note=True))
    for offset, value in corruptions:
        data[offset % len(data)] = value
    load_or_refuse_clearly(tmp_path, memory, "fuzz.elf", bytes(data))


CLI_CASES = {
    "empty-kernel": (["--kernel", "{empty}"], "is empty"),
    "missing-kernel": (["--kernel", "{tmp}/nope"], "does not exist"),
    "missing-initrd": (["--kernel", "{bz}", "--initrd", "{tmp}/nope"], "does not exist"),
    "bad-mem": (["--kernel", "{bz}", "--mem", "lots"], "bad memory size"),
    "tiny-mem": (["--kernel", "{bz}", "--mem", "1"], "out of range"),
    "bad-console": (["--kernel", "{bz}", "--console", "tty9"], "bad --console"),
    "too-many-cpus": (["--kernel", "{bz}", "--cpus", "99"], "out of range"),
}


@pytest.mark.kvm
@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_errors_are_one_line_without_traceback(tmp_path, case):
    args, message = CLI_CASES[case]
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "bz").write_bytes(make_bzimage())
    names = {"tmp": tmp_path, "empty": tmp_path / "empty", "bz": tmp_path / "bz"}
    argv = [a.format(**names) for a in args]
    proc = run_pyvmm("run", "--console", "none", *argv, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr

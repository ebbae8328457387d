"""Guest memory: the x86 layout and bounds checks (no KVM needed)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.memory import (GiB, GuestMemory, GuestMemoryError, MiB, MMIO_GAP_END,
                          MMIO_GAP_START, x86_layout)


def test_small_guest_is_one_region_below_the_gap():
    assert x86_layout(128 * MiB) == [(0, 128 * MiB)]


def test_large_guest_is_split_around_the_mmio_gap():
    layout = x86_layout(6 * GiB)
    assert layout == [(0, MMIO_GAP_START), (MMIO_GAP_END, 6 * GiB - MMIO_GAP_START)]
    assert sum(size for _, size in layout) == 6 * GiB


@pytest.mark.parametrize("size", [0, 4095, 1 * MiB + 1, -4096, 1 << 50])
def test_bad_sizes_are_refused_with_a_clear_message(size):
    with pytest.raises(GuestMemoryError, match="guest memory size"):
        x86_layout(size)


@pytest.fixture(scope="module")
def split_memory():
    """Two small regions with a hole between them, like RAM around the MMIO gap."""
    mem = GuestMemory([(0, 64 * 1024), (1 << 20, 64 * 1024)])
    yield mem
    mem.close()


REGIONS = [(0, 64 * 1024), (1 << 20, 64 * 1024)]


def _inside_one_region(gpa: int, length: int) -> bool:
    return any(base <= gpa and gpa + length <= base + size for base, size in REGIONS)


@settings(max_examples=400)
@given(gpa=st.one_of(st.integers(0, (1 << 20) + 70 * 1024), st.integers(-(1 << 64), 1 << 64)),
       length=st.one_of(st.integers(0, 70 * 1024), st.integers(-(1 << 33), 1 << 33)))
def test_every_access_is_inside_one_region_or_refused(split_memory, gpa, length):
    ok = length >= 0 and gpa >= 0 and (_inside_one_region(gpa, length) or
                                       (length == 0 and any(gpa == b + n for b, n in REGIONS)))
    if ok:
        data = bytes([gpa & 0xFF]) * length
        split_memory.write(gpa, data)
        assert split_memory.read(gpa, length) == data
        assert len(split_memory.view(gpa, length)) == length
    else:
        with pytest.raises(GuestMemoryError):
            split_memory.read(gpa, length)
        with pytest.raises(GuestMemoryError):
            split_memory.view(gpa, length)
        if 0 <= length <= 1 << 20:
            with pytest.raises(GuestMemoryError):
                split_memory.write(gpa, b"\xAA" * length)
        assert not split_memory.contains(gpa, length)


def test_access_across_the_hole_is_refused(split_memory):
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        split_memory.read(64 * 1024 - 4, 8)


def test_integers_round_trip(split_memory):
    split_memory.write_int(0x100, 8, 0x1122334455667788)
    assert split_memory.read(0x100, 2) == b"\x88\x77"
    assert split_memory.read_int(0x100, 8) == 0x1122334455667788


def test_memory_is_shared_with_its_memfd(split_memory):
    import os
    split_memory.write(0x2000, b"pyvmm")
    region = split_memory.regions[0]
    assert os.pread(region.memfd, 5, 0x2000) == b"pyvmm"

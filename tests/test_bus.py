"""The C address-range bus, checked against a Python model (no KVM needed)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.kvm import ffi, lib

U64 = (1 << 64) - 1


def _model_find(ranges: list[tuple[int, int]], addr: int) -> tuple[int, int] | None:
    for base, length in ranges:
        if base <= addr < base + length:
            return base, length
    return None


ranges_strategy = st.lists(
    st.tuples(st.one_of(st.integers(0, 0x10000), st.integers(0, U64)),
              st.one_of(st.integers(0, 0x100), st.integers(0, U64))),
    max_size=80)


@settings(max_examples=300)
@given(ranges=ranges_strategy, probes=st.lists(st.integers(0, U64), max_size=30))
def test_bus_add_and_find_match_the_model(ranges, probes):
    bus = ffi.new("struct pv_bus *")
    accepted: list[tuple[int, int]] = []
    for base, length in ranges:
        rc = lib.pv_bus_add(bus, base, length, lib.pv_scratch_io, ffi.NULL, b"r")
        overlaps = any(base < b + n and b < base + length for b, n in accepted)
        if length == 0 or base + length > U64:     # empty, or reaching/wrapping 2**64
            assert rc == -22
        elif len(accepted) >= lib.PV_MAX_RANGES:
            assert rc == -28
        elif overlaps:
            assert rc == -17
        else:
            assert rc == 0
            accepted.append((base, length))
    assert bus.n == len(accepted)
    bases = [bus.ranges[i].base for i in range(bus.n)]
    assert bases == sorted(bases)
    edges = [a for b, n in accepted for a in (b, b + n - 1, b + n) if a <= U64]
    for addr in probes + edges:
        index = lib.pv_bus_find(bus, addr)
        expected = _model_find(accepted, addr)
        if expected is None:
            assert index == -1
        else:
            assert (bus.ranges[index].base, bus.ranges[index].len) == expected

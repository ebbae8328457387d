"""gdb's remote protocol framing (pyvmm.gdb.protocol): no KVM needed."""
from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.errors import PyvmmError
from pyvmm.gdb import registers
from pyvmm.gdb.protocol import (MAX_PACKET, Kind, PacketReader, ProtocolError, checksum,
                                decode_body, escape, frame, parse_hex)
from pyvmm.gdb.server import parse_address
from pyvmm.kvm import debug as kdebug
from pyvmm.kvm import ffi, lib


@given(st.binary(max_size=2000))
def test_a_framed_packet_reads_back(data):
    events = PacketReader().feed(frame(escape(data)))
    assert [(e.kind, e.data) for e in events] == [(Kind.PACKET, data)]


@given(st.lists(st.binary(max_size=200), max_size=5))
def test_packets_split_anywhere_read_back(packets):
    stream = b"".join(b"+" + frame(escape(p)) for p in packets)
    reader = PacketReader()
    got = []
    for i in range(0, len(stream), 7):
        got += [e.data for e in reader.feed(stream[i:i + 7]) if e.kind == Kind.PACKET]
    assert got == packets


@given(st.binary(max_size=4000))
@settings(max_examples=300)
def test_any_bytes_never_raise_and_stay_bounded(noise):
    reader = PacketReader()
    for event in reader.feed(noise):
        assert event.kind in Kind
        assert len(event.data) <= MAX_PACKET
    assert len(reader._raw) <= 2 * MAX_PACKET + 2


def test_a_wrong_checksum_is_bad():
    good = frame(b"g")
    bad = good[:-2] + f"{(checksum(b'g') + 1) & 0xFF:02x}".encode()
    assert [e.kind for e in PacketReader().feed(bad)] == [Kind.BAD]
    assert [e.kind for e in PacketReader().feed(b"$g#zz")] == [Kind.BAD]


def test_a_huge_packet_is_dropped_as_bad_then_the_next_one_reads():
    huge = b"m" + b"0" * (3 * MAX_PACKET)
    reader = PacketReader()
    events = reader.feed(frame(huge) + frame(b"?"))
    assert [e.kind for e in events] == [Kind.BAD, Kind.PACKET]
    assert events[1].data == b"?"


def test_run_length_expands_and_is_bounded():
    assert decode_body(b"0* ") == b"0" * 4          # ' ' is 32: three more
    with pytest.raises(ProtocolError):
        decode_body(b"0*~" * 200, limit=1000)         # would grow past the limit
    with pytest.raises(ProtocolError):
        decode_body(b"*!")                            # nothing to repeat


def test_ctrl_c_and_acks_between_packets():
    kinds = [e.kind for e in PacketReader().feed(b"+-\x03" + frame(b"c"))]
    assert kinds == [Kind.ACK, Kind.NACK, Kind.INTERRUPT, Kind.PACKET]


@given(st.text(max_size=30))
def test_parse_hex_accepts_only_bounded_hex(text):
    try:
        value = parse_hex(text)
    except ProtocolError:
        return
    assert 0 <= value < 2**64 and len(text) <= 16


def test_gdb_addresses():
    assert parse_address("/tmp/g.sock") == (socket.AF_UNIX, "/tmp/g.sock")
    assert parse_address("localhost:1234") == (socket.AF_INET, ("localhost", 1234))
    assert parse_address(":1234") == (socket.AF_INET, ("127.0.0.1", 1234))
    with pytest.raises(PyvmmError):
        parse_address("host:99999")


def test_target_description_is_gdbs_amd64_layout():
    names = [r.name for r in registers.REGISTERS]
    # gdb's amd64 numbering (amd64-tdep.h): rip 16, eflags 17, st0 24, xmm0 40, mxcsr 56.
    assert (names[16], names[17], names[24], names[40], names[56]) == \
        ("rip", "eflags", "st0", "xmm0", "mxcsr")
    assert "<architecture>i386:x86-64</architecture>" in registers.TARGET_XML
    assert sum(registers.sizes()) == 16 * 8 + 8 + 4 * 7 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 8 * 8


def test_debug_abi_is_the_kernels():
    """struct kvm_guest_debug and kvm_translation as x86-64 <linux/kvm.h> lays them out
    (the extension's build checks kvm_abi.cdef against the header)."""
    assert ffi.sizeof("struct kvm_guest_debug") == 72
    assert ffi.sizeof("struct kvm_translation") == 24
    assert kdebug.KVM_SET_GUEST_DEBUG == (1 << 30) | (72 << 16) | (0xAE << 8) | 0x9B  # _IOW


def test_dr7_encoding():
    # SDM 18.2.4: slot 1, write, 4 bytes -> L1, R/W1=01, LEN1=11, plus GE and bit 10.
    slots = [None, kdebug.HwSlot(0x1000, kdebug.DR7_RW_WRITE, 4)]
    assert kdebug.dr7_for(slots) == 0x400 | 0x200 | (1 << 2) | (0b01 << 20) | (0b11 << 22)
    assert kdebug.dr7_for([kdebug.HwSlot(0x1000)]) == 0x401


@pytest.mark.parametrize("argv, message", [
    (["run", "--gdb-wait"], "--gdb-wait needs --gdb"),
    (["run", "--gdb", "localhost:99999"], "the port must be 1 to 65535"),
])
def test_gdb_flags_errors_are_one_line(argv, message):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "pyvmm", *argv], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error: ") and message in lines[0]


def test_machine_config_gdb_fields():
    from pyvmm.config import ConfigError, MachineConfig
    config = MachineConfig.from_json({"vcpu_count": 1, "mem_size_mib": 128,
                                      "gdb_socket_path": "/tmp/g.sock"})
    assert config.to_json()["gdb_socket_path"] == "/tmp/g.sock" and config.gdb_wait
    assert "gdb_socket_path" not in MachineConfig.from_json(
        {"vcpu_count": 1, "mem_size_mib": 128}).to_json()
    with pytest.raises(ConfigError):
        MachineConfig.from_json({"vcpu_count": 1, "mem_size_mib": 128, "gdb_socket_path": 1})
    with pytest.raises(ConfigError):
        MachineConfig.from_json({"vcpu_count": 1, "mem_size_mib": 128, "gdb_socket_path": ""})

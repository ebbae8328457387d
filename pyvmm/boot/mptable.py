"""The MP table (Intel MultiProcessor Specification 1.4, chapter 4).

Without ACPI, Linux finds CPUs, the IOAPIC and the ISA interrupt routing
here: it scans the EBDA for the "_MP_" floating pointer.
"""
from __future__ import annotations

import struct

from pyvmm.boot.errors import BootError
from pyvmm.layout import APIC_ADDR, EBDA_START, IOAPIC_ADDR
from pyvmm.memory import GuestMemory

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MP_SPEC_REV = 4                      # 1.4
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
IOAPIC_PINS = 24
CPU_ENABLED, CPU_BOOTPROCESSOR = 1, 2
CPU_SIGNATURE = 0x600                # family 6
CPU_FEATURES = 0x201                 # FPU | APIC
ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IOINT, ENTRY_LINT = 0, 1, 2, 3, 4
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3
MAX_CPUS = 254                       # APIC IDs 0..254, and the IOAPIC takes the next


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build_mptable(num_cpus: int, base: int = EBDA_START) -> bytes:
    if not 1 <= num_cpus <= MAX_CPUS:
        raise BootError(f"an MP table holds 1 to {MAX_CPUS} CPUs, not {num_cpus}")
    ioapic_id = num_cpus + 1
    entries = []
    for cpu in range(num_cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", ENTRY_PROCESSOR, cpu, APIC_VERSION, flags,
                                   CPU_SIGNATURE, CPU_FEATURES))
    entries.append(struct.pack("<BB6s", ENTRY_BUS, 0, b"ISA   "))
    entries.append(struct.pack("<BBBBI", ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_ADDR))
    for irq in range(IOAPIC_PINS):  # ISA IRQ n -> IOAPIC pin n, default polarity/trigger
        entries.append(struct.pack("<BBHBBBB", ENTRY_IOINT, MP_INT, 0, 0, irq, ioapic_id, irq))
    entries.append(struct.pack("<BBHBBBB", ENTRY_LINT, MP_EXTINT, 0, 0, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", ENTRY_LINT, MP_NMI, 0, 0, 0, 0xFF, 1))
    body = b"".join(entries)
    table_addr = base + 16
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", MPC_SIGNATURE, 44 + len(body),
                                   MP_SPEC_REV, 0, b"PYVMM   ", b"MICROVM     ", 0, 0,
                                   len(entries), APIC_ADDR, 0, 0, 0))
    header[7] = _checksum(bytes(header) + body)
    floating = bytearray(struct.pack("<4sIBBB5x", MPF_SIGNATURE, table_addr, 1, MP_SPEC_REV, 0))
    floating[10] = _checksum(bytes(floating))
    return bytes(floating) + bytes(header) + body


def write_mptable(memory: GuestMemory, num_cpus: int) -> None:
    memory.write(EBDA_START, build_mptable(num_cpus))

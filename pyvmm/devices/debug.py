"""Debug devices implemented in C (csrc/dev_*.c): handled with no GIL.

- DebugCon: QEMU's isa-debugcon, conventionally port 0xe9: bytes out, buffered.
- DebugExit: QEMU's isa-debug-exit, conventionally port 0xf4: a write ends the run.
- Scratch: 4 KiB that reads back what was written; the benchmark's C device.
"""
from __future__ import annotations

from pyvmm.kvm import ffi, lib
from pyvmm.machine import Bus, DeviceBinding, Machine, MachineError

DEBUGCON_PORT = 0xE9
DEBUG_EXIT_PORT = 0xF4
SCRATCH_SIZE = 4096


class DebugCon:
    def __init__(self, machine: Machine, port: int = DEBUGCON_PORT) -> None:
        state = ffi.new("struct pv_debugcon *")
        if lib.pv_debugcon_init(state) < 0:
            raise MachineError("out of memory for the debug console")
        # The machine keeps the state alive while vCPUs may write to it.
        self.state = ffi.gc(state, lib.pv_debugcon_destroy)
        self.binding = machine.add_c_device(Bus.PIO, port, 1, lib.pv_debugcon_io, self.state,
                                            "debugcon")
        self._buf = ffi.new("uint8_t[]", 4096)
        self.output = bytearray()

    def drain(self) -> bytes:
        """Moves what the guest wrote since the last call into .output and returns it."""
        chunks = []
        while n := lib.pv_debugcon_drain(self.state, self._buf, len(self._buf)):
            chunks.append(ffi.buffer(self._buf, n)[:])
        data = b"".join(chunks)
        self.output += data
        return data

    @property
    def dropped(self) -> int:
        return self.state.dropped


class DebugExit:
    def __init__(self, machine: Machine, port: int = DEBUG_EXIT_PORT,
                 mmio_base: int | None = None) -> None:
        """On port `port`, and also at MMIO `mmio_base` when given (KVM PVM ignores
        IOPL in guest ring 3, so ring-3 test guests can only exit through MMIO)."""
        self.state = ffi.new("struct pv_debugexit *")
        self.binding: DeviceBinding = machine.add_c_device(
            Bus.PIO, port, 4, lib.pv_debugexit_io, self.state, "debug-exit")
        if mmio_base is not None:
            machine.add_c_device(Bus.MMIO, mmio_base, 8, lib.pv_debugexit_io, self.state,
                                 "debug-exit-mmio")


class Scratch:
    def __init__(self, machine: Machine, bus: Bus, base: int, name: str = "scratch") -> None:
        self.state = ffi.new("struct pv_scratch *")
        self.binding = machine.add_c_device(bus, base, SCRATCH_SIZE, lib.pv_scratch_io,
                                            self.state, name)

    def read(self, offset: int, size: int) -> bytes:
        return ffi.buffer(self.state.bytes)[offset:offset + size]

    @property
    def reads(self) -> int:
        return self.state.reads

    @property
    def writes(self) -> int:
        return self.state.writes

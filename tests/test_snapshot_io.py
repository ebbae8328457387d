"""A snapshot taken while a vCPU is in the middle of a port write neither loses nor
repeats it.

KVM completes an I/O exit only when the vCPU next enters KVM_RUN: until then
(on SVM at least) RIP still points at the `out`, and a guest restored from
state saved at that moment would execute it again.  pyvmm's pause stops a
vCPU by KVM_RUN with immediate_exit set, which completes the pending exit
first, so the saved RIP is past the `out`.  The guest here writes 1, 2, 3...
to a port in a tight loop; it is paused, saved and restored into a fresh
machine over and over, and the values the port sees across all the machines
must be exactly consecutive.
"""
from __future__ import annotations

import threading
import time

import pytest

from pyvmm.machine import Bus, Machine
from pyvmm.memory import GuestMemory
from pyvmm.snapshot import memfile
from pyvmm.testbed import Mode, TinyVm, assemble

pytestmark = pytest.mark.kvm

PORT = 0x3F0
COUNTER_AT = 0x8000
GUEST = """
1:  incq 0x8000
    mov 0x8000, %rax
    mov $0x3f0, %dx
    outl %eax, %dx
    jmp 1b
"""
ROUNDS = 12


class Recorder:
    """A port that records the 32-bit values the guest writes."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self.lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            self.values.append(int.from_bytes(data, "little"))


def _run_until(recorder: Recorder, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(recorder.values) < count:
        assert time.monotonic() < deadline, "the guest stopped writing to its port"
        time.sleep(0.002)


def test_a_port_write_in_flight_is_neither_lost_nor_repeated(tmp_path):
    vm = TinyVm(Mode.LONG_RING0, irqchip=True)
    recorder = Recorder()
    vm.machine.add_device(Bus.PIO, PORT, 4, recorder, "recorder")
    vm.load(assemble(GUEST, Mode.LONG_RING0))
    machine, seen = vm.machine, []
    try:
        machine.start()
        for round_ in range(ROUNDS):
            _run_until(recorder, 50)
            machine.pause()
            state = machine.save_state()
            memfile.write_full(machine.memory, tmp_path / "mem")
            layout = machine.memory.layout
            with recorder.lock:
                seen += recorder.values
            # Paused after the write, or between the increment and the write.
            counter = machine.memory.read_int(COUNTER_AT, 8)
            assert counter - 1 <= seen[-1] <= counter, (round_, seen[-3:], counter)
            machine.close()
            with open(tmp_path / "mem", "rb") as f:
                memory = GuestMemory.from_file(layout, f.fileno())
            machine = Machine(memory=memory, irqchip=True)
            recorder = Recorder()
            machine.add_device(Bus.PIO, PORT, 4, recorder, "recorder")
            machine.restore_state(state)
            machine.start()
        _run_until(recorder, 50)
        machine.pause()
        seen += recorder.values
    finally:
        machine.close()
    assert seen == list(range(1, len(seen) + 1)), \
        next(f"value {seen[i]} after {seen[i - 1]}" for i in range(1, len(seen))
             if seen[i] != seen[i - 1] + 1)


FILL_GUEST = """
    mov $0x100000, %rdi
1:  mov %rdi, (%rdi)
    add $0x1000, %rdi
    cmp $0x140000, %rdi
    jne 1b
2:  jmp 2b
"""


def test_a_full_snapshot_of_memory_mapped_from_a_file_is_that_memory(tmp_path):
    """A VM restored from a memory file holds, page by page, the file's bytes or its own
    copy (pages written since, by the guest through KVM or by the host); a Full snapshot
    of it must hold exactly what the guest sees, holes where it is zero."""
    vm = TinyVm(Mode.LONG_RING0, irqchip=True)
    vm.load(assemble("1: incq 0x8000\n jmp 1b", Mode.LONG_RING0))
    machine = vm.machine
    machine.start()
    time.sleep(0.05)
    machine.pause()
    state, layout = machine.save_state(), machine.memory.layout
    memfile.write_full(machine.memory, tmp_path / "base")
    machine.close()
    with open(tmp_path / "base", "rb") as f:
        memory = GuestMemory.from_file(layout, f.fileno())
    restored = Machine(memory=memory, irqchip=True)
    try:
        restored.memory.write(0x200000, b"host" * 1024)          # a page the host writes
        restored.restore_state(state)
        regs = restored.vcpus[0].get_regs()
        restored.memory.write(regs["rip"], assemble(FILL_GUEST, Mode.LONG_RING0, regs["rip"]))
        restored.start()                                           # the guest writes 64 pages
        deadline = time.monotonic() + 10
        while restored.memory.read_int(0x13F000, 8) != 0x13F000:
            assert time.monotonic() < deadline, "the guest did not fill its pages"
            time.sleep(0.01)
        restored.pause()
        memfile.write_full(restored.memory, tmp_path / "again")
        expected = bytes(restored.memory.view(0, restored.memory.size))
    finally:
        restored.close()
    assert (tmp_path / "again").read_bytes() == expected
    assert expected[0x100000:0x100008] == (0x100000).to_bytes(8, "little")
    assert expected[0x200000:0x200004] == b"host"

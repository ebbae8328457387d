"""The C exit loop, driven by tiny guests: every outcome, dispatch, counters."""
from __future__ import annotations

import threading
import time

import pytest

from pyvmm.devices.debug import Scratch
from pyvmm.kvm import OutcomeKind
from pyvmm.pvm import is_pvm_host
from pyvmm.machine import Bus, MachineError, StopVcpu
from pyvmm.testbed import DEBUG_EXIT_MMIO, TEST_MMIO_BASE, Mode, TinyVm, assemble

pytestmark = pytest.mark.kvm

SCRATCH_PORT = 0x500
PY_PORT = 0x600
EXIT_VIA_PORT = """
    mov $0xf4, %dx
    out %eax, %dx
"""


class RecordingDevice:
    """A Python device: reads return a counter, writes are recorded."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.reads = 0

    def read(self, offset: int, size: int) -> bytes:
        self.reads += 1
        return (self.reads & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def run(source: str, mode: Mode = Mode.LONG_RING0, setup=None, **kwargs):
    vm = TinyVm(mode, **kwargs)
    extra = setup(vm) if setup else None
    vm.load(assemble(source, mode))
    outcome = vm.run(timeout=60)
    return vm, outcome, extra


def test_pio_writes_reach_a_c_device_and_are_counted_exactly():
    vm, outcome, scratch = run(f"""
        mov $50, %ecx
        mov ${SCRATCH_PORT}, %dx
    1:  mov %ecx, %eax
        out %al, %dx
        dec %ecx
        jnz 1b
        mov $0x2a, %eax
        {EXIT_VIA_PORT}
    """, setup=lambda vm: Scratch(vm.machine, Bus.PIO, SCRATCH_PORT))
    with vm:
        assert outcome.kind == OutcomeKind.DEVICE_STOP, outcome.describe()
        assert outcome.data == 0x2A and vm.exit_value == 0x2A
        assert outcome.device == "debug-exit"
        assert scratch.writes == 50 and scratch.read(0, 1) == b"\x01"
        stats = vm.machine.stats()
        assert stats["vcpus"][0] == {"IO": 51}
        assert stats["devices"]["scratch"] == 50
        assert stats["devices"]["debug-exit"] == 1


def test_pio_reads_come_from_a_python_device():
    device = RecordingDevice()
    vm, outcome, _ = run(f"""
        xor %ebx, %ebx
        mov $10, %ecx
        mov ${PY_PORT}, %dx
    1:  in %dx, %ax
        add %eax, %ebx
        dec %ecx
        jnz 1b
        mov %ebx, %eax
        {EXIT_VIA_PORT}
    """, setup=lambda vm: vm.machine.add_device(Bus.PIO, PY_PORT, 2, device, "counter"))
    with vm:
        assert outcome.kind == OutcomeKind.DEVICE_STOP, outcome.describe()
        assert outcome.data == sum(range(1, 11))
        assert device.reads == 10
        assert vm.machine.stats()["devices"]["counter"] == 10


def test_rep_outs_delivers_every_byte_in_order():
    vm, outcome, _ = run("""
        lea msg(%rip), %rsi
        mov $msg_end - msg, %ecx
        mov $0xe9, %dx
        rep outsb
        hlt
    msg: .ascii "hello from a tiny guest\\n"
    msg_end:
    """)
    with vm:
        assert outcome.kind == OutcomeKind.HALT, outcome.describe()
        assert vm.output == b"hello from a tiny guest\n"


@pytest.mark.parametrize("mode", [Mode.LONG_RING0, Mode.LONG_RING3])
def test_mmio_reads_and_writes_reach_c_and_python_devices(mode):
    device = RecordingDevice()

    def setup(vm):
        vm.machine.add_device(Bus.MMIO, TEST_MMIO_BASE + 0x10000, 0x1000, device, "pydev")
        return Scratch(vm.machine, Bus.MMIO, TEST_MMIO_BASE)
    vm, outcome, scratch = run(f"""
        mov ${TEST_MMIO_BASE}, %rbx
        movl $0xdeadbeef, 8(%rbx)          # C device: write...
        mov 8(%rbx), %eax                  # ...and read back
        movl %eax, 0x10010(%rbx)           # Python device: 4-byte write
        movq 0x10020(%rbx), %rcx           # Python device: 8-byte read
        mov ${DEBUG_EXIT_MMIO}, %rdx
        mov %rcx, (%rdx)
    """, mode, setup)
    with vm:
        assert outcome.kind == OutcomeKind.DEVICE_STOP, outcome.describe()
        assert scratch.read(8, 4) == bytes.fromhex("efbeadde")
        assert device.writes == [(0x10, bytes.fromhex("efbeadde"))]
        assert outcome.data == 1 and device.reads == 1
        assert vm.machine.stats()["vcpus"][0] == {"MMIO": 5}


def test_hlt_ends_the_run_with_registers():
    vm, outcome, _ = run("""
        mov $0x1234, %r12
        hlt
    """)
    with vm:
        assert outcome.kind == OutcomeKind.HALT
        assert outcome.regs["r12"] == 0x1234
        assert outcome.regs["rip"] == vm.entry + 8       # after the 7-byte mov and hlt
        assert "halt at rip=" in outcome.describe()


def test_triple_fault_is_a_shutdown():
    vm, outcome, _ = run("ud2")       # empty IDT: #UD -> #DF -> triple fault
    with vm:
        assert outcome.kind == OutcomeKind.SHUTDOWN
        assert vm.machine.stats()["vcpus"][0] == {"SHUTDOWN": 1}


def test_executing_outside_ram_is_a_clear_internal_error():
    vm, outcome, _ = run(f"""
        mov ${TEST_MMIO_BASE + 0x100000}, %rax
        jmp *%rax
    """)
    with vm:
        assert outcome.kind == OutcomeKind.INTERNAL_ERROR, outcome.describe()
        assert outcome.regs["rip"] == TEST_MMIO_BASE + 0x100000
        assert "internal error" in outcome.describe()


def test_unmapped_mmio_is_a_clear_exit_in_strict_mode():
    vm, outcome, _ = run(f"""
        mov ${TEST_MMIO_BASE + 0x200000}, %rbx
        movl $0x55, 4(%rbx)
    """)
    with vm:
        assert outcome.kind == OutcomeKind.UNHANDLED_MMIO
        assert outcome.addr == TEST_MMIO_BASE + 0x200004
        assert outcome.is_write and outcome.length == 4 and outcome.data == 0x55
        assert vm.machine.stats()["unhandled"]["mmio"] == 1


def test_unmapped_accesses_float_high_when_not_strict():
    vm, outcome, _ = run(f"""
        mov ${TEST_MMIO_BASE + 0x200000}, %rbx
        mov (%rbx), %eax          # nothing there: all ones
        mov $0x700, %dx
        in %dx, %al               # nothing there either
        mov %eax, %eax
        {EXIT_VIA_PORT}
    """, strict=False)
    with vm:
        assert outcome.kind == OutcomeKind.DEVICE_STOP
        assert outcome.data == 0xFFFFFFFF
        assert vm.machine.stats()["unhandled"] == {"pio": 1, "mmio": 1}


def test_unmapped_port_is_a_clear_exit_in_strict_mode():
    vm, outcome, _ = run("""
        mov $0x3f8, %dx
        in %dx, %al
    """)
    with vm:
        assert outcome.kind == OutcomeKind.UNHANDLED_PIO
        assert outcome.addr == 0x3F8 and not outcome.is_write and outcome.length == 1


def test_a_failing_python_handler_stops_the_vm_with_its_error():
    class Broken:
        def read(self, offset, size):
            raise RuntimeError("device exploded")

        def write(self, offset, data):
            pass
    vm, outcome, _ = run(f"""
        mov ${PY_PORT}, %dx
        in %dx, %al
    """, setup=lambda vm: vm.machine.add_device(Bus.PIO, PY_PORT, 1, Broken(), "broken"))
    with vm:
        assert outcome.kind == OutcomeKind.HANDLER_ERROR
        assert outcome.device == "broken"
        assert "device exploded" in str(vm.machine.device_error)
        assert isinstance(vm.machine.device_error.__cause__, RuntimeError)


def test_a_python_device_can_stop_its_vcpu():
    class Stopper:
        def read(self, offset, size):
            return bytes(size)

        def write(self, offset, data):
            raise StopVcpu()
    vm, outcome, _ = run(f"""
        mov ${PY_PORT}, %dx
        mov $7, %al
        out %al, %dx
        hlt
    """, setup=lambda vm: vm.machine.add_device(Bus.PIO, PY_PORT, 1, Stopper(), "stopper"))
    with vm:
        assert outcome.kind == OutcomeKind.DEVICE_STOP and outcome.data == 7


@pytest.mark.parametrize("mode", [Mode.LONG_RING3, Mode.LONG_RING0])
def test_another_thread_can_stop_a_spinning_vcpu(mode):
    vm = TinyVm(mode)
    with vm:
        vm.load(assemble("1: jmp 1b", mode))
        vm.machine.start()
        assert vm.machine.wait(0.3) is None          # still spinning
        started = time.monotonic()
        vm.machine.stop()
        outcome = vm.machine.wait(10)
        assert outcome is not None, "stop() did not stop the vCPU"
        assert outcome.kind == OutcomeKind.STOPPED
        assert outcome.regs["rip"] == vm.entry
        assert time.monotonic() - started < 5


def test_timeout_stops_the_machine():
    vm = TinyVm(Mode.LONG_RING3)
    with vm:
        vm.load(assemble("1: jmp 1b", Mode.LONG_RING3))
        assert vm.run(timeout=0.2).kind == OutcomeKind.STOPPED


def test_each_vcpu_runs_on_its_own_thread_with_its_own_counters():
    threads_seen: set[str] = set()

    class WhoAmI:
        def read(self, offset, size):
            return bytes(size)

        def write(self, offset, data):
            threads_seen.add(threading.current_thread().name)
    # rdi = vCPU index: vCPU n does n+3 writes to the C device at offset 8n,
    # one to the Python device, then exits with n+1.
    source = f"""
        mov ${TEST_MMIO_BASE}, %rbx
        lea 3(%rdi), %rcx
    1:  mov %rcx, (%rbx,%rdi,8)
        dec %rcx
        jnz 1b
        movb $1, 0x10000(%rbx)
        lea 1(%rdi), %rax
        mov ${DEBUG_EXIT_MMIO}, %rdx
        mov %rax, (%rdx)
    """

    def setup(vm):
        vm.machine.add_device(Bus.MMIO, TEST_MMIO_BASE + 0x10000, 8, WhoAmI(), "whoami")
        return Scratch(vm.machine, Bus.MMIO, TEST_MMIO_BASE)
    vm, outcome, scratch = run(source, vcpus=2, setup=setup, end_on_first_exit=False)
    with vm:
        outcomes = vm.machine.outcomes
        assert [o.kind for o in outcomes] == [OutcomeKind.DEVICE_STOP] * 2
        assert sorted(o.data for o in outcomes) == [1, 2]
        assert [o.vcpu for o in outcomes] == [0, 1]
        stats = vm.machine.stats()
        assert stats["vcpus"] == [{"MMIO": 3 + 2}, {"MMIO": 4 + 2}]
        assert scratch.writes == 7
        assert scratch.read(0, 16) == (1).to_bytes(8, "little") * 2
        assert threads_seen == {"vcpu0", "vcpu1"}


def test_real_mode_guest():
    vm, outcome, _ = run("""
        mov $0xe9, %dx
        mov $'R', %al
        out %al, %dx
        mov %cs, %ax
        mov $0xf4, %dx
        out %ax, %dx
    """, Mode.REAL)
    with vm:
        assert outcome.kind == OutcomeKind.DEVICE_STOP
        assert vm.output == b"R" and outcome.data == 0


def test_ring3_runs_a_long_loop_then_exits_through_mmio():
    vm, outcome, _ = run(f"""
        mov $5000000, %rcx
    1:  dec %rcx
        jnz 1b
        mov %cs, %rax
        mov ${DEBUG_EXIT_MMIO}, %rdx
        mov %rax, (%rdx)
    """, Mode.LONG_RING3)
    with vm:
        assert outcome.kind == OutcomeKind.DEVICE_STOP
        assert outcome.data & 3 == 3                 # CPL 3
        assert outcome.regs["rcx"] == 0


def test_ring3_port_io_depends_on_iopl_support():
    vm, outcome, _ = run(EXIT_VIA_PORT, Mode.LONG_RING3)
    with vm:
        if is_pvm_host():
            # KVM PVM runs guest ring 3 with IOPL 0: `out` raises #GP, and with
            # no IDT that is a triple fault.
            assert outcome.kind == OutcomeKind.SHUTDOWN
        else:
            assert outcome.kind == OutcomeKind.DEVICE_STOP


def test_overlapping_devices_are_refused():
    with TinyVm() as vm:
        with pytest.raises(MachineError, match="overlaps another device"):
            Scratch(vm.machine, Bus.PIO, 0xF0)           # debug-exit is at 0xf4


def test_pause_parks_every_vcpu_and_resume_continues():
    # Two ring-3 vCPUs count up in rax forever; while paused, rax must not move.
    vm = TinyVm(Mode.LONG_RING3, vcpus=2)
    with vm:
        vm.load(assemble("1: inc %rax\n jmp 1b", Mode.LONG_RING3))
        machine = vm.machine
        machine.start()
        time.sleep(0.2)
        machine.pause()
        assert machine.paused
        before = [v.get_regs()["rax"] for v in machine.vcpus]
        time.sleep(0.3)
        assert [v.get_regs()["rax"] for v in machine.vcpus] == before
        assert all(b > 0 for b in before)
        machine.resume()
        time.sleep(0.2)
        machine.pause()
        after = [v.get_regs()["rax"] for v in machine.vcpus]
        assert all(a > b for a, b in zip(after, before))
        machine.resume()
        machine.stop()
        outcome = machine.wait(10)
        assert outcome is not None and outcome.kind == OutcomeKind.STOPPED


def test_stop_while_paused_ends_the_machine():
    vm = TinyVm(Mode.LONG_RING3)
    with vm:
        vm.load(assemble("1: jmp 1b", Mode.LONG_RING3))
        vm.machine.start()
        vm.machine.pause()
        vm.machine.stop()
        outcome = vm.machine.wait(10)
        assert outcome is not None and outcome.kind == OutcomeKind.STOPPED


def test_an_application_processor_starts_on_init_sipi():
    # The BSP wakes vCPU 1 through the in-kernel LAPIC, as Linux does for its
    # secondary CPUs: INIT, then a start-up IPI whose vector 8 means 0800:0000.
    bsp = assemble("""
        mov $0xfee00000, %rbx
        movl $0x1ff, 0xf0(%rbx)           # spurious vector register: APIC on
        movl $0x01000000, 0x310(%rbx)     # ICR high: destination APIC ID 1
        movl $0x00004500, 0x300(%rbx)     # ICR low: INIT
        movl $0x01000000, 0x310(%rbx)
        movl $0x00004608, 0x300(%rbx)     # ICR low: start-up, vector 8
    1:  pause
        jmp 1b
    """, Mode.LONG_RING0)
    ap = assemble("""
        mov $0xf4, %dx
        mov %cs, %ax
        out %ax, %dx
    """, Mode.REAL, origin=0)
    with TinyVm(Mode.LONG_RING0, vcpus=2, irqchip=True) as vm:
        vm.machine.memory.write(0x8000, ap)
        vm.load(bsp)
        outcome = vm.run(timeout=60)
        assert outcome.kind == OutcomeKind.DEVICE_STOP, outcome.describe()
        assert outcome.vcpu == 1 and outcome.data == 0x800      # real mode, CS = vector << 8

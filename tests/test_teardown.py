"""Teardown is memory-safe (issue 11): a vCPU stuck in a device, or racing with
stop/kick/pause/resume/close from other threads, never makes the VMM touch freed memory.

Every scenario runs in a fresh interpreter (`in_child`): a use-after-free shows up
as a failed test with the signal that killed the child, not as a dead test run.
An exception escaping any thread of the child fails the scenario too.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.kvm import OutcomeKind
from pyvmm.machine import Bus, Machine, MachineError
from pyvmm.testbed import TEST_MMIO_BASE, Mode, TinyVm, assemble

pytestmark = pytest.mark.kvm

HERE = Path(__file__).resolve().parent
PY_PORT = 0x600
# Reads a Python device on port 0x600 forever.
READ_PORT_FOREVER = f"""
    mov ${PY_PORT}, %dx
1:  in %dx, %al
    jmp 1b
"""
# vCPU 0 spins in the guest; the others read a Python MMIO device forever.
SPIN_OR_READ_MMIO = f"""
    test %rdi, %rdi
    jz 2f
    mov ${TEST_MMIO_BASE}, %ebx
1:  mov (%rbx), %eax
    jmp 1b
2:  jmp 2b
"""
JOIN_TIMEOUT = 0.2          # how long close() waits for a vCPU thread in these tests


def in_child(scenario: str, timeout: float = 300) -> str:
    """Run `scenario` (a function of this module) in a new interpreter; fail on a crash,
    an exception, or an exception escaping any thread."""
    code = (
        "import sys, threading, traceback\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "errors = []\n"
        "threading.excepthook = errors.append\n"
        "import test_teardown\n"
        f"test_teardown.{scenario}()\n"
        "for e in errors:\n"
        "    traceback.print_exception(e.exc_type, e.exc_value, e.exc_traceback)\n"
        "sys.exit(3 if errors else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE.parent)
    if proc.returncode < 0:
        died = f"killed by {signal.Signals(-proc.returncode).name}"
    elif proc.returncode == 3:
        died = "an exception escaped a thread"
    else:
        died = f"exit status {proc.returncode}"
    assert proc.returncode == 0, \
        f"{scenario}: {died}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc.stdout


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class BlockingDevice:
    """A Python device whose read() blocks until the test releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()

    def read(self, offset: int, size: int) -> bytes:
        self.entered.set()
        self.release.wait()
        self.returned.set()
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


class GateDevice:
    """Reads return zeros at once while the gate is open, and wait while it is shut."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()

    def read(self, offset: int, size: int) -> bytes:
        self.gate.wait()
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


def blocked_vm() -> tuple[TinyVm, BlockingDevice]:
    vm = TinyVm(Mode.LONG_RING0)
    device = BlockingDevice()
    vm.machine.add_device(Bus.PIO, PY_PORT, 1, device, "blocking")
    vm.load(assemble(READ_PORT_FOREVER, Mode.LONG_RING0))
    vm.machine.join_timeout = JOIN_TIMEOUT
    return vm, device


def exercise_closed(machine: Machine) -> None:
    """Everything a user may still call on a closed machine: no-ops or MachineError."""
    for _ in range(3):
        machine.stop()
        machine.kick()
        machine.resume()
        for vcpu in machine.vcpus:
            vcpu.kick()
            vcpu.close()
        with pytest.raises(MachineError):
            machine.pause(timeout=1)
        with pytest.raises(MachineError):
            machine.start()
        try:
            machine.wait(0.01)
        except MachineError:
            pass                # never started
        machine.close()


# -- scenarios (run in a child) ----------------------------------------------------


def scenario_close_while_blocked_in_a_device(rounds: int = 20) -> None:
    from pyvmm import machine as machine_module
    fds = open_fds()
    left_before = getattr(machine_module, "teardown_counters", {}).get(
        "vcpu_threads_left_running", 0)
    for _ in range(rounds):
        vm, device = blocked_vm()
        vm.machine.start()
        assert device.entered.wait(30), "the guest never reached the device"
        started = time.monotonic()
        vm.close()
        took = time.monotonic() - started
        # The vCPU thread is still inside the device: its native state, its fd,
        # the VM fd and guest RAM must all still be there when it comes back.
        device.release.set()
        assert device.returned.wait(10)
        machine = vm.machine
        assert machine.wait(10) is not None
        exercise_closed(machine)
        assert took < 5, f"close() waited {took:.1f} s for a stuck vCPU"
        assert machine.leaked_vcpus == 1
        assert machine.released.wait(10), "the last vCPU thread did not release the VM"
        assert machine.vm.fd == -1 and all(v.fd == -1 for v in machine.vcpus)
    assert machine_module.teardown_counters["vcpu_threads_left_running"] - left_before == rounds
    assert open_fds() == fds, "a round leaked file descriptors"


def scenario_operations_while_blocked_in_a_device() -> None:
    """The same stuck vCPU, with every operation tried before the device returns."""
    vm, device = blocked_vm()
    vm.machine.start()
    assert device.entered.wait(30)
    vm.close()
    exercise_closed(vm.machine)
    # Closed, but not released while the vCPU is stuck: release callbacks still wait.
    released_with_ram = []
    vm.machine.at_release(lambda: released_with_ram.append(vm.machine.memory.read(0x600, 4)))
    assert not vm.machine.released.is_set() and not released_with_ram
    device.release.set()
    assert vm.machine.released.wait(10)
    assert len(released_with_ram) == 1      # called once, while guest RAM was still there
    exercise_closed(vm.machine)
    late = []
    vm.machine.at_release(lambda: late.append(1))
    assert late == [1]


def scenario_pause_fails_cleanly_while_a_vcpu_is_stuck() -> None:
    vm, device = blocked_vm()
    vm.machine.start()
    assert device.entered.wait(30)
    with pytest.raises(MachineError, match="did not pause"):
        vm.machine.pause(timeout=0.3)
    assert not vm.machine.paused            # not half paused
    device.release.set()                    # reads return at once from now on
    vm.machine.pause()
    assert vm.machine.paused
    vm.machine.resume()
    vm.close()
    assert vm.machine.leaked_vcpus == 0 and vm.machine.released.is_set()


def scenario_close_while_spinning() -> None:
    fds = open_fds()
    for mode in (Mode.LONG_RING3, Mode.LONG_RING0):
        for _ in range(5):
            vm = TinyVm(mode)
            vm.load(assemble("1: jmp 1b", mode))
            vm.machine.start()
            assert vm.machine.wait(0.05) is None
            started = time.monotonic()
            vm.close()
            took = time.monotonic() - started
            outcome = vm.machine.wait(1)
            assert outcome is not None and outcome.kind == OutcomeKind.STOPPED
            exercise_closed(vm.machine)
            assert took < 5
            assert vm.machine.leaked_vcpus == 0 and vm.machine.released.is_set()
    assert open_fds() == fds


def scenario_close_before_start_and_twice() -> None:
    vm = TinyVm(Mode.LONG_RING0)
    vm.load(assemble("1: jmp 1b", Mode.LONG_RING0))
    machine = vm.machine
    machine.stop()              # before start: nothing to stop
    machine.resume()
    with pytest.raises(MachineError):
        machine.pause()
    vm.close()
    vm.close()
    exercise_closed(machine)
    assert machine.released.is_set()
    other = TinyVm(Mode.LONG_RING0)
    other.machine.kick()
    with pytest.raises(MachineError):
        other.machine.wait(0)   # never started: nothing to wait for
    other.close()


def scenario_vcpu_fd_closed_under_a_running_thread() -> None:
    """VcpuFd alone: close() while another thread is in run() defers the free."""
    vm, device = blocked_vm()
    vcpu = vm.machine.vcpus[0]
    outcomes = []
    runner = threading.Thread(target=lambda: outcomes.append(vcpu.run()))
    runner.start()
    assert device.entered.wait(30)
    vcpu.close()
    vcpu.close()
    vcpu.kick()
    device.release.set()
    runner.join(10)
    assert not runner.is_alive()
    assert outcomes[0].kind == OutcomeKind.STOPPED
    again = vcpu.run()
    assert again.kind == OutcomeKind.RUN_ERROR and again.err == 9      # EBADF
    vcpu.kick()
    vm.close()


OPS = ("start", "stop", "kick", "pause", "resume", "wait", "close", "vcpu_kick", "vcpu_close",
       "sleep", "shut_gate", "open_gate")


def _do(machine: Machine, device: GateDevice, op: str, arg: int) -> None:
    if op == "shut_gate":
        device.gate.clear()
    elif op == "open_gate":
        device.gate.set()
    elif op == "start":
        machine.start()
    elif op == "stop":
        machine.stop()
    elif op == "kick":
        machine.kick()
    elif op == "pause":
        machine.pause(timeout=0.5)
    elif op == "resume":
        machine.resume()
    elif op == "wait":
        machine.wait(0.01)
    elif op == "close":
        machine.close()
    elif op == "vcpu_kick":
        machine.vcpus[arg % len(machine.vcpus)].kick()
    elif op == "vcpu_close":
        machine.vcpus[arg % len(machine.vcpus)].close()
    else:
        time.sleep(arg / 1000)


op_lists = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 20)), max_size=10)


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(first=op_lists, second=op_lists, shut=st.booleans())
def scenario_random_orders_from_two_threads(first, second, shut) -> None:
    """vCPU 0 spins, vCPU 1 reads a device whose gate may be shut (a stuck handler)."""
    fds = open_fds()
    vm = TinyVm(Mode.LONG_RING3, vcpus=2)
    device = GateDevice()
    if shut:
        device.gate.clear()
    vm.machine.add_device(Bus.MMIO, TEST_MMIO_BASE, 8, device, "gate")
    vm.load(assemble(SPIN_OR_READ_MMIO, Mode.LONG_RING3))
    machine = vm.machine
    machine.join_timeout = 0.1
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def play(ops) -> None:
        barrier.wait()
        for op, arg in ops:
            try:
                _do(machine, device, op, arg)
            except MachineError:
                pass
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    other = threading.Thread(target=play, args=(second,))
    other.start()
    play(first)
    other.join(60)
    assert not other.is_alive()
    vm.close()
    device.gate.set()
    assert not errors, errors
    assert machine.released.wait(10), "a vCPU thread left running never released the VM"
    exercise_closed(machine)
    assert open_fds() == fds


# -- the tests -------------------------------------------------------------------


def test_close_while_a_vcpu_is_blocked_in_a_python_device_repeated():
    in_child("scenario_close_while_blocked_in_a_device")


def test_every_operation_is_safe_while_a_closed_vcpu_is_still_in_a_device():
    in_child("scenario_operations_while_blocked_in_a_device")


def test_a_pause_that_times_out_leaves_the_machine_running():
    in_child("scenario_pause_fails_cleanly_while_a_vcpu_is_stuck")


def test_close_while_the_vcpu_spins_in_the_guest():
    in_child("scenario_close_while_spinning")


def test_close_before_start_and_double_close():
    in_child("scenario_close_before_start_and_twice")


def test_a_vcpu_fd_closed_while_another_thread_runs_it():
    in_child("scenario_vcpu_fd_closed_under_a_running_thread")


def test_stop_kick_pause_resume_close_in_random_orders_from_two_threads():
    in_child("scenario_random_orders_from_two_threads")

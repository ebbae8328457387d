"""A real Linux guest, booted by pyvmm: the built-in guest, as PVH vmlinux and
as bzImage.  On KVM PVM hosts a boot takes about a minute, so one booted VM is
shared by the checks that can honestly share it.
"""
from __future__ import annotations

import time

import pytest

from tests.framework.microvm import BOOT_TIMEOUT, INIT_MARKER, run_in_shell
from tests.framework.process import run_pyvmm

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

VCPUS = 2
# The shared_vm fixture (conftest.py): the PVH vmlinux with 2 vCPUs, at an interactive shell.
SHARED_VM = {"vcpus": VCPUS, "mem_mib": 256}
# type_of_loader in Linux's boot_params (offset 0x210): its PVH entry code sets 0xb0
# ("PVH, not Xen"); pyvmm's bzImage loader leaves 0xff (undefined).
PVH_TYPE_OF_LOADER = "b0"


def test_pvh_boot_reaches_init(shared_vm, module_microvm_factory):
    assert INIT_MARKER in shared_vm.serial.capture.tail()
    # The kernel was entered through its PVH entry point: it says so in boot_params.
    loader = run_in_shell(shared_vm, "od -An -tx1 -j 528 -N 1 /sys/kernel/boot_params/data")
    assert loader.split() == [PVH_TYPE_OF_LOADER], loader
    print(f"\nPVH vmlinux: start to {INIT_MARKER.decode()} in "
          f"{module_microvm_factory.boot_seconds[shared_vm]:.1f} s")


def test_the_guest_sees_its_cpus(shared_vm):
    # Both CPUs online, and both take interrupts (each has a timer line in
    # /proc/interrupts with a non-zero count): the AP really runs.
    assert run_in_shell(shared_vm, "grep -c ^processor /proc/cpuinfo").split()[0] == str(VCPUS)
    out = run_in_shell(shared_vm, "cat /sys/devices/system/cpu/online; grep LOC: /proc/interrupts")
    online, loc = out.split("\n", 1)
    assert online.strip() == f"0-{VCPUS - 1}"
    counts = [int(n) for n in loc.split()[1:1 + VCPUS]]
    assert all(n > 0 for n in counts), loc


def test_commands_typed_on_the_serial_console_run(shared_vm):
    out = run_in_shell(shared_vm, "echo $((6 * 7)); uname -s")
    assert "42" in out.split() and "Linux" in out.split()


def test_guest_memory_size_is_what_we_gave(shared_vm):
    out = run_in_shell(shared_vm, "grep MemTotal /proc/meminfo")
    total_kib = int(out.split()[1])
    assert 200 * 1024 < total_kib <= 256 * 1024


def test_exit_from_the_shell_ends_the_vm_cleanly(shared_vm):
    # Last: the init script reboots when its shell exits.
    shared_vm.serial.write("exit\n")
    result = shared_vm.wait(120)
    assert result is not None, "the VM did not end after the shell exited"
    assert result.exit_code == 0, result.reason
    assert result.reason == "the guest rebooted"


def test_bzimage_boot_from_the_cli_runs_a_command_and_exits_zero(guest):
    started = time.monotonic()
    proc = run_pyvmm(
        "run", "--kernel", str(guest.bzimage), "--initrd", str(guest.initramfs), "--mem", "192M",
        "--cpus", "2", "--console", "stdio", "--stats",
        "--cmdline", 'pyvmm.cmd="echo bz-$((40+2)) cpus-$(nproc)"', timeout=BOOT_TIMEOUT)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}\n{out[-3000:]}"
    assert INIT_MARKER.decode() in out
    assert "bz-42 cpus-2" in out and "PYVMM-CMD-EXIT=0" in out
    assert '"serial"' in proc.stderr                   # --stats printed the counters
    print(f"\nbzImage: exec to exit in {time.monotonic() - started:.1f} s")

"""A real Linux guest, booted by pyvmm: the built-in guest, as PVH vmlinux and
as bzImage.  On KVM PVM hosts a boot takes about a minute, so one booted VM is
shared by the checks that can honestly share it.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from linux_guest import BOOT_TIMEOUT, INIT_MARKER, run_in_shell
from pyvmm.vmm import LinuxVm, VmConfig

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

VCPUS = 2


@pytest.fixture(scope="module")
def shell_vm(guest):
    """The PVH vmlinux with 2 vCPUs, at an interactive shell."""
    vm = LinuxVm(VmConfig(kernel=guest.vmlinux, initrd=guest.initramfs, vcpus=VCPUS,
                          mem_mib=256, console="none"))
    started = time.monotonic()
    vm.start()
    assert vm.wait_for_output(INIT_MARKER, BOOT_TIMEOUT), \
        f"no {INIT_MARKER!r}; console:\n{vm.console.history[-3000:].decode(errors='replace')}"
    vm.boot_seconds = time.monotonic() - started
    yield vm
    vm.stop()
    vm.wait(30)
    vm.close()


def test_pvh_boot_reaches_init(shell_vm):
    assert INIT_MARKER in shell_vm.console.history
    assert shell_vm.kernel.format == "pvh"
    print(f"\nPVH vmlinux: exec to {INIT_MARKER.decode()} in {shell_vm.boot_seconds:.1f} s")


def test_the_guest_sees_its_cpus(shell_vm):
    # Both CPUs online, and both take interrupts (each has a timer line in
    # /proc/interrupts with a non-zero count): the AP really runs.
    assert run_in_shell(shell_vm, "grep -c ^processor /proc/cpuinfo").split()[0] == str(VCPUS)
    out = run_in_shell(shell_vm, "cat /sys/devices/system/cpu/online; grep LOC: /proc/interrupts")
    online, loc = out.split("\n", 1)
    assert online.strip() == f"0-{VCPUS - 1}"
    counts = [int(n) for n in loc.split()[1:1 + VCPUS]]
    assert all(n > 0 for n in counts), loc


def test_commands_typed_on_the_serial_console_run(shell_vm):
    out = run_in_shell(shell_vm, "echo $((6 * 7)); uname -s")
    assert "42" in out.split() and "Linux" in out.split()


def test_guest_memory_size_is_what_we_gave(shell_vm):
    out = run_in_shell(shell_vm, "grep MemTotal /proc/meminfo")
    total_kib = int(out.split()[1])
    assert 200 * 1024 < total_kib <= 256 * 1024


def test_exit_from_the_shell_ends_the_vm_cleanly(shell_vm):
    # Last: the init script reboots when its shell exits.
    shell_vm.send(b"exit\n")
    result = shell_vm.wait(120)
    assert result is not None, "the VM did not end after the shell exited"
    assert result.exit_code == 0, result.reason
    assert result.reason == "the guest rebooted"


def test_bzimage_boot_from_the_cli_runs_a_command_and_exits_zero(guest):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", "--kernel", str(guest.bzimage), "--initrd",
         str(guest.initramfs), "--mem", "192M", "--cpus", "2", "--console", "stdio", "--stats",
         "--cmdline", 'pyvmm.cmd="echo bz-$((40+2)) cpus-$(nproc)"'],
        capture_output=True, timeout=BOOT_TIMEOUT, stdin=subprocess.DEVNULL)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.decode()}\n{out[-3000:]}"
    assert INIT_MARKER.decode() in out
    assert "bz-42 cpus-2" in out and "PYVMM-CMD-EXIT=0" in out
    assert '"serial"' in proc.stderr.decode()          # --stats printed the counters
    print(f"\nbzImage: exec to exit in {time.monotonic() - started:.1f} s")

"""Real gdb (Debian's package) in batch mode against the built-in Linux guest (issue 18).

One boot for the whole session: `pyvmm run --gdb SOCK --gdb-wait` holds the guest
before its first instruction; gdb attaches, sets a hardware breakpoint on
start_kernel (a software one cannot be planted before the kernel's page tables map
it), continues, looks around, steps and detaches; the boot then runs to /init.
On KVM PVM a data watchpoint is refused with one clear line, which is checked too.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from pyvmm.pvm import is_pvm_host
from tests.framework.microvm import BOOT_TIMEOUT, INIT_MARKER
from tests.framework.process import Process, pyvmm_command

pytestmark = [pytest.mark.kvm, pytest.mark.linux, pytest.mark.hwdebug]
PVM = is_pvm_host()


def _symbol(vmlinux: str, name: str) -> int:
    out = subprocess.run(["nm", vmlinux], capture_output=True, text=True, check=True).stdout
    match = re.search(rf"^([0-9a-f]+) \w {re.escape(name)}$", out, re.M)
    assert match, f"{name} is not in {vmlinux}"
    return int(match.group(1), 16)


def test_gdb_breaks_in_start_kernel_and_the_boot_finishes(guest, tmp_path):
    if shutil.which("gdb") is None:
        pytest.fail("gdb is not installed: scripts/setup installs it (Debian's gdb)")
    vmlinux = getattr(guest, "vmlinux_debug", None)
    if vmlinux is None or not vmlinux.is_file():
        pytest.fail("the built-in guest has no vmlinux with symbols (GuestPaths.vmlinux_debug): "
                    "rebuild it with `pyvmm guest build`")
    start_kernel = _symbol(str(vmlinux), "start_kernel")
    sock = tmp_path / "gdb.sock"
    # With the default seccomp filters on: the stub's threads may make the debug ioctls.
    vm = Process([*pyvmm_command(), "run", "--console", "stdio",
                  "--gdb", str(sock), "--gdb-wait", "--cmdline", "pyvmm.cmd=true"],
                 markers=[INIT_MARKER])
    try:
        # Not wait_for_socket(): a connection is an attach, and its end a detach.
        deadline = time.monotonic() + 60
        while not sock.is_socket() and vm.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.is_socket(), vm.stderr()
        watch = ["watch *(long *)&jiffies", "continue", "delete 2"] if PVM else []
        script = ["set pagination off", "set confirm off", f"target remote {sock}",
                  "info threads", "hbreak start_kernel", "continue", "bt",
                  "info registers rip", "x/s &linux_banner", "stepi",
                  "info registers rip", *watch, "break rest_init", "continue", "bt",
                  "delete", "monitor pvm", "detach"]
        args = ["gdb", "-nx", "-batch", str(vmlinux)]
        for line in script:
            args += ["-ex", line]
        gdb = subprocess.run(args, capture_output=True, text=True, timeout=600)
        out = gdb.stdout + gdb.stderr
        print(out)
        assert re.search(r"Breakpoint 1, (0x[0-9a-f]+ in )?start_kernel \(", out), out
        # bt names the kernel's frames, unwound through vmlinux_debug's DWARF call-frame
        # information.  The built-in kernel has no frame pointers (they cost ~14% of a
        # KVM PVM boot), so its sibling calls leave no frame: start_kernel's caller on
        # the stack is secondary_startup_64 (x86_64_start_kernel and
        # x86_64_start_reservations jumped to it); with frame pointers they would show.
        frames = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+)", out, re.M)
        assert frames[0] == "start_kernel" and frames[1] in (
            "secondary_startup_64", "x86_64_start_reservations"), frames
        assert frames.index("rest_init") > 1 and frames[frames.index("rest_init"):][:3] == \
            ["rest_init", "arch_call_rest_init", "start_kernel"], frames
        rips = [int(m, 16) for m in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)]
        assert rips[0] == start_kernel, (hex(rips[0]), hex(start_kernel))
        assert len(rips) == 2 and rips[1] != rips[0]         # stepi advanced
        # A software breakpoint (on PVM: the planted int3's emulation failure is the hit).
        # (With DWARF in vmlinux_debug gdb names no address and adds file:line.)
        assert re.search(r"Breakpoint \d+, (0x[0-9a-f]+ in )?rest_init \(", out), out
        assert re.search(r"#1\s+0x[0-9a-f]+ in arch_call_rest_init \(", out), out
        assert re.search(r'<linux_banner>:\s+"Linux version ', out), out
        if PVM:
            assert "Could not insert hardware watchpoint 2" in out
            assert "not possible" in out                       # monitor pvm says why
            assert "KVM PVM cannot do data watchpoints" in vm.stderr()
        assert "detached" in out
        # Detached: the boot runs on to the guest's init.
        assert vm.wait_marker(INIT_MARKER, BOOT_TIMEOUT) is not None, vm.out[-3000:]
        assert vm.wait(120) == 0, vm.stderr()
    finally:
        vm.close()

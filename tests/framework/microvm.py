"""Booted microVMs for tests, in the manner of Firecracker's tests/framework/microvm.py.

A test asks MicrovmFactory for a VM with the devices it needs and gets a
pyvmm.microvm.MicroVM that runs and whose guest has reached its /init (the
built-in guest prints INIT_MARKER there); the factory closes every VM it gave
out at teardown (the conftest fixtures `microvm_factory`, per test, and
`module_microvm_factory`, per module, for the slow Linux boots that tests share).

How a VM came to be running is the factory's business, so that tests take a
VM booted from scratch and, later, one restored from a snapshot the same way:
boot() configures and starts one; a restore() would load its VM and then take
the same last steps (_track, _ready) before handing it out.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from typing import Any

from pyvmm.microvm import MicroVM
from tests.framework.netns import NetNamespace

INIT_MARKER = b"PYVMM-INIT-OK"
# KVM PVM: ~45-60 s to /init on an idle machine, several minutes on a loaded one;
# hardware KVM: well under a second.
BOOT_TIMEOUT = float(os.environ.get("PYVMM_BOOT_TIMEOUT", 1200))


class MicrovmFactory:
    """Gives out running MicroVMs and closes them all in close()."""

    def __init__(self) -> None:
        self.vms: list[MicroVM] = []
        self.boot_seconds: dict[MicroVM, float] = {}    # start() to INIT_MARKER, per VM

    def boot(self, *, netns: NetNamespace | None = None, timeout: float = BOOT_TIMEOUT,
             **config: Any) -> MicroVM:
        """A MicroVM(**config), started, at INIT_MARKER.  config takes MicroVM's keyword
        arguments (kernel, initrd, cmdline, vcpus, mem_mib, drives, nets, rng...);
        without kernel, the built-in guest boots.  netns: the namespace the VM starts
        in, where the TAP devices of its nets are."""
        vm = self._track(MicroVM(**config))
        started = time.monotonic()
        with netns.entered() if netns is not None else contextlib.nullcontext():
            vm.start()
        self._ready(vm, timeout)
        self.boot_seconds[vm] = time.monotonic() - started
        return vm

    def restore(self, state_path: Any, mem_path: Any, *, netns: NetNamespace | None = None,
                **load: Any) -> MicroVM:
        """A MicroVM restored from a snapshot (MicroVM.restore's keyword arguments),
        running, its console answering.  netns: where its TAP devices are."""
        with netns.entered() if netns is not None else contextlib.nullcontext():
            vm = self._track(MicroVM.restore(state_path, mem_path, **load))
        if load.get("resume", True):
            run_in_shell(vm, "true")
        return vm

    def _track(self, vm: MicroVM) -> MicroVM:
        self.vms.append(vm)
        return vm

    @staticmethod
    def _ready(vm: MicroVM, timeout: float) -> None:
        """Wait for the guest's init (MicroVMError, with the console's tail, if it
        does not come)."""
        vm.serial.expect(re.escape(INIT_MARKER), timeout=timeout)

    def close(self) -> None:
        """Stop and release every VM given out (MicroVM.close waits for the vCPUs)."""
        while self.vms:
            self.vms.pop().close()
        self.boot_seconds.clear()


def run_in_shell(vm: Any, command: str, timeout: float = 120) -> str:
    """Type a command at the guest's shell; return what it printed.

    vm is a MicroVM, or anything whose `serial` writes, and expects a regex, as
    MicroVM.serial does (a framework.process.Process: a VMM's stdin and stdout).
    The shell prints computed markers around the output ("B$((0))TAG" is typed,
    "B0TAG" printed), so the echo of the typed line, however often the tty and
    the shell echo it and however the line editor wraps it, never matches.
    """
    tag = f"T{abs(hash((command, time.monotonic_ns()))) % 10**8}"
    vm.serial.write(f"echo B$((0)){tag}; {command}; echo {tag}-$?\n")
    pattern = re.compile(rf"B0{tag}\r?\n(.*?){tag}-(\d+)".encode(), re.S)
    try:
        match = vm.serial.expect(pattern, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - MicroVMError or AssertionError
        raise AssertionError(f"command {command!r} did not finish: {exc}") from exc
    return match.group(1).decode(errors="replace")

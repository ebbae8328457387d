"""Helpers for tests that boot the built-in Linux guest."""
from __future__ import annotations

import os
import re

from pyvmm.vmm import LinuxVm

INIT_MARKER = b"PYVMM-INIT-OK"
# KVM PVM: ~45-60 s to /init on an idle machine, several minutes on a loaded one;
# hardware KVM: well under a second.
BOOT_TIMEOUT = float(os.environ.get("PYVMM_BOOT_TIMEOUT", 1200))


def run_in_shell(vm: LinuxVm, command: str, timeout: float = 120) -> str:
    """Type a command at the guest shell; return what it printed.

    The shell prints computed markers around the output ("B$((0))TAG" is typed,
    "B0TAG" printed), so the echo of the typed line, however often the tty and
    the shell echo it and however the line editor wraps it, never matches.
    """
    tag = f"T{abs(hash(command)) % 10**8}"
    console = vm.console
    start = console.total
    vm.send(f"echo B$((0)){tag}; {command}; echo {tag}-$?\n".encode())
    pattern = re.compile(rf"B0{tag}\r?\n(.*?){tag}-(\d+)".encode(), re.S)
    assert console.wait_for(lambda _: pattern.search(console.since(start)) is not None,
                            timeout), \
        f"command {command!r} did not finish; console:\n{console.since(start)!r}"
    match = pattern.search(console.since(start))
    return match.group(1).decode(errors="replace")

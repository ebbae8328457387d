"""Helpers for tests that boot the built-in Linux guest."""
from __future__ import annotations

import os
import re

from pyvmm.vmm import LinuxVm

INIT_MARKER = b"PYVMM-INIT-OK"
# KVM PVM: ~90 s to /init on an idle machine, several minutes on a loaded one;
# hardware KVM: well under a second.
BOOT_TIMEOUT = float(os.environ.get("PYVMM_BOOT_TIMEOUT", 1200))


def run_in_shell(vm: LinuxVm, command: str, timeout: float = 120) -> str:
    """Type a command at the guest shell; return what it printed."""
    tag = f"END{abs(hash(command)) % 10**6}"
    console = vm.console
    start = console.total
    vm.send(f"{command}; echo {tag}-$?\n".encode())
    done = re.compile(rf"{tag}-(\d+)".encode())
    # The echo of the typed line contains "{tag}-$?", never "{tag}-<digits>".
    assert console.wait_for(lambda _: done.search(console.since(start)) is not None, timeout), \
        f"command {command!r} did not finish; console:\n{console.since(start)!r}"
    out = console.since(start).decode(errors="replace")
    # The typed line may be echoed more than once (by the tty before the shell
    # takes over, then by the shell): the output starts after the last echo.
    echoed = out.rfind(f"{tag}-$?")
    body = out[out.find("\n", echoed) + 1:] if echoed >= 0 else out
    end = done.search(body.encode())
    return body[:end.start()] if end else body

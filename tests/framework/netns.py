"""A network namespace of our own, with a TAP device and the host end of the
guest's link in it.  All traffic stays inside the namespace.

A VMM opens the TAP from inside: a MicroVM by starting in `entered()`, a
process by being started through `wrap()` (`ip netns exec`).  The tests and
the benchmarks use different addresses, so both can run at once."""
from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys

CLONE_NEWNET = 0x40000000
HOST_IP = "172.30.0.1"         # inside our own namespace only
GUEST_IP = "172.30.0.2"
PREFIX = 24

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetNamespace:
    def __init__(self, name: str, tap: str = "tap0", host_ip: str = HOST_IP,
                 guest_ip: str = GUEST_IP, prefix: int = PREFIX) -> None:
        self.name, self.tap = name, tap
        self.host_ip, self.guest_ip, self.prefix = host_ip, guest_ip, prefix
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for cmd in (["ip", "netns", "add", name],
                    *(self.wrap(c) for c in (
                        ["ip", "link", "set", "lo", "up"],
                        ["ip", "tuntap", "add", tap, "mode", "tap"],
                        ["ip", "addr", "add", f"{host_ip}/{prefix}", "dev", tap],
                        ["ip", "link", "set", tap, "up"]))):
            subprocess.run(cmd, check=True, capture_output=True)

    @contextlib.contextmanager
    def entered(self):
        """Run the body with this thread inside the namespace (e.g. to open the TAP)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            yield
        finally:
            _setns(home)
            os.close(home)
            os.close(target)

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.wrap(list(args)), **kwargs)

    def python(self, code: str, *args: str, **kwargs) -> subprocess.Popen:
        """A Python process inside the namespace (a TCP peer of the guest)."""
        return subprocess.Popen(self.wrap([sys.executable, "-c", code, *args]), **kwargs)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

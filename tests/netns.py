"""A network namespace of the test's own, with a TAP device and the host end
of the guest's link in it.  All traffic stays inside the namespace."""
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
    def __init__(self, name: str, tap: str = "tap0") -> None:
        self.name = name
        self.tap = tap
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for cmd in (["ip", "netns", "add", name],
                    *(["ip", "netns", "exec", name, *c] for c in (
                        ["ip", "link", "set", "lo", "up"],
                        ["ip", "tuntap", "add", tap, "mode", "tap"],
                        ["ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", tap],
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

    def run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *args], **kwargs)

    def python(self, code: str, **kwargs) -> subprocess.Popen:
        """A Python process inside the namespace (a TCP peer of the guest)."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, sys.executable, "-c", code],
                                **kwargs)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

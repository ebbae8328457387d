"""ioctl helpers: integer-argument ioctls and ioctls on cffi structures."""
from __future__ import annotations

import errno
import fcntl
import os
from typing import Any

from pyvmm.errors import PyvmmError

try:
    from pyvmm._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "pyvmm's C extension is not built: run `pip install -e .` in the source tree"
    ) from exc


class KvmError(PyvmmError):
    """A KVM ioctl failed."""

    def __init__(self, what: str, err: int) -> None:
        self.errno = err
        super().__init__(f"{what} failed: {os.strerror(err)} ({errno.errorcode.get(err, err)})")


def ioctl_int(fd: int, request: int, arg: int = 0, what: str = "") -> int:
    """An ioctl whose argument is an unsigned long; returns the ioctl's result."""
    rc = lib.pv_ioctl_ulong(fd, request, arg)
    if rc < 0:
        raise KvmError(what or hex(request), -rc)
    return rc


def ioctl_struct(fd: int, request: int, cdata: Any, what: str = "") -> int:
    """An ioctl on a cffi structure, read and/or written in place by the kernel."""
    try:
        return fcntl.ioctl(fd, request, ffi.buffer(cdata), True)
    except OSError as exc:
        raise KvmError(what or hex(request), exc.errno) from None

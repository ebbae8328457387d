"""Host files pyvmm reads and writes, handled as a VMM that runs untrusted guests must.

- Inputs (kernel, initrd) must be regular files and are read with a bound:
  st_size is never trusted (it is 0 for /proc files and block devices, and a
  file can grow between stat and read).
- Outputs (log, metrics, serial console) are opened without following a
  symlink at the last component (O_NOFOLLOW: a guest-influenced path cannot
  redirect them onto another file), and must be regular files or FIFOs.
"""
from __future__ import annotations

import errno
import os
import stat

from pyvmm.errors import PyvmmError

READ_CHUNK = 1 << 20


class HostFileError(PyvmmError):
    """A host file that cannot be used as asked."""


def read_regular_file(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The whole of a regular file of at most limit bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HostFileError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise HostFileError(f"{what} {path} is a directory, not a file") from None
    except PermissionError:
        raise HostFileError(f"{what} {path} is not readable (permission denied)") from None
    except OSError as exc:
        raise HostFileError(f"{what} {path} cannot be opened: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise HostFileError(f"{what} {path} is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise HostFileError(f"{what} {path} is not a regular file: give the {what} as a "
                                "file")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(READ_CHUNK, limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise HostFileError(f"{what} {path} is larger than the {limit >> 20} MiB "
                                    "pyvmm accepts")
    except OSError as exc:
        raise HostFileError(f"{what} {path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)


def open_output(path: str, what: str = "output") -> int:
    """An output file, appended to (created 0644 if missing), or a FIFO (opened
    read-write, so that opening never blocks and writes never fail for lack of a
    reader).  Non-blocking; never follows a symlink at the last component."""
    flags = os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        st = os.lstat(path)
        fifo = stat.S_ISFIFO(st.st_mode)
    except FileNotFoundError:
        fifo = False
    try:
        fd = os.open(path, flags | (os.O_RDWR if fifo else
                                    os.O_WRONLY | os.O_APPEND | os.O_CREAT), 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise HostFileError(f"{what} {path} is a symbolic link: give the file itself") \
                from None
        raise HostFileError(f"cannot open {what} {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        os.close(fd)
        raise HostFileError(f"{what} {path} is neither a regular file nor a FIFO")
    return fd

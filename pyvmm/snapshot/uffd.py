"""Firecracker's `Uffd` memory backend, the VMM's side: guest RAM whose pages a
separate page-fault handler process fills on demand, over userfaultfd(2).

What Firecracker does for `PUT /snapshot/load {"mem_backend": {"backend_type":
"Uffd", "backend_path": SOCKET}}` (src/vmm/src/persist.rs, guest_memory_from_uffd
and send_uffd_handshake), and so what we do, so that page-fault handlers written
for Firecracker serve pyvmm unchanged:

1. guest RAM is anonymous private memory (GuestMemory(layout, anonymous=True));
2. one userfaultfd, O_CLOEXEC | O_NONBLOCK, *not* UFFD_USER_MODE_ONLY: KVM
   reaches guest RAM from the kernel (get_user_pages when it maps a guest page,
   copy_from_user when it emulates), and those faults must reach the handler too;
3. UFFDIO_API asking for UFFD_FEATURE_EVENT_REMOVE.  Firecracker asks for it
   for its balloon (madvise(MADV_DONTNEED) on guest RAM then sends a REMOVE
   event instead of silently dropping pages).  pyvmm has no balloon and never
   madvises guest RAM, so the handler will not see such events from us, but we
   ask for the same features so that a handler sees the very same uffd;
4. every region registered with UFFDIO_REGISTER_MODE_MISSING;
5. connect to the Unix stream socket at backend_path and send ONE message: the
   regions as compact JSON, with the userfaultfd attached as SCM_RIGHTS:

       [{"base_host_virt_addr":139637976727552,"size":67108864,"offset":0,
         "page_size":4096,"page_size_kib":4096}, ...]

   (field order and spelling are Firecracker's GuestRegionUffdMapping, as
   serde_json writes it; `offset` is where the region starts in the snapshot's
   memory file, the sum of the sizes before it; `page_size_kib` is deprecated,
   holds bytes despite its name, and is still sent).  Firecracker's example
   handlers read the message into a 1024-byte buffer: about 8 regions fit;
6. the connection stays open for the VM's life (Firecracker `forget`s it).  The
   handler learns our pid from it (SO_PEERCRED) and sees it hang up when the VM
   is gone: that is how a handler knows to exit.

The caller keeps the returned userfaultfd open for the VM's life and releases it
after guest RAM with close_uffd_backend(), which also hangs up on the handler.

Everything that can go wrong is a SnapshotError with one line saying what to do.
"""
from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import json
import os
import socket
import struct
import weakref
from typing import Any

from pyvmm.memory import GuestMemory
from pyvmm.snapshot.format import SnapshotError

# -- <linux/userfaultfd.h>, x86_64 ----------------------------------------------------------

SYS_userfaultfd = 323
UFFD_USER_MODE_ONLY = 1            # never used by us: see the module docstring
UFFD_API = 0xAA
USERFAULTFD_IOC_NEW = 0xAA00       # _IO(0xAA, 0x00) on /dev/userfaultfd (Linux 6.1+)

# struct uffdio_api {u64 api, features, ioctls}
UFFDIO_API_STRUCT = struct.Struct("<QQQ")
# struct uffdio_register {struct uffdio_range {u64 start, len} range; u64 mode, ioctls}
UFFDIO_REGISTER_STRUCT = struct.Struct("<QQQQ")
# struct uffdio_range {u64 start, len}
UFFDIO_RANGE_STRUCT = struct.Struct("<QQ")
# struct uffdio_copy {u64 dst, src, len, mode; s64 copy}
UFFDIO_COPY_STRUCT = struct.Struct("<QQQQq")
# struct uffd_msg: u8 event, 7 reserved bytes, then a 24-byte union; for a page
# fault {u64 flags, address; u32 ptid}, for REMOVE/UNMAP {u64 start, end}.
UFFD_MSG_SIZE = 32
UFFD_MSG_STRUCT = struct.Struct("<B7xQQQ")


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAA << 8) | nr


_IOC_WRITE, _IOC_READ = 1, 2
_UFFDIO_REGISTER, _UFFDIO_UNREGISTER, _UFFDIO_WAKE, _UFFDIO_COPY = 0x00, 0x01, 0x02, 0x03
_UFFDIO_ZEROPAGE, _UFFDIO_API = 0x04, 0x3F
UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_API, UFFDIO_API_STRUCT.size)
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_REGISTER, UFFDIO_REGISTER_STRUCT.size)
UFFDIO_UNREGISTER = _ioc(_IOC_READ, _UFFDIO_UNREGISTER, UFFDIO_RANGE_STRUCT.size)
UFFDIO_WAKE = _ioc(_IOC_READ, _UFFDIO_WAKE, UFFDIO_RANGE_STRUCT.size)
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_COPY, UFFDIO_COPY_STRUCT.size)

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0

UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_EVENT_UNMAP = 1 << 6

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0

# What we ask of UFFDIO_API: Firecracker's UffdBuilder.require_features(EVENT_REMOVE).
FEATURES = UFFD_FEATURE_EVENT_REMOVE

# How long connect() and the handshake may take before we give up on a handler.
HANDSHAKE_TIMEOUT = 10.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


# -- creating the userfaultfd -----------------------------------------------------------------

def _no_uffd(err: int) -> SnapshotError:
    if err == errno.ENOSYS:
        return SnapshotError("this kernel has no userfaultfd (CONFIG_USERFAULTFD): restore "
                             "the snapshot with the File memory backend instead")
    if err in (errno.EPERM, errno.EACCES):
        return SnapshotError(
            "not allowed to create a userfaultfd that also sees KVM's faults: run pyvmm with "
            "CAP_SYS_PTRACE (as root), give it read-write access to /dev/userfaultfd, or "
            "`sysctl vm.unprivileged_userfaultfd=1`")
    return SnapshotError(f"cannot create a userfaultfd: {os.strerror(err)}")


def create_userfaultfd(flags: int = os.O_CLOEXEC | os.O_NONBLOCK) -> int:
    """A new userfaultfd, from the system call or, where that is refused (EPERM:
    kernel-mode faults need CAP_SYS_PTRACE unless vm.unprivileged_userfaultfd=1),
    from /dev/userfaultfd, whose file permissions decide instead."""
    fd = _libc.syscall(SYS_userfaultfd, flags)
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err != errno.EPERM:
        raise _no_uffd(err)
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise _no_uffd(errno.EPERM if exc.errno == errno.ENOENT else exc.errno) from None
    try:
        return fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
    except OSError as exc:
        raise _no_uffd(exc.errno) from None
    finally:
        os.close(dev)


def uffdio_api(uffd: int, features: int = FEATURES) -> tuple[int, int]:
    """The UFFDIO_API handshake with the kernel (once per userfaultfd): (features
    granted, ioctls available)."""
    arg = bytearray(UFFDIO_API_STRUCT.pack(UFFD_API, features, 0))
    try:
        fcntl.ioctl(uffd, UFFDIO_API, arg, True)
    except OSError as exc:
        raise SnapshotError(f"this kernel's userfaultfd lacks the features Firecracker's "
                            f"handlers expect ({features:#x}): {exc.strerror}") from None
    _, granted, ioctls = UFFDIO_API_STRUCT.unpack(arg)
    return granted, ioctls


def register_missing(uffd: int, start: int, length: int) -> int:
    """Register [start, start+length) for MISSING faults; the range ioctls it allows."""
    arg = bytearray(UFFDIO_REGISTER_STRUCT.pack(start, length, UFFDIO_REGISTER_MODE_MISSING, 0))
    fcntl.ioctl(uffd, UFFDIO_REGISTER, arg, True)
    return UFFDIO_REGISTER_STRUCT.unpack(arg)[3]


# -- the handshake -----------------------------------------------------------------------------

def uffd_mappings(memory: GuestMemory) -> list[dict[str, int]]:
    """Firecracker's GuestRegionUffdMapping for each region, fields in its order."""
    mappings, offset = [], 0
    for region in memory.regions:
        mappings.append({"base_host_virt_addr": region.host_addr, "size": region.size,
                         "offset": offset, "page_size": os.sysconf("SC_PAGE_SIZE"),
                         "page_size_kib": os.sysconf("SC_PAGE_SIZE")})
        offset += region.size
    return mappings


def handshake_message(mappings: list[dict[str, Any]]) -> bytes:
    """The bytes Firecracker sends: serde_json::to_string, compact, no newline."""
    return json.dumps(mappings, separators=(",", ":")).encode()


def send_handshake(sock: socket.socket, mappings: list[dict[str, Any]], uffd: int,
                   backend_path: str) -> None:
    """The one message: the mappings' JSON with the userfaultfd as SCM_RIGHTS."""
    data = handshake_message(mappings)
    try:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [uffd]))])
        if sent < len(data):                # the fd went with the first part
            sock.sendall(data[sent:])
    except (BrokenPipeError, ConnectionResetError):
        raise SnapshotError(f"the UFFD handler at {backend_path} closed the connection "
                            "before taking the guest memory: see the handler's log") from None
    except TimeoutError:
        raise SnapshotError(f"the UFFD handler at {backend_path} did not take the guest "
                            f"memory within {HANDSHAKE_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise SnapshotError(f"cannot send the guest memory to the UFFD handler at "
                            f"{backend_path}: {exc.strerror}") from None


def connect_handler(backend_path: str) -> socket.socket:
    """A connection to the handler listening at backend_path (AF_UNIX, SOCK_STREAM)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        sock.connect(backend_path)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, FileNotFoundError):
            raise SnapshotError(f"no UFFD handler at {backend_path}: the socket does not "
                                "exist; start the page-fault handler first") from None
        if isinstance(exc, ConnectionRefusedError):
            raise SnapshotError(f"the UFFD handler socket {backend_path} refused the "
                                "connection: no handler listens there any more") from None
        if isinstance(exc, TimeoutError):
            raise SnapshotError(f"the UFFD handler at {backend_path} did not accept the "
                                f"connection within {HANDSHAKE_TIMEOUT:.0f} s") from None
        if isinstance(exc, OSError):
            raise SnapshotError(f"cannot connect to the UFFD handler at {backend_path}: "
                                f"{exc.strerror}") from None
        raise
    return sock


# The connection to each userfaultfd's handler, by the userfaultfd's number, until
# close_uffd_backend(); and, whatever the caller does, until its guest RAM is gone.
_connections: dict[int, socket.socket] = {}


def _hang_up(uffd: int, sock: socket.socket) -> None:
    if _connections.get(uffd) is sock:
        del _connections[uffd]
    sock.close()


def attach_uffd_backend(memory: GuestMemory, backend_path: str) -> int:
    """Hand guest RAM to the page-fault handler listening at backend_path, as
    Firecracker does; the userfaultfd (keep it open while the VM lives, then
    close_uffd_backend() it after guest RAM is closed).

    memory: GuestMemory(layout, anonymous=True), whose pages nobody has touched yet
    (a page already there is never faulted for, so never comes from the snapshot)."""
    backend_path = os.fspath(backend_path)
    if memory.backend != "anonymous":
        raise SnapshotError("the Uffd memory backend needs anonymous guest memory "
                            f"(GuestMemory(layout, anonymous=True)), not {memory.backend!r}")
    uffd = create_userfaultfd()
    sock = None
    try:
        uffdio_api(uffd)
        for region in memory.regions:
            try:
                ioctls = register_missing(uffd, region.host_addr, region.size)
            except OSError as exc:
                raise SnapshotError(f"cannot register guest memory at {region.gpa:#x} with "
                                    f"the userfaultfd: {exc.strerror}") from None
            if not ioctls & (1 << _UFFDIO_COPY):
                raise SnapshotError("the kernel does not allow UFFDIO_COPY into guest "
                                    "memory: a handler could not serve it")
        sock = connect_handler(backend_path)
        send_handshake(sock, uffd_mappings(memory), uffd, backend_path)
    except BaseException:
        os.close(uffd)
        if sock is not None:
            sock.close()
        raise
    sock.setblocking(True)
    _connections[uffd] = sock
    # A caller that forgets close_uffd_backend() still hangs up when the RAM goes.
    weakref.finalize(memory, _hang_up, uffd, sock)
    return uffd


def close_uffd_backend(uffd: int) -> None:
    """Close the userfaultfd and hang up on its handler (which then exits); after
    guest RAM is closed.  Faults still pending are never served after this."""
    sock = _connections.pop(uffd, None)
    try:
        os.close(uffd)
    finally:
        if sock is not None:
            sock.close()

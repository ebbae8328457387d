"""A page-fault handler for the `Uffd` memory backend: fills a restored guest's RAM
from a snapshot's memory file, one page at a time, as the guest touches it.

    python3 -m pyvmm.snapshot.uffd_handler SOCKET_PATH MEM_FILE

then restore with `"mem_backend": {"backend_type": "Uffd", "backend_path":
"SOCKET_PATH"}`.  It speaks Firecracker's protocol (see pyvmm.snapshot.uffd, and
Firecracker's src/firecracker/examples/uffd/uffd_utils.rs and
on_demand_handler.rs, which this follows), so it serves Firecracker as well as
pyvmm, and Firecracker's handlers serve pyvmm.

How it works:

1. It binds SOCKET_PATH and accepts one VMM.
2. The VMM sends one message: a JSON list of its guest memory regions (where
   each is mapped in the VMM, its size, where its bytes start in the memory
   file, its page size), with the userfaultfd attached (SCM_RIGHTS).
3. Each time the guest (or KVM, or the VMM itself) touches a page of guest RAM
   that is not there yet, the kernel stops that thread and queues a page-fault
   event on the userfaultfd.  We read it, find the region, and UFFDIO_COPY the
   page from the memory file into place: the kernel allocates the page in the
   VMM, copies our bytes into it and wakes the thread.  A page is faulted for
   at most once: afterwards it is ordinary memory of the VMM's.
4. It exits when the VMM hangs up (the VMM keeps the connection open while its
   VM lives, so the hang-up means the VM is gone) or its address space is gone
   (UFFDIO_COPY fails with ESRCH).

On stdout it prints one JSON line at exit: the counters (faults, pages, bytes...).

As a library, `UffdHandler(socket_path, mem_file)` with `start()` (a thread),
`close()`, `wait()` and the same counters.  Beware of serving a VMM in the same
process: a thread that touches a missing guest page while it holds the GIL (a
Python device reading guest RAM) blocks in the kernel with the GIL, and the
handler thread then never gets to serve it.  vCPU threads (in C, no GIL) and
ctypes calls are fine; for anything else run the handler as a process.
"""
from __future__ import annotations

import argparse
import array
import ctypes
import errno
import fcntl
import json
import logging
import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from pyvmm import seccomp
from pyvmm.snapshot.uffd import (UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMOVE, UFFD_MSG_SIZE,
                                 UFFD_MSG_STRUCT, UFFDIO_COPY, UFFDIO_COPY_STRUCT,
                                 UFFDIO_RANGE_STRUCT, UFFDIO_UNREGISTER)

log = logging.getLogger("pyvmm.uffd_handler")

MAX_MESSAGE = 64 << 10       # the mappings' JSON: ~110 bytes a region
EVENTS_PER_READ = 64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_POPULATE = 0x8000


class HandlerError(Exception):
    """The handler cannot go on (a bad handshake, a fault it cannot serve)."""


class VmmGone(Exception):
    """The VMM hung up or its address space is gone: nothing left to serve."""


@dataclass(frozen=True)
class Mapping:
    """Firecracker's GuestRegionUffdMapping (its deprecated page_size_kib unused)."""
    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int

    def contains(self, addr: int) -> bool:
        return self.base_host_virt_addr <= addr < self.base_host_virt_addr + self.size


def parse_mappings(body: bytes, file_size: int) -> list[Mapping]:
    """The handshake's JSON, checked against the memory file (HandlerError)."""
    try:
        items = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise HandlerError(f"the VMM's message is not JSON: {body[:200]!r}") from None
    if type(items) is not list or not items:
        raise HandlerError(f"the VMM's message is not a list of regions: {body[:200]!r}")
    mappings = []
    for item in items:
        try:
            mapping = Mapping(**{k: item[k] for k in
                                 ("base_host_virt_addr", "size", "offset", "page_size")})
        except (KeyError, TypeError):
            raise HandlerError(f"a region lacks Firecracker's fields: {item!r}") from None
        if any(type(v) is not int or v < 0 for v in vars(mapping).values()) or \
                mapping.page_size < 4096 or mapping.page_size & (mapping.page_size - 1) or \
                mapping.base_host_virt_addr % mapping.page_size or \
                mapping.size % mapping.page_size or mapping.offset % mapping.page_size:
            raise HandlerError(f"a region is not made of whole pages: {item!r}")
        if mapping.offset + mapping.size > file_size:
            raise HandlerError(f"a region ends at {mapping.offset + mapping.size} bytes into "
                               f"the memory file, which has {file_size}")
        mappings.append(mapping)
    # Firecracker's handlers insist on this too: it catches the wrong memory file.
    total = sum(m.size for m in mappings)
    if total != file_size:
        raise HandlerError(f"the VMM's guest has {total} bytes of RAM but the memory file "
                           f"has {file_size}: is it this snapshot's memory file?")
    return mappings


class UffdHandler:
    """Serves one VMM's page faults from a snapshot's memory file.

    start() binds socket_path at once (a VMM may connect as soon as it returns)
    and serves in a thread; run() does the same in the caller's thread.
    kill_vmm_on_error: SIGKILL the VMM when a fault cannot be served, as
    Firecracker's example handlers do, rather than leave its vCPU stuck on it."""

    def __init__(self, socket_path: str | os.PathLike, mem_file: str | os.PathLike, *,
                 populate: bool = False, kill_vmm_on_error: bool = False) -> None:
        self.socket_path = os.fspath(socket_path)
        self.mem_file = os.fspath(mem_file)
        self.populate = populate
        self.kill_vmm_on_error = kill_vmm_on_error
        # Counters (one writer, the serving thread).
        self.faults = 0             # page-fault events read
        self.pages_copied = 0       # pages (of their region's page size) put in place
        self.bytes_copied = 0
        self.already_present = 0    # EEXIST: another event for the same page was served
        self.retries = 0            # EAGAIN: deferred until pending REMOVE events are read
        self.removes = 0            # REMOVE events (a balloon's MADV_DONTNEED)
        self.vmm_unmapped = 0       # ENOENT: the VMM unmapped the page meanwhile
        self.mappings: list[Mapping] = []
        self.peer_pid: int | None = None
        self.error: str | None = None       # why serving stopped, if not a clean hang-up
        self.connected_at: float | None = None
        self.first_fault_at: float | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._uffd = -1
        self._mem_addr = 0
        self._mem_size = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._closed = False
        # The serving thread's "uffd" filter: on in the handler's own process (main()),
        # off for handlers started in a caller's process unless set.
        self.seccomp: seccomp.Policy | None = None

    # -- setting up ---------------------------------------------------------------------------

    def listen(self) -> None:
        """Map the memory file and bind the socket; once only."""
        if self._listener is not None:
            return
        fd = os.open(self.mem_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise HandlerError(f"the memory file {self.mem_file} is empty")
            # Read-only and private: we only ever copy out of it.  MAP_POPULATE (what
            # Firecracker's examples do) reads it all in now, so faults never wait
            # for the disk; without it the first fault on a page reads it.
            flags = mmap.MAP_PRIVATE | (MAP_POPULATE if self.populate else 0)
            addr = _libc.mmap(None, size, mmap.PROT_READ, flags, fd, 0)
            if addr in (None, MAP_FAILED):
                raise HandlerError(f"cannot map {self.mem_file}: "
                                   f"{os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)
        self._mem_addr, self._mem_size = addr, size
        # Bind a temporary name and rename it into place once listening: a VMM that
        # sees socket_path can connect (no window where it exists but refuses).
        tmp = f"{self.socket_path}.{os.getpid()}.tmp"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if os.path.lexists(self.socket_path):
                raise HandlerError(f"{self.socket_path} already exists: remove it or pick "
                                   "another path")
            listener.bind(tmp)
            listener.listen(1)
            os.rename(tmp, self.socket_path)
        except BaseException:
            listener.close()
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        self._listener = listener
        log.info("listening on %s for a VMM; memory file %s (%d bytes)",
                 self.socket_path, self.mem_file, size)

    def start(self) -> "UffdHandler":
        """listen(), then accept and serve in a daemon thread."""
        self.listen()
        self._thread = threading.Thread(target=self.run, name="uffd-handler", daemon=True)
        self._thread.start()
        return self

    def _wait_readable(self, fd: int, timeout_ms: int | None = None) -> bool:
        """Until fd is readable (True) or timeout_ms (False); VmmGone on close()."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        ready = [fd for fd, _ in poller.poll(timeout_ms)]
        if self._wake_r in ready:
            raise VmmGone("closed")
        return bool(ready)

    def _accept_vmm(self) -> None:
        assert self._listener is not None
        self._wait_readable(self._listener.fileno())
        conn, _ = self._listener.accept()
        self._conn = conn
        self.connected_at = time.monotonic()
        # Who the VMM is, for the log and for kill_vmm_on_error (Firecracker's
        # handlers do the same: the VMM does not send its pid).
        pid, _, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
        self.peer_pid = pid
        body = bytearray()
        while True:
            # The VMM sends it all in one sendmsg, but a stream may deliver it in
            # parts: after the first, wait a little for more while it does not parse.
            if not self._wait_readable(conn.fileno(), 1000 if body else None):
                break                   # parse_mappings reports what is wrong with it
            data, ancdata, flags, _ = conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4),
                                                   socket.MSG_CMSG_CLOEXEC)
            fds = [fd for level, kind, payload in ancdata
                   if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                   for fd in array.array("i", payload[:len(payload) - len(payload) % 4])]
            for fd in fds:              # the first fd is the userfaultfd; no others are sent
                if self._uffd < 0:
                    self._uffd = fd
                else:
                    os.close(fd)
            if flags & socket.MSG_CTRUNC:
                raise HandlerError("the VMM sent more file descriptors than the userfaultfd")
            if not data:
                raise HandlerError("the VMM hung up before sending its guest memory")
            body += data
            try:
                json.loads(body)
                break
            except ValueError:
                if len(body) >= MAX_MESSAGE:
                    break
        self.mappings = parse_mappings(bytes(body), self._mem_size)
        if self._uffd < 0:
            raise HandlerError("the VMM sent its guest memory without a userfaultfd")
        # poll() on a blocking userfaultfd reports POLLERR: Firecracker and pyvmm
        # create it non-blocking, another VMM might not.
        if os.get_blocking(self._uffd):
            os.set_blocking(self._uffd, False)
        log.info("serving VMM pid %d: %d region(s), %d bytes", pid, len(self.mappings),
                 sum(m.size for m in self.mappings))

    # -- serving ------------------------------------------------------------------------------

    def run(self) -> None:
        """Accept one VMM and serve its faults until it hangs up or close() is called.
        Sets .error (and logs it) when it stops for any other reason."""
        try:
            if self._listener is None:
                self.listen()
            seccomp.enter_thread("uffd", self.seccomp)
            self._accept_vmm()
            self._serve()
        except VmmGone as gone:
            log.info("stopped: %s", gone)
        except HandlerError as exc:
            self._fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - reported, the thread must not die silently
            self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            self._done.set()

    def _fail(self, message: str) -> None:
        self.error = message
        log.error("%s", message)
        if self.kill_vmm_on_error and self.peer_pid:
            # As Firecracker's handlers' panic hook: a VMM whose faults nobody serves
            # would hang for ever; better that it dies and says so.
            log.error("killing the VMM (pid %d)", self.peer_pid)
            try:
                os.kill(self.peer_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _serve(self) -> None:
        assert self._conn is not None
        conn, uffd = self._conn, self._uffd
        poller = select.poll()
        poller.register(uffd, select.POLLIN)
        # The connection only ever says that the VMM is gone (hang-up or EOF).
        poller.register(conn.fileno(), select.POLLIN | select.POLLRDHUP)
        poller.register(self._wake_r, select.POLLIN)
        deferred: list[int] = []
        while True:
            for fd, revents in poller.poll(0 if deferred else None):
                if fd == self._wake_r:
                    raise VmmGone("closed")
                if fd == conn.fileno():
                    self._check_connection(conn, revents)
                elif revents & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    raise VmmGone("the userfaultfd reports an error or hang-up")
            # Like Firecracker's on_demand_handler: read every queued event first,
            # then serve, deferring faults that meet EAGAIN (a REMOVE event is still
            # queued) to the next round.
            addresses = deferred + self._read_faults()
            deferred = [addr for addr in addresses if not self._serve_fault(addr)]

    def _check_connection(self, conn: socket.socket, revents: int) -> None:
        if revents & select.POLLIN:
            try:
                data = conn.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                raise VmmGone(f"the VMM (pid {self.peer_pid}) hung up")
            if data:
                log.warning("ignored %d unexpected bytes from the VMM", len(data))
        if revents & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
            raise VmmGone(f"the VMM (pid {self.peer_pid}) hung up")

    def _read_faults(self) -> list[int]:
        """The addresses of the page faults queued on the userfaultfd; other events
        are dealt with here."""
        addresses = []
        while True:
            try:
                data = os.read(self._uffd, UFFD_MSG_SIZE * EVENTS_PER_READ)
            except BlockingIOError:
                return addresses
            for at in range(0, len(data) - UFFD_MSG_SIZE + 1, UFFD_MSG_SIZE):
                event, a, b, _ = UFFD_MSG_STRUCT.unpack_from(data, at)
                if event == UFFD_EVENT_PAGEFAULT:      # a = flags, b = address
                    self.faults += 1
                    if self.first_fault_at is None:
                        self.first_fault_at = time.monotonic()
                    addresses.append(b)
                elif event == UFFD_EVENT_REMOVE:       # [a, b) was madvise(DONTNEED)'d
                    # As Firecracker's example: stop handling the range, so that later
                    # faults there get zero pages from the kernel, not the snapshot.
                    fcntl.ioctl(self._uffd, UFFDIO_UNREGISTER,
                                UFFDIO_RANGE_STRUCT.pack(a, b - a))
                    self.removes += 1
                else:
                    log.warning("ignored an unexpected userfaultfd event %#x", event)
            if len(data) < UFFD_MSG_SIZE * EVENTS_PER_READ:
                return addresses

    def _serve_fault(self, addr: int) -> bool:
        """Copy the page holding addr from the memory file; False to retry later."""
        for mapping in self.mappings:
            if mapping.contains(addr):
                break
        else:
            raise HandlerError(f"page fault at {addr:#x}, outside the VMM's "
                               f"{len(self.mappings)} region(s): cannot serve it")
        page = addr & ~(mapping.page_size - 1)
        src = self._mem_addr + mapping.offset + (page - mapping.base_host_virt_addr)
        return self._copy(page, src, mapping.page_size)

    def _copy(self, dst: int, src: int, length: int) -> bool:
        while length:
            arg = bytearray(UFFDIO_COPY_STRUCT.pack(dst, src, length, 0, 0))
            try:
                fcntl.ioctl(self._uffd, UFFDIO_COPY, arg, True)
                copied = length
            except OSError as exc:
                copied = UFFDIO_COPY_STRUCT.unpack(arg)[4]
                if exc.errno == errno.EEXIST:
                    # The page is already there: an earlier event for it was served,
                    # and that copy woke every thread waiting on it.
                    self.already_present += 1
                    return True
                if exc.errno == errno.EAGAIN:
                    if copied > 0:      # part of a huge page: go on with the rest
                        self.bytes_copied += copied
                        dst, src, length = dst + copied, src + copied, length - copied
                        continue
                    # A REMOVE event is queued: the kernel refuses copies until we
                    # have read it.  Firecracker defers the fault; so do we.
                    self.retries += 1
                    return False
                if exc.errno == errno.ENOENT:
                    self.vmm_unmapped += 1      # the VMM unmapped it meanwhile
                    return True
                if exc.errno == errno.ESRCH:
                    raise VmmGone("the VMM's address space is gone") from None
                raise HandlerError(f"UFFDIO_COPY of {length} bytes to {dst:#x} failed: "
                                   f"{exc.strerror}") from None
            self.bytes_copied += copied
            self.pages_copied += 1
            return True
        return True

    # -- observing and stopping ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"faults": self.faults, "pages_copied": self.pages_copied,
                "bytes_copied": self.bytes_copied, "already_present": self.already_present,
                "retries": self.retries, "removes": self.removes,
                "vmm_unmapped": self.vmm_unmapped, "peer_pid": self.peer_pid,
                "regions": len(self.mappings), "error": self.error}

    def wait(self, timeout: float | None = None) -> bool:
        """Until serving has stopped (the VMM hung up, an error, close()); True if so."""
        return self._done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, then close everything and remove the socket.  Faults the VMM
        still takes afterwards are never served."""
        if self._closed:
            return
        self._closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the serving thread did not stop within %.1f s", timeout)
                return                  # it still uses the fds: leave them
        for sock in (self._conn, self._listener):
            if sock is not None:
                sock.close()
        if self._listener is not None:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        if self._uffd >= 0:
            os.close(self._uffd)
            self._uffd = -1
        if self._mem_addr:
            _libc.munmap(self._mem_addr, self._mem_size)
            self._mem_addr = 0
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> "UffdHandler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m pyvmm.snapshot.uffd_handler",
        description="Serve a restored VM's page faults from a snapshot's memory file "
                    "(Firecracker's Uffd memory backend).  Prints its counters as one JSON "
                    "line on stdout when the VMM hangs up.")
    parser.add_argument("socket_path", help="the Unix socket to listen on (the restore's "
                        "mem_backend.backend_path); must not exist yet")
    parser.add_argument("mem_file", help="the snapshot's memory file")
    parser.add_argument("--populate", action="store_true",
                        help="read the whole memory file in before serving (MAP_POPULATE)")
    parser.add_argument("--kill-vmm-on-error", action="store_true",
                        help="SIGKILL the VMM when a fault cannot be served, as Firecracker's "
                             "example handlers do")
    parser.add_argument("--no-seccomp", action="store_true",
                        help="serve without the seccomp filter (docs/seccomp.md)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO,
                        format="uffd-handler: %(message)s", stream=sys.stderr)
    handler = UffdHandler(args.socket_path, args.mem_file, populate=args.populate,
                          kill_vmm_on_error=args.kill_vmm_on_error)
    handler.seccomp = seccomp.resolve(not args.no_seccomp)
    # SIGTERM/SIGINT: stop serving and clean up (the socket file) like a hang-up.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: os.write(handler._wake_w, b"x"))
    try:
        handler.listen()
    except (HandlerError, OSError) as exc:
        log.error("%s", exc)
        return 1
    handler.run()
    print(json.dumps(handler.stats()), flush=True)
    status = 1 if handler.error else 0
    handler.close()
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Firecracker's Uffd memory backend: the VMM's handshake (pyvmm.snapshot.uffd) and our
page-fault handler (pyvmm.snapshot.uffd_handler), on fake VMMs and on restored tiny guests.

A "fake VMM" here is the test process with anonymous memory registered on a
userfaultfd; it touches that memory with ctypes.memmove, which releases the GIL, so
that a handler thread in this process can serve the fault meanwhile.
"""
from __future__ import annotations

import array
import ctypes
import fcntl
import gc
import json
import mmap
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvmm.memory import GuestMemory, MiB
from pyvmm.snapshot import uffd as U
from pyvmm.snapshot.format import SnapshotError
from pyvmm.snapshot.uffd import attach_uffd_backend, close_uffd_backend, send_handshake
from pyvmm.snapshot.uffd_handler import UffdHandler

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096
GiB = 1 << 30

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes that differ from page to page (a page's bytes say which page it is)."""
    return b"".join(struct.pack("<QQ", seed, page) * (PAGE // 16) for page in range(size // PAGE))


def touch(addr: int, length: int = PAGE) -> bytes:
    """Read guest memory without the GIL (a fault blocks only this thread)."""
    buf = ctypes.create_string_buffer(length)
    ctypes.memmove(buf, addr, length)
    return buf.raw


def eventually(condition, timeout: float = 5.0) -> bool:
    """The handler counts a page after its UFFDIO_COPY has woken the faulting thread:
    a counter may lag the fault's return by a moment."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def open_fds() -> set[str]:
    # Objects an earlier test dropped without closing are finalized by the garbage
    # collector whenever it runs, closing their fds: let that happen before counting.
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def mem_file(tmp_path):
    """(path, bytes): a 3 MiB memory file for the layout [(0, 1 MiB), (4 GiB, 2 MiB)]."""
    data = pattern(3 * MiB, seed=0x5EED)
    path = tmp_path / "mem"
    path.write_bytes(data)
    return path, data


LAYOUT = [(0, 1 * MiB), (4 * GiB, 2 * MiB)]


# -- the handshake --------------------------------------------------------------------------

def test_uffd_constants_are_the_kernels():
    """Our struct layouts and ioctl numbers, checked against <linux/userfaultfd.h>."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/linux/userfaultfd.h").exists():
        pytest.skip("no C compiler or kernel headers to check against")
    names = ["UFFDIO_API", "UFFDIO_REGISTER", "UFFDIO_UNREGISTER", "UFFDIO_WAKE", "UFFDIO_COPY",
             "UFFD_API", "UFFD_EVENT_PAGEFAULT", "UFFD_EVENT_REMOVE",
             "UFFD_FEATURE_EVENT_REMOVE", "UFFDIO_REGISTER_MODE_MISSING", "USERFAULTFD_IOC_NEW"]
    sizes = {"struct uffdio_api": U.UFFDIO_API_STRUCT.size,
             "struct uffdio_register": U.UFFDIO_REGISTER_STRUCT.size,
             "struct uffdio_copy": U.UFFDIO_COPY_STRUCT.size,
             "struct uffd_msg": U.UFFD_MSG_SIZE}
    src = "#include <stdio.h>\n#include <sys/ioctl.h>\n#include <sys/syscall.h>\n" \
          "#include <linux/userfaultfd.h>\n" \
          "int main(void) {\n" + "".join(
              f'printf("{n} %llu\\n", (unsigned long long)({n}));\n' for n in names) + \
          'printf("SYS_userfaultfd %d\\n", (int)SYS_userfaultfd);\n' + "".join(
              f'printf("{i} %zu\\n", sizeof({s}));\n' for i, s in enumerate(sizes)) + \
          'printf("pagefault.address %zu\\n", __builtin_offsetof(struct uffd_msg, ' \
          'arg.pagefault.address));\nreturn 0; }\n'
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"uffd-consts-{os.getpid()}"
    tmp.with_suffix(".c").write_text(src)
    try:
        subprocess.run([cc, "-o", str(tmp), str(tmp.with_suffix(".c"))], check=True)
        out = subprocess.run([str(tmp)], check=True, capture_output=True, text=True).stdout
    finally:
        tmp.with_suffix(".c").unlink()
        tmp.unlink(missing_ok=True)
    kernel = dict(line.split() for line in out.splitlines())
    for name in names:
        assert int(kernel[name]) == getattr(U, name), name
    assert int(kernel["SYS_userfaultfd"]) == U.SYS_userfaultfd
    for i, (struct_name, ours) in enumerate(sizes.items()):
        assert int(kernel[str(i)]) == ours, struct_name
    assert int(kernel["pagefault.address"]) == 16        # UFFD_MSG_STRUCT: "<B7xQQ..."


def test_handshake_is_firecrackers_one_message_with_the_uffd(tmp_path):
    path = str(tmp_path / "uffd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    memory = GuestMemory(LAYOUT, anonymous=True)
    uffd = attach_uffd_backend(memory, path)
    try:
        conn, _ = listener.accept()
        data, ancdata, flags, _ = conn.recvmsg(1024, socket.CMSG_SPACE(4 * 8))
        assert not flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC)
        # Byte for byte what Firecracker's serde_json::to_string writes (persist.rs,
        # GuestRegionUffdMapping): its field order, compact, offsets in the memory file.
        r0, r1 = memory.regions
        assert data == (
            f'[{{"base_host_virt_addr":{r0.host_addr},"size":1048576,"offset":0,'
            f'"page_size":4096,"page_size_kib":4096}},'
            f'{{"base_host_virt_addr":{r1.host_addr},"size":2097152,"offset":1048576,'
            f'"page_size":4096,"page_size_kib":4096}}]').encode()
        assert [list(m) for m in json.loads(data)] == [
            ["base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"]] * 2
        # Exactly one fd, SCM_RIGHTS, and it is our userfaultfd (same open file).
        assert [(level, kind) for level, kind, _ in ancdata] == \
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS)]
        fds = array.array("i", ancdata[0][2])
        assert len(fds) == 1
        received = fds[0]
        try:
            assert os.readlink(f"/proc/self/fd/{received}") == "anon_inode:[userfaultfd]"
            assert os.fstat(received).st_ino == os.fstat(uffd).st_ino
            assert fcntl.fcntl(received, fcntl.F_GETFL) & os.O_NONBLOCK
            assert fcntl.fcntl(uffd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        finally:
            os.close(received)
        # Nothing else is sent, and the VMM keeps the connection open (the handler
        # sees it hang up only when the VM is gone)...
        poller = select.poll()
        poller.register(conn, select.POLLIN | select.POLLRDHUP)
        assert poller.poll(50) == []
        memory.close()
    finally:
        close_uffd_backend(uffd)
    # ... which close_uffd_backend() does.
    assert conn.recv(16) == b""
    conn.close()
    listener.close()


def test_the_connection_goes_with_guest_ram_if_the_caller_just_closes_the_fd(tmp_path):
    """A caller that os.close()s the userfaultfd instead of close_uffd_backend()
    still hangs up on the handler once its guest RAM is gone."""
    path = str(tmp_path / "uffd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    memory = GuestMemory(LAYOUT, anonymous=True)
    os.close(attach_uffd_backend(memory, path))
    conn, _ = listener.accept()
    conn.recvmsg(1024, socket.CMSG_SPACE(4))
    conn.settimeout(5)
    memory.close()
    del memory
    assert conn.recv(16) == b""
    conn.close()
    listener.close()


def test_every_region_is_registered_for_missing_faults(tmp_path):
    """A second UFFDIO_REGISTER of a range says whether it was registered already:
    the kernel answers EBUSY for a range another userfaultfd holds."""
    path = str(tmp_path / "uffd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    memory = GuestMemory(LAYOUT, anonymous=True)
    uffd = attach_uffd_backend(memory, path)
    other = U.create_userfaultfd()
    try:
        U.uffdio_api(other)
        for region in memory.regions:
            with pytest.raises(OSError) as err:
                U.register_missing(other, region.host_addr, region.size)
            assert err.value.errno == 16        # EBUSY
    finally:
        os.close(other)
        memory.close()
        close_uffd_backend(uffd)
        listener.close()


def _one_line(exc: SnapshotError, path: str) -> str:
    message = str(exc)
    assert "\n" not in message and path in message
    return message


def test_a_missing_socket_is_one_line_naming_it(tmp_path):
    path = str(tmp_path / "nobody.sock")
    memory = GuestMemory(LAYOUT, anonymous=True)
    before = open_fds()
    with pytest.raises(SnapshotError) as err:
        attach_uffd_backend(memory, path)
    assert "does not exist" in _one_line(err.value, path)
    assert open_fds() == before                 # no userfaultfd or socket left behind
    memory.close()


def test_a_socket_nobody_listens_on_is_refused_in_one_line(tmp_path):
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)                            # bound, never listening: a dead handler's
    memory = GuestMemory(LAYOUT, anonymous=True)
    before = open_fds()
    with pytest.raises(SnapshotError) as err:
        attach_uffd_backend(memory, path)
    assert "refused" in _one_line(err.value, path)
    assert open_fds() == before
    stale.close()
    memory.close()


def test_a_handler_that_hung_up_is_one_line(tmp_path):
    ours, theirs = socket.socketpair()
    theirs.close()
    uffd = U.create_userfaultfd()
    try:
        with pytest.raises(SnapshotError) as err:
            send_handshake(ours, [{"base_host_virt_addr": 0, "size": PAGE, "offset": 0,
                                   "page_size": PAGE, "page_size_kib": PAGE}], uffd,
                           "/run/handler.sock")
        assert "closed the connection" in _one_line(err.value, "/run/handler.sock")
    finally:
        os.close(uffd)
        ours.close()


def test_only_anonymous_memory_can_be_served():
    memory = GuestMemory(LAYOUT)                # memfd-backed: shared, no MISSING faults
    with pytest.raises(SnapshotError, match="anonymous"):
        attach_uffd_backend(memory, "/nonexistent.sock")
    memory.close()


# -- the handler, in this process -------------------------------------------------------------

def test_the_handler_serves_each_page_from_the_memory_file(tmp_path, mem_file):
    path, data = mem_file
    sock = str(tmp_path / "uffd.sock")
    with UffdHandler(sock, path).start() as handler:
        memory = GuestMemory(LAYOUT, anonymous=True)
        uffd = attach_uffd_backend(memory, sock)
        try:
            r0, r1 = memory.regions
            # The fault's page, whatever the address in it, in both regions.
            assert touch(r0.host_addr + 5 * PAGE + 123, 16) == data[5 * PAGE + 123:][:16]
            assert touch(r1.host_addr) == data[MiB:MiB + PAGE]
            assert touch(r1.host_addr + r1.size - PAGE) == data[-PAGE:]
            assert eventually(lambda: handler.pages_copied == 3)
            assert (handler.faults, handler.bytes_copied) == (3, 3 * PAGE)
            # A page that is there is never asked for again...
            assert touch(r0.host_addr + 5 * PAGE) == data[5 * PAGE:6 * PAGE]
            assert handler.faults == 3
            # ... and a second event for it (two threads faulting at once) is EEXIST,
            # which the handler takes as served, as Firecracker's example does.
            assert handler._serve_fault(r0.host_addr + 5 * PAGE)
            assert handler.already_present == 1 and handler.pages_copied == 3
            # Writes stay in the VMM's private copy; the file is untouched.
            memory.write(0x5000, b"guest")
            assert path.read_bytes() == data
            assert handler.peer_pid == os.getpid() and handler.error is None
            assert [m.offset for m in handler.mappings] == [0, MiB]
        finally:
            memory.close()
            close_uffd_backend(uffd)
        assert handler.wait(5)                  # the hang-up ends it
        assert handler.error is None
    assert not os.path.exists(sock)


def test_remove_events_are_served_as_firecrackers_example(tmp_path, mem_file):
    """We ask for UFFD_FEATURE_EVENT_REMOVE as Firecracker does: madvise(MADV_DONTNEED)
    of guest RAM is a REMOVE event, and the handler unregisters the range, so that
    the page comes back as zeros from the kernel, not from the snapshot."""
    path, data = mem_file
    sock = str(tmp_path / "uffd.sock")
    with UffdHandler(sock, path).start() as handler:
        memory = GuestMemory(LAYOUT, anonymous=True)
        uffd = attach_uffd_backend(memory, sock)
        try:
            page = memory.regions[0].host_addr + 7 * PAGE
            assert touch(page) == data[7 * PAGE:8 * PAGE]
            # madvise waits until the handler has read the event: without the GIL.
            assert _libc.madvise(page, PAGE, mmap.MADV_DONTNEED) == 0
            # Read, not yet acted on: wait for the handler to unregister the range
            # (a fault before that would be served from the file; Firecracker's
            # example has the same race, see on_demand_handler.rs).
            assert eventually(lambda: handler.removes == 1)
            assert touch(page) == bytes(PAGE)
            assert handler.faults == 1
        finally:
            memory.close()
            close_uffd_backend(uffd)


def test_the_handler_refuses_a_memory_file_of_another_size(tmp_path, mem_file):
    path, _ = mem_file
    sock = str(tmp_path / "uffd.sock")
    with UffdHandler(sock, path).start() as handler:
        memory = GuestMemory([(0, 1 * MiB)], anonymous=True)
        uffd = attach_uffd_backend(memory, sock)
        assert handler.wait(5)
        assert "is it this snapshot's memory file" in handler.error
        memory.close()
        close_uffd_backend(uffd)


def test_the_handler_will_not_take_over_an_existing_path(tmp_path, mem_file):
    path, _ = mem_file
    sock = tmp_path / "uffd.sock"
    sock.write_text("")
    with pytest.raises(Exception, match="already exists"):
        UffdHandler(str(sock), path).start().close()
    assert sock.read_text() == ""


# -- the handler as a process -----------------------------------------------------------------

class HandlerProcess:
    """`python3 -m pyvmm.snapshot.uffd_handler SOCKET MEM_FILE`, ready when the socket is."""

    def __init__(self, sock: str, mem: str | os.PathLike, *args: str) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvmm.snapshot.uffd_handler", sock, os.fspath(mem), *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the handler did not start: {self.proc.stderr.read().decode()}")
            time.sleep(0.005)

    def finish(self, timeout: float = 10) -> tuple[int, dict, str]:
        """Its exit status, the counters it printed and its stderr."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the handler did not exit after the VMM hung up")
        lines = out.decode().splitlines()
        return self.proc.returncode, json.loads(lines[-1]) if lines else {}, err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def test_a_fault_outside_the_mappings_stops_the_handler_in_one_line(tmp_path):
    """A VMM that registers more than it describes: the handler cannot know what
    belongs there, says so and exits 1 (Firecracker's example panics).  The fault
    stays pending; the fake VMM unblocks its thread by unregistering the page."""
    data = pattern(PAGE, seed=7)
    (tmp_path / "mem").write_bytes(data)
    sock = str(tmp_path / "uffd.sock")
    handler = HandlerProcess(sock, tmp_path / "mem")
    area = mmap.mmap(-1, 2 * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    keep = ctypes.c_char.from_buffer(area)
    base = ctypes.addressof(keep)
    uffd = U.create_userfaultfd()
    conn = None
    try:
        U.uffdio_api(uffd)
        U.register_missing(uffd, base, 2 * PAGE)
        conn = U.connect_handler(sock)
        send_handshake(conn, [{"base_host_virt_addr": base, "size": PAGE, "offset": 0,
                               "page_size": PAGE, "page_size_kib": PAGE}], uffd, sock)
        assert touch(base) == data
        result: list[bytes] = []
        toucher = threading.Thread(target=lambda: result.append(touch(base + PAGE)))
        toucher.start()
        status, stats, err = handler.finish()
        assert status == 1
        assert f"page fault at {base + PAGE:#x}, outside the VMM's 1 region(s)" in err
        assert stats["faults"] == 2 and stats["pages_copied"] == 1 and stats["error"]
        assert toucher.is_alive()               # nobody will ever serve it...
        fcntl.ioctl(uffd, U.UFFDIO_UNREGISTER, U.UFFDIO_RANGE_STRUCT.pack(base + PAGE, PAGE))
        toucher.join(5)                         # ... until the range is no longer the uffd's
        assert result == [bytes(PAGE)]
    finally:
        handler.kill()
        os.close(uffd)
        if conn is not None:
            conn.close()
        del keep
        area.close()


# -- restoring tiny guests through the handler --------------------------------------------------

COUNTER, LIMIT, UNTOUCHED = 0x200000, 0x200008, 0x300000
# Counts in guest RAM, printing the counter's low byte to the debug console, until
# it reaches the limit (also in guest RAM), then writes it to the debug-exit port.
COUNTING_GUEST = f"""
    mov ${COUNTER}, %rbx
1:  mov (%rbx), %rax
    cmp 8(%rbx), %rax
    jae 3f
    inc %rax
    mov %rax, (%rbx)
    mov $0xe9, %dx
    out %al, %dx
    mov $200, %ecx
2:  dec %ecx
    jnz 2b
    jmp 1b
3:  mov $0xf4, %dx
    out %eax, %dx
    hlt
"""
STEPS_AFTER_RESTORE = 100


def snapshot_counting_guest(tmp_path: Path, mem_size: int):
    """Run the counting guest a while, pause it, save its state and RAM: (state,
    layout, memory file, counter when paused)."""
    from pyvmm.snapshot.memfile import write_full
    from pyvmm.testbed import Mode, TinyVm, assemble

    # irqchip: Machine.save_state() saves the LAPIC, which needs the in-kernel one.
    with TinyVm(Mode.LONG_RING0, mem_size=mem_size, irqchip=True) as vm:
        memory = vm.machine.memory
        memory.write_int(LIMIT, 8, 1 << 62)
        memory.write(UNTOUCHED, b"never touched by the guest")
        vm.load(assemble(COUNTING_GUEST, Mode.LONG_RING0))
        vm.machine.start()
        deadline = time.monotonic() + 30
        while len(vm.output) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        vm.machine.pause()
        state = vm.machine.save_state()
        counter = memory.read_int(COUNTER, 8)
        assert counter >= 20, vm.output
        mem_path = tmp_path / "snapshot.mem"
        write_full(memory, mem_path)
        layout = memory.layout
    # The restored guest stops STEPS_AFTER_RESTORE steps on: its limit, in the file.
    with open(mem_path, "r+b") as f:
        f.seek(LIMIT)
        f.write(struct.pack("<Q", counter + STEPS_AFTER_RESTORE))
    return state, layout, mem_path, counter


def restore_with_uffd(state, layout, sock: str):
    """A Machine on anonymous RAM handed to the handler at sock, as Firecracker's
    snapshot load does: (machine, debug console, userfaultfd)."""
    from pyvmm.devices.debug import DebugCon, DebugExit
    from pyvmm.machine import Machine
    from pyvmm.testbed import DEBUG_EXIT_MMIO

    memory = GuestMemory(layout, anonymous=True)
    try:
        uffd = attach_uffd_backend(memory, sock)
    except BaseException:
        memory.close()
        raise
    try:
        machine = Machine(layout=layout, irqchip=True, strict=True, memory=memory)
    except BaseException:
        close_uffd_backend(uffd)
        raise
    console = DebugCon(machine)
    DebugExit(machine, mmio_base=DEBUG_EXIT_MMIO)
    machine.restore_state(state)
    return machine, console, uffd


@pytest.mark.kvm
def test_a_restored_guest_counts_on_with_pages_from_a_handler_process(tmp_path):
    from pyvmm.kvm import OutcomeKind

    mem_size = 4 * MiB
    state, layout, mem_path, counter = snapshot_counting_guest(tmp_path, mem_size)
    sock = str(tmp_path / "uffd.sock")
    handler = HandlerProcess(sock, mem_path)
    try:
        machine, console, uffd = restore_with_uffd(state, layout, sock)
        try:
            outcome = machine.run(timeout=60)
            console.drain()
            assert outcome.kind == OutcomeKind.DEVICE_STOP, outcome.describe()
            # It went on from where it was paused: the counter's next values, in order,
            # up to the limit (the first may be repeated if it was paused just
            # between storing the counter and printing it).
            last = counter + STEPS_AFTER_RESTORE
            expected = bytes(n & 0xFF for n in range(counter + 1, last + 1))
            output = bytes(console.output)
            assert output in (expected, bytes([counter & 0xFF]) + expected), output
            assert machine.memory.read_int(COUNTER, 8) == last
            # The VMM's own reads of guest RAM fault too, and come from the snapshot.
            assert machine.memory.read(UNTOUCHED, 26) == b"never touched by the guest"
        finally:
            machine.close()
            close_uffd_backend(uffd)
        status, stats, err = handler.finish()
    finally:
        handler.kill()
    assert status == 0, err
    assert "hung up" in err
    # The guest touched a handful of pages (code, counter, page tables), each
    # copied once; never more than guest RAM.
    assert 0 < stats["faults"] and 0 < stats["pages_copied"] <= mem_size // PAGE
    assert stats["bytes_copied"] == stats["pages_copied"] * PAGE
    assert stats["error"] is None


@pytest.mark.kvm
def test_a_restored_guest_waits_for_a_slow_handler(tmp_path):
    """Until the handler takes the userfaultfd and serves, a vCPU faulting on guest
    RAM waits in the kernel; it runs on as soon as the pages come."""
    from pyvmm.kvm import OutcomeKind

    state, layout, mem_path, counter = snapshot_counting_guest(tmp_path, 4 * MiB)
    sock = str(tmp_path / "uffd.sock")
    handler = UffdHandler(sock, mem_path)
    handler.listen()                            # listening, not serving yet
    try:
        machine, console, uffd = restore_with_uffd(state, layout, sock)
        try:
            machine.start()
            time.sleep(0.3)
            assert console.drain() == b"" and machine.outcome is None
            handler.start()                     # the thread accepts and serves from here
            outcome = machine.wait(60)
            assert outcome is not None and outcome.kind == OutcomeKind.DEVICE_STOP
            assert machine.memory.read_int(COUNTER, 8) == counter + STEPS_AFTER_RESTORE
            assert handler.faults > 0
        finally:
            machine.close()
            close_uffd_backend(uffd)
        assert handler.wait(5) and handler.error is None
    finally:
        handler.close()

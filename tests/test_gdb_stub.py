"""The gdb stub's dispatcher and socket against tiny guests (pyvmm.gdb.server).

Hostile packets get E.. or empty replies and the VM keeps running; real gdb (Debian's
package) in batch mode drives a tiny guest through a Unix socket.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.gdb.protocol import MAX_PACKET, PacketReader, Kind, frame
from pyvmm.gdb.server import MAX_READ, GdbServer, Session
from pyvmm.gdb.target import StopKind
from pyvmm.kvm import OutcomeKind
from pyvmm.pvm import is_pvm_host
from pyvmm.testbed import LOAD_ADDR_LONG, Mode, TinyVm, assemble

pytestmark = pytest.mark.kvm
PVM = is_pvm_host()
GUEST = """
    mov $1, %rax
    mov $2, %rbx
    add %rbx, %rax
mark:
    mov $0xe9, %dx
    add $'0', %al
    out %al, %dx
    hlt
"""
MARK = LOAD_ADDR_LONG + 0x11


@pytest.fixture(scope="module")
def held_vm():
    """One tiny guest held at its entry for the module's dispatcher tests."""
    vm = TinyVm(Mode.LONG_RING0)
    vm.load(assemble(GUEST, Mode.LONG_RING0))
    vm.step()           # started under the debugger, held after one instruction
    yield vm
    vm.close()


def _session(vm: TinyVm) -> Session:
    return Session(vm.debugger)


def test_registers_and_memory(held_vm):
    s = _session(held_vm)
    regs = bytes.fromhex(s.handle(b"g")[0].decode())
    rip = int.from_bytes(regs[16 * 8:17 * 8], "little")
    assert rip == LOAD_ADDR_LONG + 7
    assert s.handle(b"p10") == [rip.to_bytes(8, "little").hex().encode()]
    code = assemble(GUEST, Mode.LONG_RING0)
    assert s.handle(f"m{LOAD_ADDR_LONG:x},10".encode()) == [code[:16].hex().encode()]
    assert s.handle(b"qfThreadInfo") == [b"m1"] and s.handle(b"qsThreadInfo") == [b"l"]
    assert s.handle(b"qAttached") == [b"1"]
    xml = s.handle(b"qXfer:features:read:target.xml:0,ffff")[0]
    assert xml.startswith(b"l<?xml") and b"i386:x86-64" in xml


@pytest.mark.parametrize("packet", [
    b"m7fffffff0000,10",               # outside RAM (identity-mapped, no RAM there)
    b"mffffffffffffffff,10",           # wraps
    b"m123456789abcdef0123,1",         # address too long
    b"M10000,4:zz",                    # bad hex
    b"M10000,8:00",                    # length does not match
    b"X10000,10:ab",
    b"Z0,7fffffff0000,1",              # breakpoint outside RAM
    b"Z9,10000,1",                     # unknown type
    b"Hgff",                           # no such thread
    b"pffff",                          # no such register
    b"P10=00",                         # wrong size
    b"qXfer:features:read:other.xml:0,10",
])
def test_hostile_packets_get_an_error(held_vm, packet):
    reply = _session(held_vm).handle(packet)
    assert len(reply) == 1 and reply[0].startswith(b"E"), reply


def test_huge_lengths_are_bounded(held_vm):
    reply = _session(held_vm).handle(f"m{LOAD_ADDR_LONG:x},ffffffffffffffff".encode())[0]
    assert len(reply) == 2 * MAX_READ and len(frame(reply)) <= MAX_PACKET + 4


def test_unknown_packets_get_the_empty_reply(held_vm):
    for packet in (b"vMustReplyEmpty", b"qTStatus", b"!", b"jThreadsInfo"):
        assert _session(held_vm).handle(packet) == [b""]


# Everything but the packets that resume or end the target.
_SAFE = st.binary(min_size=1, max_size=64).filter(
    lambda p: p[:1] not in (b"c", b"s", b"C", b"S", b"k", b"D", b"v", b"G", b"P", b"M", b"X",
                            b"Z", b"z", b"Q"))


@given(_SAFE)
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_packet_gets_a_reply_and_nothing_breaks(held_vm, packet):
    replies = _session(held_vm).handle(packet)
    assert replies and all(isinstance(r, bytes) and len(r) <= MAX_PACKET for r in replies)


def test_the_vm_runs_on_after_hostile_packets(held_vm):
    s = _session(held_vm)
    s.handle(b"mffffffffffffffff,ffffffff")
    s.handle(b"Z0,7fffffff0000,1")
    event = held_vm.cont()
    assert event.kind == StopKind.EXITED and event.outcome.kind == OutcomeKind.HALT
    assert held_vm.output == b"3"


def test_a_bad_checksum_is_nacked_and_the_session_goes_on(tmp_path):
    with TinyVm(Mode.LONG_RING0) as vm:
        vm.load(assemble(GUEST, Mode.LONG_RING0))
        vm.step()
        server = GdbServer(vm.debugger, str(tmp_path / "gdb.sock"))
        server.start()
        try:
            with socket.socket(socket.AF_UNIX) as conn:
                conn.connect(str(tmp_path / "gdb.sock"))
                conn.settimeout(10)
                conn.sendall(b"$g#00")
                assert conn.recv(1) == b"-"
                conn.sendall(frame(b"?"))
                reader, events = PacketReader(), []
                while not any(e.kind == Kind.PACKET for e in events):
                    events += reader.feed(conn.recv(4096))
                assert [e.data for e in events if e.kind == Kind.PACKET][0].startswith(b"T")
                conn.sendall(frame(b"D"))
                while not any(e.kind == Kind.PACKET and e.data == b"OK" for e in events):
                    events += reader.feed(conn.recv(4096))
            assert vm.machine.wait(10).kind == OutcomeKind.HALT
        finally:
            server.close()


def _gdb(sock: str, commands: list[str]) -> str:
    args = ["gdb", "-nx", "-batch", "-ex", "set architecture i386:x86-64",
            "-ex", f"target remote {sock}"]
    for command in commands:
        args += ["-ex", command]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


@pytest.mark.hwdebug
def test_real_gdb_steps_and_breaks_in_a_tiny_guest(tmp_path):
    if shutil.which("gdb") is None:
        pytest.fail("gdb is not installed: scripts/setup installs it")
    sock = str(tmp_path / "gdb.sock")
    with TinyVm(Mode.LONG_RING0) as vm:
        vm.load(assemble(GUEST, Mode.LONG_RING0))
        vm.debugger.hold_at_start()
        vm.machine.start()
        server = GdbServer(vm.debugger, sock)
        server.start()
        try:
            # On PVM gdb's watchpoint is refused at the continue, which then does not run.
            watch = ["watch *(long *)0x20000", "continue", "delete"] if PVM else []
            out = _gdb(sock, ["stepi", "stepi", "info registers rip rax",
                              f"hbreak *{MARK:#x}", "continue", "info registers rax",
                              "delete", f"break *{MARK + 4:#x}", "continue",
                              "info registers rip", *watch, "delete", "monitor pvm", "detach"])
            assert "rip            0x1000e" in out and "rax            0x1 " in out
            assert f"Breakpoint 1, {MARK:#018x}" in out and "rax            0x3 " in out
            assert f"Breakpoint 2, {MARK + 4:#018x}" in out
            if PVM:
                assert "Could not insert hardware watchpoint" in out
                assert "data watchpoints" in out and "not possible" in out
            assert "detached" in out
            assert vm.machine.wait(10).kind == OutcomeKind.HALT and vm.output == b"3"
        finally:
            server.close()


class _Client:
    """A bare RSP client: enough to test what gdb's batch mode cannot (Ctrl-C)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.settimeout(20)
        self.reader = PacketReader()
        self.events: list = []

    def packet(self) -> bytes:
        while True:
            for i, event in enumerate(self.events):
                if event.kind == Kind.PACKET:
                    del self.events[:i + 1]
                    return event.data
            self.events += self.reader.feed(self.sock.recv(4096))

    def ask(self, data: bytes) -> bytes:
        self.sock.sendall(frame(data))
        return self.packet()


def test_ctrl_c_stops_every_vcpu_and_each_vcpu_is_a_thread(tmp_path):
    with TinyVm(Mode.LONG_RING0, vcpus=2) as vm:
        vm.load(assemble("spin: inc %rax\njmp spin", Mode.LONG_RING0))
        vm.machine.start()                       # running before gdb comes
        server = GdbServer(vm.debugger, str(tmp_path / "gdb.sock"))
        server.start()
        try:
            client = _Client(str(tmp_path / "gdb.sock"))
            assert client.ask(b"qfThreadInfo") == b"m1,2"
            assert client.ask(b"?").startswith(b"T02thread:")   # attaching stopped it
            client.ask(b"Hg2")
            rax = bytes.fromhex(client.ask(b"p0").decode())
            client.sock.sendall(frame(b"vCont;c"))
            time.sleep(0.2)
            client.sock.sendall(b"\x03")
            assert client.packet().startswith(b"T02thread:")
            client.ask(b"Hg2")
            assert bytes.fromhex(client.ask(b"p0").decode()) != rax    # it ran meanwhile
            assert client.ask(b"T2") == b"OK" and client.ask(b"T3").startswith(b"E")
            assert client.ask(b"D") == b"OK"
            client.sock.close()
            assert vm.machine.wait(0.5) is None          # detached: it runs on
        finally:
            server.close()
            vm.machine.stop()


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_memory_reads_anywhere_are_data_or_an_error(held_vm, addr, length):
    reply = _session(held_vm).handle(f"m{addr:x},{length:x}".encode())[0]
    assert reply.startswith(b"E") or (len(reply) <= 2 * MAX_READ and
                                      bytes.fromhex(reply.decode()) is not None)

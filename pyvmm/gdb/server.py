"""The gdb stub's socket and session: `pyvmm run --gdb PATH|HOST:PORT [--gdb-wait]`.

One gdb at a time, on a Unix socket (`target remote /path`) or TCP
(`target remote host:port`).  On connection every vCPU is stopped (QEMU's
gdbstub does the same); each vCPU is a gdb thread, numbered from 1.  Detaching,
or gdb going away, removes every breakpoint and lets the guest run on.

The dispatcher (Session.handle) answers one packet at a time and never raises:
a malformed packet gets an E.. reply, an unknown one the empty reply, and the
VM keeps running whatever a peer sends.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pyvmm.errors import PyvmmError
from pyvmm.gdb import registers
from pyvmm.gdb.protocol import (MAX_PACKET, Event, Kind, PacketReader, ProtocolError,
                                addr_length, console, error, escape, frame, parse_hex, unhex)
from pyvmm.gdb.target import (PVM_NO_RING3_STEP, PVM_NO_WATCHPOINTS, Action, BpKind, Debugger,
                              DebugError, StopEvent, StopKind, Unsupported)
from pyvmm.kvm import KvmError
from pyvmm.kvm.debug import get_debugregs

log = logging.getLogger("pyvmm.gdb")

# errno-style codes in E replies (gdb ignores the number; these are for people).
EINVAL, EFAULT, ENOSPC, EPERM = 22, 14, 28, 1
# The most memory an m packet returns: two hex digits a byte within PacketSize.
MAX_READ = (MAX_PACKET - 8) // 2
MONITOR_HELP = """pyvmm gdb stub monitor commands:
  monitor phys on|off   memory packets use guest-physical (on) or -virtual (off) addresses
  monitor sregs         the current vCPU's segment and control registers
  monitor dr            the guest's own debug registers
  monitor pvm           what this host's KVM can and cannot do for a debugger
"""
PVM_SUMMARY = ("KVM PVM host: software and hardware breakpoints and single-step work in guest "
               "ring 0 (the kernel); data watchpoints, user-space (ring 3) breakpoints and "
               "stepping in ring 3 are not possible.\n")


def notice(text: str) -> None:
    """What cannot work: one line on pyvmm's stderr (gdb's console gets it too)."""
    print(f"pyvmm: gdb: {text}", file=sys.stderr, flush=True)


@dataclass
class Session:
    """One gdb connection's state and its packet dispatcher."""
    debugger: Debugger
    g_thread: int = 0                 # vCPU index for g/G/p/P/m/M (Hg)
    c_thread: int = 0                 # vCPU index for c/s (Hc); -1 all
    no_ack: bool = False
    running: bool = False
    gdb_features: set[str] = field(default_factory=set)
    last_stop: StopEvent | None = None
    pending_console: list[bytes] = field(default_factory=list)
    killed: bool = False
    detached: bool = False
    on_kill: Callable[[], None] = lambda: None

    # -- entry point -----------------------------------------------------------------

    def handle(self, packet: bytes) -> list[bytes]:
        """The replies to one packet, in order (empty list: no reply now, the target
        runs and a stop reply follows)."""
        try:
            reply = self._dispatch(packet)
        except Unsupported as exc:
            notice(str(exc))
            self.pending_console.append(console(str(exc) + "\n"))
            return [error(EPERM)]
        except (ProtocolError, DebugError, KvmError) as exc:
            log.debug("gdb packet %r: %s", packet[:40], exc)
            return [error(EFAULT if isinstance(exc, (DebugError, KvmError)) else EINVAL)]
        if reply is None:
            return []
        return reply if isinstance(reply, list) else [reply]

    def _dispatch(self, p: bytes) -> bytes | list[bytes] | None:
        if not p:
            return b""
        head, body = p[:1], p[1:]
        simple = {b"?": self._stop_reply_last, b"g": self._read_all,
                  b"D": self._detach, b"k": self._kill}
        if head in simple:
            return simple[head]()
        handlers = {b"G": self._write_all, b"p": self._read_one, b"P": self._write_one,
                    b"m": self._read_mem, b"M": self._write_mem, b"X": self._write_bin,
                    b"Z": self._insert, b"z": self._remove, b"H": self._set_thread,
                    b"T": self._thread_alive, b"c": self._cont, b"s": self._step,
                    b"C": self._cont_sig, b"S": self._step_sig}
        if head in handlers:
            return handlers[head](body)
        if p.startswith(b"q") or p.startswith(b"Q"):
            return self._query(p)
        if p.startswith(b"vCont?"):
            return b"vCont;c;C;s;S"
        if p.startswith(b"vCont;"):
            return self._vcont(p[6:])
        return b""                    # unknown: the empty reply (gdb/doc "Packets")

    # -- queries ---------------------------------------------------------------------

    def _query(self, p: bytes) -> bytes | list[bytes]:
        if p.startswith(b"qSupported"):
            if b":" in p:
                self.gdb_features = {f.decode("ascii", "replace")
                                     for f in p.split(b":", 1)[1].split(b";")[:64]}
            return (f"PacketSize={MAX_PACKET:x};qXfer:features:read+;swbreak+;hwbreak+;"
                    "vContSupported+;QStartNoAckMode+").encode()
        if p == b"QStartNoAckMode":
            self.no_ack = True
            return b"OK"
        if p.startswith(b"qXfer:features:read:"):
            return self._xfer_features(p[len(b"qXfer:features:read:"):])
        if p == b"qAttached" or p.startswith(b"qAttached:"):
            return b"1"
        if p == b"qC":
            return f"QC{self._tid(self.g_thread)}".encode()
        if p == b"qfThreadInfo":
            return b"m" + ",".join(self._tid(i) for i in range(self._nvcpus())).encode()
        if p == b"qsThreadInfo":
            return b"l"
        if p.startswith(b"qThreadExtraInfo,"):
            index = self._index(p.split(b",", 1)[1])
            ring = self.debugger.ring(index)
            return f"vCPU {index} (ring {ring})".encode().hex().encode()
        if p.startswith(b"qRcmd,"):
            return self._monitor(unhex(p[6:]).decode("utf-8", "replace").strip())
        if p == b"qSymbol::":
            return b"OK"
        return b""

    def _xfer_features(self, args: bytes) -> bytes:
        annex, _, span = args.partition(b":")
        if annex != b"target.xml":
            return error(EINVAL)
        offset, length = addr_length(span)
        data = registers.TARGET_XML.encode()
        chunk = data[offset:offset + min(length, MAX_READ)]
        more = offset + len(chunk) < len(data)
        return (b"m" if more else b"l") + escape(chunk)

    def _monitor(self, command: str) -> list[bytes]:
        words = command.split()
        debugger = self.debugger
        if words[:1] == ["phys"] and len(words) == 2 and words[1] in ("on", "off"):
            debugger.physical = words[1] == "on"
            text = f"memory addresses are guest-{'physical' if debugger.physical else 'virtual'}\n"
        elif words == ["sregs"]:
            s = debugger.vcpu(self.g_thread).get_sregs()
            text = "".join(f"{n}={getattr(s, n):#x}\n" for n in ("cr0", "cr2", "cr3", "cr4",
                                                                  "efer", "apic_base"))
            text += "".join(f"{n}: selector={getattr(s, n).selector:#x} base="
                            f"{getattr(s, n).base:#x} dpl={getattr(s, n).dpl}\n"
                            for n in ("cs", "ss", "ds", "fs", "gs", "tr"))
        elif words == ["dr"]:
            text = " ".join(f"{k}={v:#x}" for k, v in
                            get_debugregs(debugger.vcpu(self.g_thread)).items()) + "\n"
        elif words == ["pvm"]:
            text = PVM_SUMMARY if debugger.pvm else "hardware KVM: no known limits\n"
        else:
            text = MONITOR_HELP
        return [console(text), b"OK"]

    # -- threads ---------------------------------------------------------------------

    def _nvcpus(self) -> int:
        return len(self.debugger.machine.vcpus)

    @staticmethod
    def _tid(index: int) -> str:
        return f"{index + 1:x}"

    def _index(self, tid: bytes) -> int:
        """A gdb thread id (vCPU + 1; 'p1.N' multiprocess form too) to a vCPU index."""
        if tid.startswith(b"p"):
            tid = tid.split(b".", 1)[-1]
        number = parse_hex(tid)
        if not 1 <= number <= self._nvcpus():
            raise DebugError(f"no thread {number}")
        return number - 1

    def _set_thread(self, body: bytes) -> bytes:
        if len(body) < 2 or body[:1] not in (b"g", b"c"):
            return error(EINVAL)
        tid = body[1:]
        index = -1 if tid == b"-1" else (self.g_thread if tid == b"0" else self._index(tid))
        if body[:1] == b"g":
            self.g_thread = max(index, 0)
        else:
            self.c_thread = index
        return b"OK"

    def _thread_alive(self, body: bytes) -> bytes:
        self._index(body)
        return b"OK"

    # -- registers -------------------------------------------------------------------

    def _read_all(self) -> bytes:
        return b"".join(registers.read_registers(self.debugger.vcpu(self.g_thread))).hex().encode()

    def _write_all(self, body: bytes) -> bytes:
        data = unhex(body)
        new, offset = {}, 0
        for i, size in enumerate(registers.sizes()):
            if offset + size > len(data):
                break
            new[i] = data[offset:offset + size]
            offset += size
        registers.write_registers(self.debugger.vcpu(self.g_thread), new)
        return b"OK"

    def _read_one(self, body: bytes) -> bytes:
        number = parse_hex(body, 4)
        if number >= len(registers.REGISTERS):
            return error(EINVAL)
        return registers.read_registers(self.debugger.vcpu(self.g_thread))[number].hex().encode()

    def _write_one(self, body: bytes) -> bytes:
        number_text, _, value = body.partition(b"=")
        number = parse_hex(number_text, 4)
        if number >= len(registers.REGISTERS):
            return error(EINVAL)
        data = unhex(value)
        if len(data) != registers.sizes()[number]:
            return error(EINVAL)
        registers.write_registers(self.debugger.vcpu(self.g_thread), {number: data})
        return b"OK"

    # -- memory ----------------------------------------------------------------------

    def _read_mem(self, body: bytes) -> bytes:
        addr, length = addr_length(body)
        return self.debugger.read_memory(self.g_thread, addr, min(length, MAX_READ)).hex().encode()

    def _write_mem(self, body: bytes) -> bytes:
        spec, sep, data = body.partition(b":")
        if not sep:
            raise ProtocolError("M without data")
        addr, length = addr_length(spec)
        payload = unhex(data)
        if len(payload) != length:
            raise ProtocolError("M length does not match its data")
        self.debugger.write_memory(self.g_thread, addr, payload)
        return b"OK"

    def _write_bin(self, body: bytes) -> bytes:
        spec, sep, data = body.partition(b":")
        if not sep:
            raise ProtocolError("X without data")
        addr, length = addr_length(spec)
        if len(data) != length:
            raise ProtocolError("X length does not match its data")
        if length:
            self.debugger.write_memory(self.g_thread, addr, data)
        return b"OK"

    # -- breakpoints -----------------------------------------------------------------

    def _z_args(self, body: bytes) -> tuple[BpKind, int, int]:
        parts = body.split(b";", 1)[0].split(b",")
        if len(parts) != 3:
            raise ProtocolError("Z needs type,addr,kind")
        kind = parse_hex(parts[0], 1)
        if kind > BpKind.ACCESS:
            raise ProtocolError("unknown breakpoint type")
        return BpKind(kind), parse_hex(parts[1]), parse_hex(parts[2], 4)

    def _insert(self, body: bytes) -> bytes:
        kind, addr, length = self._z_args(body)
        self.debugger.insert(kind, addr, length, self.g_thread)
        return b"OK"

    def _remove(self, body: bytes) -> bytes:
        kind, addr, _ = self._z_args(body)
        self.debugger.remove(kind, addr)
        return b"OK"

    # -- running ---------------------------------------------------------------------

    def _resume(self, actions: dict[int, Action], default: Action | None,
                addr: bytes = b"") -> None:
        if addr:
            target = self.c_thread if self.c_thread >= 0 else self.g_thread
            self.debugger.vcpu(target).set_regs(rip=parse_hex(addr))
        self.debugger.resume(actions, default)
        self.running = True

    def _cont(self, body: bytes) -> None:
        self._resume({}, Action.CONTINUE, body)

    def _cont_sig(self, body: bytes) -> None:
        # A signal means nothing to a machine: continue as with c (QEMU does the same).
        self._resume({}, Action.CONTINUE, body.partition(b";")[2])

    def _step(self, body: bytes) -> None:
        # All-stop: the stepping vCPU alone runs (gdb's scheduler-locking step).
        target = self.c_thread if self.c_thread >= 0 else self.g_thread
        self._resume({target: Action.STEP}, None, body)

    def _step_sig(self, body: bytes) -> None:
        self._step(body.partition(b";")[2])

    def _vcont(self, body: bytes) -> None:
        actions: dict[int, Action] = {}
        default: Action | None = None
        for item in body.split(b";")[:64]:
            verb, _, tid = item.partition(b":")
            if not verb:
                raise ProtocolError("empty vCont action")
            letter = verb[:1].lower()
            if letter not in (b"c", b"s"):
                if letter == b"t":
                    continue            # non-stop's "stop": every thread already is
                raise ProtocolError("unknown vCont action")
            action = Action.CONTINUE if letter == b"c" else Action.STEP
            if not tid or tid == b"-1":
                default = default or action
            else:
                # The leftmost action that applies to a thread wins (gdb/doc "vCont").
                actions.setdefault(self._index(tid), action)
        self._resume(actions, default)

    def _detach(self) -> bytes:
        self.debugger.detach()
        self.detached = True
        return b"OK"

    def _kill(self) -> None:
        self.killed = True
        self.on_kill()
        return None

    # -- stop replies ----------------------------------------------------------------

    def stop_reply(self, event: StopEvent) -> bytes:
        self.last_stop = event
        if event.kind == StopKind.EXITED:
            return b"W00"
        self.g_thread = event.vcpu
        self.c_thread = event.vcpu
        reply = f"T{event.signal:02x}thread:{self._tid(event.vcpu)};"
        if event.kind == StopKind.SW_BREAK and "swbreak+" in self.gdb_features:
            reply += "swbreak:;"
        elif event.kind == StopKind.HW_BREAK and "hwbreak+" in self.gdb_features:
            reply += "hwbreak:;"
        elif event.kind == StopKind.WATCH:
            reply += f"watch:{event.addr:x};"
        return reply.encode()

    def _stop_reply_last(self) -> bytes:
        if self.last_stop is None:
            return b"S05"
        return self.stop_reply(self.last_stop)


def parse_address(address: str) -> tuple[int, str | tuple[str, int]]:
    """`PATH` (a Unix socket) or `HOST:PORT` (TCP) to a socket family and address."""
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and "/" not in address:
        if not 0 < int(port) < 65536:
            raise PyvmmError(f"--gdb {address}: the port must be 1 to 65535")
        return socket.AF_INET6 if ":" in host else socket.AF_INET, (host or "127.0.0.1",
                                                                     int(port))
    if not address:
        raise PyvmmError("--gdb: give a socket path or HOST:PORT")
    return socket.AF_UNIX, address


class GdbServer:
    """Listens for gdb and runs one session at a time, in a thread of its own."""

    def __init__(self, debugger: Debugger, address: str, *,
                 on_kill: Callable[[], None] | None = None) -> None:
        self.debugger = debugger
        self.address = address
        self.on_kill = on_kill or debugger.machine.stop
        family, where = parse_address(address)
        self._unix_path = where if family == socket.AF_UNIX else None
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_UNIX:
                path = Path(str(where))
                if path.is_socket():
                    path.unlink()       # a stale socket of an earlier run
                self.sock.bind(str(where))
            else:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self.sock.bind(where)
            self.sock.listen(1)
        except OSError as exc:
            self.sock.close()
            raise PyvmmError(f"--gdb {address}: cannot listen: {exc.strerror}") from None
        self.connected = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="gdb", daemon=True)

    @property
    def port(self) -> int | None:
        return None if self._unix_path else self.sock.getsockname()[1]

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self._unix_path:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass

    def _serve(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connected.set()
            try:
                with conn:
                    Connection(conn, self.debugger, self.on_kill).run()
            except Exception:  # noqa: BLE001 - a session's failure must not end the VM
                log.exception("the gdb session failed; the guest runs on")
                try:
                    self.debugger.detach()
                except Exception:  # noqa: BLE001
                    pass
            if self.debugger.machine._done.is_set():
                return


class Connection:
    """The byte stream of one session: acks, packets, Ctrl-C, stop replies."""

    def __init__(self, conn: socket.socket, debugger: Debugger,
                 on_kill: Callable[[], None]) -> None:
        self.conn = conn
        self.debugger = debugger
        self.reader = PacketReader()
        self.session = Session(debugger, on_kill=on_kill)
        self._last_sent = b""
        self._interrupted = False

    def send(self, packet: bytes) -> None:
        self._last_sent = frame(packet)
        self.conn.sendall(self._last_sent)

    def run(self) -> None:
        session = self.session
        if not self.debugger.all_stopped():
            session.last_stop = self.debugger.stop_all()
        else:
            session.last_stop = self.debugger.wait_stop(0) or session.last_stop
        try:
            while not (session.killed or session.detached):
                if session.running:
                    self._wait_running()
                    if session.last_stop and session.last_stop.kind == StopKind.EXITED:
                        return
                    continue
                data = self._recv(None)
                if data is None:
                    break
                self._on_events(self.reader.feed(data))
        finally:
            if not session.killed and not self.debugger.machine._done.is_set():
                self.debugger.detach()

    def _recv(self, timeout: float | None) -> bytes | None:
        """Bytes from gdb, b"" on timeout, None when gdb went away."""
        ready, _, _ = select.select([self.conn], [], [], timeout)
        if not ready:
            return b""
        try:
            data = self.conn.recv(65536)
        except OSError:
            return None
        return data or None

    def _on_events(self, events: list[Event]) -> None:
        session = self.session
        for event in events:
            if event.kind == Kind.INTERRUPT and session.running:
                self._interrupted = True        # came in the same read as the resume
            elif event.kind == Kind.BAD:
                self.conn.sendall(b"-")
            elif event.kind == Kind.NACK and self._last_sent:
                self.conn.sendall(self._last_sent)
            elif event.kind == Kind.PACKET:
                was_no_ack = session.no_ack
                if not was_no_ack:
                    self.conn.sendall(b"+")
                if session.running:
                    continue            # all-stop: nothing but Ctrl-C while running
                for reply in session.handle(event.data):
                    self.send(reply)
                if session.killed or session.detached:
                    return

    def _wait_running(self) -> None:
        """The guest runs: wait for a stop or for Ctrl-C, then send the stop reply."""
        session = self.session
        for text in session.pending_console:
            self.send(text)
        session.pending_console.clear()
        while True:
            if self._interrupted:
                self._interrupted = False
                event = self.debugger.stop_all()
                break
            data = self._recv(0.05)
            if data is None:
                session.running = False
                session.detached = True         # gdb went away: run() detaches
                return
            self._on_events(self.reader.feed(data))
            if self._interrupted:
                continue
            event = self.debugger.wait_stop(0)
            if event is not None:
                break
        session.running = False
        self.send(session.stop_reply(event))


__all__ = ["GdbServer", "Session", "parse_address", "PVM_NO_RING3_STEP", "PVM_NO_WATCHPOINTS"]

"""The host side of the guest agent: connectors and AgentClient.

A connection carries one operation at a time; for concurrency open several
(`AgentClient.connect(connector)` per thread or per command).  Every wait has a
deadline, so an agent that stops answering gives an AgentError, never a hang;
the one exception is a command run without a timeout, which may legitimately run
(silently) for ever: give `timeout=` to bound it.

    from pyvmm.agent import AgentClient, connect_vsock_uds
    connector = lambda: connect_vsock_uds("/tmp/v.sock", port=1024)
    with AgentClient.connect(connector) as agent:
        result = agent.exec(["sh", "-c", "echo hi; exit 3"])
        assert (result.stdout, result.returncode) == (b"hi\\n", 3)
"""
from __future__ import annotations

import collections
import os
import select
import socket
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Sequence

from pyvmm.agent import protocol as p
from pyvmm.agent.protocol import AgentError, Frame, FrameType, ProtocolError, Tag

DEFAULT_PORT = 1024               # the agent's vsock port (Kata's agent uses it too)
DEFAULT_TIMEOUT = 10.0            # seconds an answer may take before AgentError
CONNECT_RETRY_INTERVAL = 0.05     # between attempts while the guest is not listening yet
RECV_SIZE = 256 * 1024
SEND_QUEUE_LIMIT = 4 * p.DATA_CHUNK   # stdin queued ahead of the socket by exec()
VSOCK_REPLY_MAX = 64              # bytes of Firecracker's "OK <port>\n" answer we accept

Connector = Callable[[], socket.socket]


# -- connectors ----------------------------------------------------------------------------------

def connect_unix(path: str, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
    """A connection to an agent listening on a Unix socket (`pyvmm-agent --unix PATH`)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise AgentError(f"cannot connect to the agent's socket {path}: {exc.strerror or exc}") from None
    return sock


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    """One line, byte by byte: nothing after the newline belongs to us."""
    line = bytearray()
    while not line.endswith(b"\n"):
        if len(line) >= VSOCK_REPLY_MAX:
            break
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


def connect_vsock_uds(uds_path: str, port: int = DEFAULT_PORT,
                      timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
    """A connection to guest vsock `port` through the VMM's Unix socket (Firecracker's
    host side: write `CONNECT <port>\\n`, read `OK <host port>\\n`).  Retried until
    `timeout` while the socket does not exist yet or the guest is not listening."""
    deadline = time.monotonic() + timeout
    last = "nothing tried"
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(uds_path)
            sock.sendall(f"CONNECT {port}\n".encode())
            line = _read_line(sock, deadline)
            if line.startswith(b"OK ") and line.endswith(b"\n"):
                return sock
            last = f"the VMM answered {line!r}" if line else "the VMM closed the connection"
        except OSError as exc:
            last = exc.strerror or str(exc) or type(exc).__name__
        sock.close()
        if time.monotonic() + CONNECT_RETRY_INTERVAL >= deadline:
            raise AgentError(f"no agent answered on vsock port {port} through {uds_path} within "
                             f"{timeout:g} s ({last}): is the guest booted with the agent?")
        time.sleep(CONNECT_RETRY_INTERVAL)


# -- results -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AgentInfo:
    version: int
    build_id: str


@dataclass(frozen=True)
class Health:
    uptime_ms: int
    load1: float
    mem_total: int
    mem_free: int
    procs: int
    connections: int


def shell_status(exit_code: int | None, signal: int | None) -> int:
    """As a shell reports a command's end: its exit code, or 128 + the signal that ended it."""
    return exit_code if exit_code is not None else 128 + (signal or 0)


@dataclass(frozen=True)
class ExitStatus:
    """How a command ended: exit_code, or the signal that terminated it."""

    exit_code: int | None
    signal: int | None
    timed_out: bool

    @property
    def returncode(self) -> int:
        """Shell style: the exit code, or 128 + the terminating signal."""
        return shell_status(self.exit_code, self.signal)


@dataclass
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int | None
    signal: int | None
    timed_out: bool

    @property
    def returncode(self) -> int:
        """Shell style: the exit code, or 128 + the terminating signal."""
        return shell_status(self.exit_code, self.signal)


Event = tuple[str, object]   # ("stdout", bytes), ("stderr", bytes) or ("exit", ExitStatus)


# -- the connection ------------------------------------------------------------------------------

def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class _Channel:
    """A non-blocking socket with an outgoing queue and a frame decoder: sending never
    stops receiving, so neither side can deadlock on full buffers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self._out = bytearray()
        self._decoder = p.FrameDecoder()
        self.frames: collections.deque[Frame] = collections.deque()
        self.eof = False

    def queue(self, data: bytes) -> None:
        self._out += data

    def pending_out(self) -> int:
        return len(self._out)

    def pump(self, deadline: float | None) -> None:
        """Wait (until deadline) for the socket, then move what it takes both ways."""
        if self.sock.fileno() < 0:
            raise AgentError("the connection to the agent is closed")
        want_read = not self.eof
        want_write = bool(self._out)
        if not want_read and not want_write:
            raise AgentError("the agent closed the connection")
        wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
        poller = select.poll()   # not select(): a VMM process may hold more than 1024 fds
        poller.register(self.sock, (select.POLLIN if want_read else 0) | (select.POLLOUT if want_write else 0))
        events = poller.poll(wait_ms)
        revents = events[0][1] if events else 0
        readable = want_read and revents & (select.POLLIN | select.POLLHUP | select.POLLERR)
        writable = want_write and revents & (select.POLLOUT | select.POLLHUP | select.POLLERR)
        if not readable and not writable:
            raise AgentError(f"the agent did not answer within the deadline "
                             f"({'sending' if want_write else 'waiting for a reply'})")
        if readable:
            self._receive()
        if writable:
            self._send()

    def _receive(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.eof = True
            if not self.frames:
                raise AgentError(f"the connection to the agent broke: {exc.strerror or exc}") from None
            return
        if not data:
            self.eof = True
            return
        self.frames.extend(self._decoder.feed(data))

    def _send(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # the agent closed on us: its last frame (an ERROR, say) explains why
            self._out.clear()
            self.eof = True
            if not self.frames:
                raise AgentError(f"the connection to the agent broke: {exc.strerror or exc}") from None
            return
        del self._out[:sent]

    def flush(self, deadline: float | None) -> None:
        while self._out:
            self.pump(deadline)

    def next_frame(self, deadline: float | None) -> Frame:
        while not self.frames:
            if self.eof:
                raise AgentError("the agent closed the connection")
            self.pump(deadline)
        return self.frames.popleft()

    def close(self) -> None:
        self.sock.close()


def _raise_for(frame: Frame, doing: str) -> None:
    if frame.type == FrameType.ERROR:
        raise AgentError(f"the agent could not {doing}: {p.error_text(frame)}")
    raise ProtocolError(f"the agent answered {frame.type.name} while we were trying to {doing}")


# -- the client ----------------------------------------------------------------------------------

class AgentClient:
    """One connection to the agent; operations run one after another on it."""

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self.info: AgentInfo | None = None
        self._chan = _Channel(sock)
        self._running: Process | None = None

    @classmethod
    def connect(cls, connector: Connector, timeout: float = DEFAULT_TIMEOUT) -> "AgentClient":
        """A fresh connection from `connector`, greeted (HELLO) and ready."""
        client = cls(connector(), timeout)
        try:
            client.hello()
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        """Close the connection (a command still running on it is killed by the agent)."""
        self._chan.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --

    def _request(self, data: bytes) -> None:
        if self._running is not None and self._running.status is None:
            raise AgentError("this agent connection is busy with a command: wait for it, "
                             "or open another connection")
        self._running = None
        if self.info is None:
            self.hello()
        self._chan.queue(data)
        self._chan.flush(_deadline(self.timeout))

    def _answer(self) -> Frame:
        return self._chan.next_frame(_deadline(self.timeout))

    # -- operations --

    def hello(self, version: int = p.PROTOCOL_VERSION) -> AgentInfo:
        """Greet the agent (the first frame of a connection); its version and build id."""
        self._chan.queue(p.hello(version))
        self._chan.flush(_deadline(self.timeout))
        frame = self._answer()
        if frame.type != FrameType.HELLO:
            _raise_for(frame, "greet the client")
        fields = frame.fields()
        self.info = AgentInfo(fields.int(Tag.VERSION, 0) or 0, fields.text(Tag.BUILD_ID))
        return self.info

    def health(self) -> Health:
        self._request(p.encode_frame(FrameType.HEALTH))
        frame = self._answer()
        if frame.type != FrameType.OK:
            _raise_for(frame, "report its health")
        f = frame.fields()
        return Health(uptime_ms=f.int(Tag.UPTIME_MS, 0), load1=(f.int(Tag.LOAD1_MILLI, 0) or 0) / 1000,
                      mem_total=f.int(Tag.MEM_TOTAL, 0), mem_free=f.int(Tag.MEM_FREE, 0),
                      procs=f.int(Tag.PROCS, 0), connections=f.int(Tag.CONNECTIONS, 0))

    def _simple(self, data: bytes, doing: str) -> None:
        self._request(data)
        frame = self._answer()
        if frame.type != FrameType.OK:
            _raise_for(frame, doing)

    def set_time(self, ns: int | None = None) -> None:
        """Set the guest's clock (CLOCK_REALTIME) to `ns` since the epoch (default: the host's now)."""
        self._simple(p.set_time_request(time.time_ns() if ns is None else ns), "set the clock")

    def reseed(self, nbytes: int = 64) -> None:
        """Add `nbytes` of the host's randomness to the guest's RNG, credited as entropy."""
        self._simple(p.reseed_request(os.urandom(nbytes)), "reseed its RNG")

    def put_file(self, path: str, data: bytes | BinaryIO, mode: int = 0o644, mkdirs: bool = True) -> None:
        """Write `data` (bytes or a binary file read in chunks) to `path` in the guest,
        atomically (a temporary file renamed), with exactly `mode`."""
        self._request(p.put_file_request(path, mode, mkdirs))
        deadline = _deadline(self.timeout)
        for chunk in _chunks(data):
            if self._chan.frames:          # an early ERROR: the agent discards the rest
                break
            self._chan.queue(p.encode_frame(FrameType.DATA, chunk))
            if self._chan.pending_out() >= SEND_QUEUE_LIMIT:
                self._chan.flush(deadline)
                deadline = _deadline(self.timeout)
        self._chan.queue(p.encode_frame(FrameType.DATA_END))
        self._chan.flush(_deadline(self.timeout))
        frame = self._answer()
        if frame.type != FrameType.OK:
            _raise_for(frame, f"write {path}")

    def get_file(self, path: str, out: BinaryIO | None = None) -> bytes | int:
        """Read `path` from the guest: its bytes, or with `out` the number of bytes written there."""
        self._request(p.get_file_request(path))
        parts: list[bytes] = []
        total = 0
        while True:
            frame = self._answer()
            if frame.type == FrameType.DATA_END:
                return b"".join(parts) if out is None else total
            if frame.type != FrameType.DATA:
                _raise_for(frame, f"read {path}")
            total += len(frame.payload)
            if out is None:
                parts.append(frame.payload)
            else:
                out.write(frame.payload)

    def start(self, argv: Sequence[str] | str, env: dict[str, str] | None = None, cwd: str | None = None,
              stdin: bool = False, pty: bool = False, timeout: float | None = None,
              rows: int = 24, cols: int = 80) -> "Process":
        """Start a command; a Process to stream it.  A str argv runs through /bin/sh -c.
        `env` is added to the agent's clean PATH/HOME environment; `timeout` (seconds)
        kills the command's whole process group."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        timeout_ms = None if timeout is None else max(1, int(timeout * 1000))
        self._request(p.exec_request(list(argv), env, cwd, stdin, pty, timeout_ms, rows, cols))
        self._running = Process(self, self._chan, stdin, timeout)
        return self._running

    def exec(self, argv: Sequence[str] | str, env: dict[str, str] | None = None, cwd: str | None = None,
             stdin: bytes | BinaryIO | None = None, pty: bool = False, timeout: float | None = None,
             max_output: int | None = None) -> ExecResult:
        """Run a command to its end: its output, exit code or signal.  `stdin` (bytes or a
        binary file) is streamed in and closed.  Output beyond `max_output` bytes kills the
        command (the connection is closed) and raises AgentError."""
        proc = self.start(argv, env, cwd, stdin is not None, pty, timeout)
        if stdin is not None:
            proc._feed_from(_chunks(stdin))
        return proc.wait(max_output=max_output)


def _chunks(data: bytes | BinaryIO) -> Iterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for start in range(0, len(view), p.DATA_CHUNK):
            yield bytes(view[start:start + p.DATA_CHUNK])
        return
    while chunk := data.read(p.DATA_CHUNK):
        yield chunk


class Process:
    """A command running in the guest (AgentClient.start): iterate for its events."""

    def __init__(self, client: AgentClient, chan: _Channel, stdin: bool, timeout: float | None) -> None:
        self._client = client
        self._chan = chan
        self._stdin_open = stdin
        self._feed: Iterator[bytes] | None = None
        # the agent kills the command at `timeout`; allow it the client's timeout to say so
        self._deadline = None if timeout is None else time.monotonic() + timeout + client.timeout
        self.status: ExitStatus | None = None
        # Agent.start() opens a connection for this one command: it ends with it.
        self._close_at_exit = False

    def _feed_from(self, chunks: Iterator[bytes]) -> None:
        self._feed = chunks

    def feed_stdin(self, chunks: Iterator[bytes]) -> None:
        """Stream stdin from an iterator of chunks, pulled (in the thread that reads the
        events) as the connection takes them, then closed.  The Process is not
        thread-safe: this, not write_stdin() from another thread, is how stdin goes in
        while the output is read."""
        self._feed_from(chunks)

    def _send(self, data: bytes) -> None:
        if self.status is not None:
            return  # the command ended: stdin and signals have nobody to go to
        self._chan.queue(data)
        self._chan.flush(_deadline(self._client.timeout))

    def write_stdin(self, data: bytes) -> None:
        if not self._stdin_open:
            raise AgentError("the command's stdin is not open (start it with stdin=True)")
        for frame in p.data_frames(FrameType.STDIN, data):
            self._send(frame)

    def close_stdin(self) -> None:
        if self._stdin_open:
            self._stdin_open = False
            self._send(p.encode_frame(FrameType.STDIN_CLOSE))

    def signal(self, signum: int) -> None:
        """Send signal `signum` to the command's whole process group."""
        self._send(p.signal_request(int(signum)))

    def kill(self) -> None:
        """Give up on the command: closing the connection makes the agent SIGKILL its group."""
        self._client.close()

    def _top_up_stdin(self) -> None:
        while self._feed is not None and self._chan.pending_out() < SEND_QUEUE_LIMIT:
            chunk = next(self._feed, None)
            if chunk is None:
                self._feed = None
                self._stdin_open = False
                self._chan.queue(p.encode_frame(FrameType.STDIN_CLOSE))
            elif chunk:
                self._chan.queue(p.encode_frame(FrameType.STDIN, chunk))

    def _next_frame(self, deadline: float | None) -> Frame:
        while not self._chan.frames:
            self._top_up_stdin()
            if self._chan.eof:
                raise AgentError("the agent closed the connection before the command's end")
            self._chan.pump(deadline)
        return self._chan.frames.popleft()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """("stdout", bytes), ("stderr", bytes), ... then ("exit", ExitStatus).
        `timeout` bounds the wait for each event (AgentError when it passes)."""
        return self._events(None, timeout)

    __iter__ = events

    def _events(self, until: float | None, per_event: float | None) -> Iterator[Event]:
        while self.status is None:
            candidates = [d for d in (self._deadline, until, _deadline(per_event)) if d is not None]
            frame = self._next_frame(min(candidates) if candidates else None)
            if frame.type == FrameType.STDOUT:
                yield "stdout", frame.payload
            elif frame.type == FrameType.STDERR:
                yield "stderr", frame.payload
            elif frame.type == FrameType.EXIT:
                f = frame.fields()
                self.status = ExitStatus(f.int(Tag.EXIT_CODE), f.int(Tag.TERM_SIGNAL),
                                         bool(f.int(Tag.TIMED_OUT, 0)))
                self._feed = None
                if self._close_at_exit:
                    self._client.close()
                yield "exit", self.status
            else:
                _raise_for(frame, "run the command")

    def wait(self, timeout: float | None = None, max_output: int | None = None) -> ExecResult:
        """The command's end, with the output not yet taken through events().  `timeout`
        bounds the whole wait (AgentError when it passes; the command keeps running)."""
        out: list[bytes] = []
        err: list[bytes] = []
        size = 0
        for kind, data in self._events(_deadline(timeout), None):
            if kind == "exit":
                break
            assert isinstance(data, bytes)
            (out if kind == "stdout" else err).append(data)
            size += len(data)
            if max_output is not None and size > max_output:
                self.kill()
                raise AgentError(f"the command wrote more than {max_output} bytes of output; "
                                 f"it was killed")
        status = self.status
        assert status is not None
        return ExecResult(b"".join(out), b"".join(err), status.exit_code, status.signal,
                          status.timed_out)

    @property
    def returncode(self) -> int | None:
        return None if self.status is None else self.status.returncode


# -- an agent to share between threads -------------------------------------------------------------

DEFAULT_MAX_OUTPUT = 256 << 20    # bytes of output Agent.exec() keeps before it kills the command


class Agent:
    """Where an agent is: every operation opens a connection of its own (and closes it), so
    that threads can share one Agent and run commands at once, as many as they like.

        agent = Agent.over_vsock("/tmp/v.sock")          # Firecracker's vsock host side
        print(agent.exec("uname -r").stdout)
    """

    def __init__(self, connector: Connector, timeout: float = DEFAULT_TIMEOUT,
                 max_output: int | None = DEFAULT_MAX_OUTPUT) -> None:
        self.connector = connector
        self.timeout = timeout
        self.max_output = max_output

    @classmethod
    def over_vsock(cls, uds_path: str, port: int = DEFAULT_PORT,
                   connect_timeout: float = DEFAULT_TIMEOUT,
                   alive: Callable[[], bool] | None = None, **options: object) -> "Agent":
        """The agent behind a VMM's vsock socket, once it answers a HELLO: waits up to
        connect_timeout seconds for it (a booting guest), or until alive() says the VM has
        gone.  AgentError if none answers."""
        agent = cls(lambda: connect_vsock_uds(uds_path, port, agent.timeout), **options)  # type: ignore[arg-type]
        deadline = time.monotonic() + connect_timeout
        while True:
            step = min(2.0, max(0.05, deadline - time.monotonic()))
            try:
                with AgentClient.connect(lambda: connect_vsock_uds(uds_path, port, step),
                                         agent.timeout) as client:
                    client.health()
                return agent
            except AgentError as exc:
                if time.monotonic() >= deadline:
                    raise AgentError(f"no agent answered on vsock port {port} through "
                                     f"{uds_path} within {connect_timeout:g} s: is the guest "
                                     "booted with the agent?") from exc
                if alive is not None and not alive():
                    raise AgentError(f"the VM ended before its agent answered on vsock port "
                                     f"{port}") from exc

    def client(self) -> AgentClient:
        """A connection of its own, greeted: close it (or use `with`) when done.

        A connection the guest drops before its HELLO is tried again (HELLO changes
        nothing): right after a snapshot restore, the guest handles the transport reset
        event, which drops every connection it has, possibly just after accepting ours."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return AgentClient.connect(self.connector, self.timeout)
            except AgentError as exc:
                if "closed the connection" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(CONNECT_RETRY_INTERVAL)

    def exec(self, argv: Sequence[str] | str, **options: object) -> ExecResult:
        """AgentClient.exec on a connection of its own (max_output defaults to the Agent's)."""
        options.setdefault("max_output", self.max_output)
        with self.client() as client:
            return client.exec(argv, **options)  # type: ignore[arg-type]

    def start(self, argv: Sequence[str] | str, **options: object) -> Process:
        """AgentClient.start on a connection of its own, closed when the command ends
        (or by Process.kill())."""
        client = self.client()
        try:
            process = client.start(argv, **options)  # type: ignore[arg-type]
        except BaseException:
            client.close()
            raise
        process._close_at_exit = True
        return process

    def put_file(self, path: str, data: bytes | BinaryIO, mode: int = 0o644,
                 mkdirs: bool = True) -> None:
        with self.client() as client:
            client.put_file(path, data, mode, mkdirs)

    def get_file(self, path: str, out: BinaryIO | None = None) -> bytes | int:
        with self.client() as client:
            return client.get_file(path, out)

    def health(self) -> Health:
        with self.client() as client:
            return client.health()

    def set_time(self, ns: int | None = None) -> None:
        with self.client() as client:
            client.set_time(ns)

    def reseed(self, nbytes: int = 64) -> None:
        with self.client() as client:
            client.reseed(nbytes)

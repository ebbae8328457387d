"""The host side of the guest's serial console (the UART itself is pyvmm.devices.uart).

- ConsoleCapture: everything the guest wrote, buffered once with one size
  limit; the CLI's terminal, MicroVM.serial, the boot timer and the panic
  check all read this one object.
- ConsoleSink: where the output also goes as it is written (stdout, a file,
  nowhere).
- SerialConsole: the Python face of it (MicroVM.serial): read(), write(),
  expect() a regex.
- StdinReader: the terminal's keys to the guest.  Ctrl-A x quits and
  Ctrl-A Ctrl-A sends a literal Ctrl-A, as in QEMU.  The terminal's settings
  are restored however the VMM ends.
"""
from __future__ import annotations

import atexit
import os
import re
import select
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

from pyvmm import seccomp
from pyvmm.errors import PyvmmError

if TYPE_CHECKING:
    from pyvmm.devices.rate_limiter import TokenBucket

ESCAPE = 0x01                   # Ctrl-A
QUIT_KEY = ord("x")
CAPTURE_LIMIT = 4 << 20         # console bytes kept for expect(), read() and the panic check
DEFAULT_FILE_LIMIT = 64 << 20   # a console file's size cap (pyvmm.config.SerialConfig)
PENDING_LIMIT = 1 << 20         # output waiting for the writer thread before the guest waits
LINGER_BELOW = 4096             # with less than this pending, the writer waits a moment...
LINGER_SECONDS = 0.001          # ...this long, for more to write in the same system call


class ConsoleError(PyvmmError):
    """A bad --console value, an output file that cannot be opened, or an
    expected output that did not come."""


class ConsoleSink:
    """Where guest output goes besides the capture: `stdio`, `file:PATH` or `none`.

    The UART hands over one byte per exit; a writer thread writes what has
    accumulated in chunks, so a chatty guest costs a few system calls, not one
    per byte.  When PENDING_LIMIT bytes wait (a slow reader on stdout), the
    guest waits too: console output to a terminal or pipe is never lost.  A
    file stops growing at `limit` bytes: the rest is dropped and counted, so a
    guest cannot fill the host's disk through its console.
    """

    def __init__(self, spec: str = "none", limit: int = DEFAULT_FILE_LIMIT,
                 rate_limiter: "TokenBucket | None" = None) -> None:
        """rate_limiter: a serial rate limiter's bucket (bytes): output beyond it is
        dropped and counted in rate_limited, as Firecracker's SerialOut drops it."""
        self.spec = spec
        self.limit = limit
        self.rate_limiter = rate_limiter
        self.rate_limited = 0             # bytes dropped by the rate limiter
        if rate_limiter is not None:
            from pyvmm.devices.rate_limiter import Reduction
            self._taken = Reduction.SUCCESS
        self.written = 0                  # bytes that reached the file, pipe or terminal
        self.dropped = 0                  # bytes over the file's limit, or lost to an error
        self.system_calls = 0             # write(2)s: a chatty guest costs few of them
        self._fd: int | None = None           # None once the output has failed
        self._owned: int | None = None        # a file we opened and must close
        self._pending = bytearray()
        self._accepted = 0                    # bytes ever queued: the file cap counts these
        self._changed = threading.Condition()
        self._closing = False
        self._writer: threading.Thread | None = None
        self.seccomp: seccomp.Policy | None = None     # the writer's "console" filter
        if spec == "stdio":
            self._fd = sys.stdout.fileno()
        elif spec.startswith("file:") and len(spec) > 5:
            from pyvmm.host_files import HostFileError, open_output
            try:
                self._fd = self._owned = open_output(spec[5:], "console file")
            except HostFileError as exc:
                raise ConsoleError(str(exc)) from None
        elif spec != "none":
            raise ConsoleError(f"bad --console {spec!r}: use stdio, file:PATH or none")

    def write(self, data: bytes) -> None:
        """Queue data for the writer thread (a vCPU thread, holding the UART's lock)."""
        if self._fd is None:
            return
        with self._changed:
            if self.rate_limiter is not None and \
                    self.rate_limiter.reduce(len(data))[0] is not self._taken:
                self.rate_limited += len(data)
                return
            if self._owned is not None:
                room = max(0, self.limit - self._accepted)
                if len(data) > room:
                    self.dropped += len(data) - room
                    data = data[:room]
            while len(self._pending) >= PENDING_LIMIT and not self._closing:
                self._changed.wait()
            if self._closing or not data:
                return
            self._pending += data
            self._accepted += len(data)
            self._changed.notify_all()
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="console-out",
                                                daemon=True)
                self._writer.start()

    def _write_loop(self) -> None:
        seccomp.enter_thread("console", self.seccomp, "console-out")
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closing)
                short = len(self._pending) < LINGER_BELOW and not self._closing
            if short:
                # A guest writes a byte per exit: let a millisecond's worth gather
                # (unnoticeable on a terminal) rather than wake per byte.
                time.sleep(LINGER_SECONDS)
            with self._changed:
                chunk = bytes(self._pending)
                self._pending.clear()
                self._changed.notify_all()
                if not chunk:
                    return                            # closing, and nothing left
            self._write_all(chunk)

    def _write_all(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view and self._fd is not None:
            try:
                done = os.write(self._fd, view)
            except BlockingIOError:                   # a FIFO nobody reads: drop, never block
                break
            except OSError:
                # The reader went away (a closed pipe, a full disk): the guest must
                # not die of it.  The capture still keeps the output.
                self._fd = None
                break
            view = view[done:]
            with self._changed:
                self.written += done
                self.system_calls += 1
        if view:
            with self._changed:
                self.dropped += len(view)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (up to timeout) until what was written so far has left."""
        with self._changed:
            self._changed.wait_for(lambda: not self._pending, timeout)

    def close(self) -> None:
        """Write out what is pending (a few seconds at most), then release the file."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._writer is not None:
            self._writer.join(5)
        if self._owned is not None:
            os.close(self._owned)
            self._owned = None
        self._fd = None


class ConsoleCapture:
    """The guest's console output, with absolute positions (bytes ever written);
    the oldest bytes are dropped past `limit`."""

    def __init__(self, limit: int = CAPTURE_LIMIT) -> None:
        self.limit = limit
        self.sink = ConsoleSink()
        self._data = bytearray()
        self._base = 0                         # absolute position of _data[0]
        # Boot timer: the first time each watched marker is written, time.monotonic().
        self._markers: dict[bytes, float | None] = {}
        self._changed = threading.Condition()

    def write(self, data: bytes) -> None:
        """The UART transmitted data (a vCPU thread)."""
        self.sink.write(data)
        with self._changed:
            self._data += data
            for marker, seen in self._markers.items():
                if seen is None and marker in self._data[-(len(marker) + len(data)):]:
                    self._markers[marker] = time.monotonic()
            excess = len(self._data) - self.limit
            if excess > 0:
                del self._data[:excess]
                self._base += excess
            self._changed.notify_all()

    def watch(self, marker: bytes) -> None:
        """Time-stamp the first appearance of marker from now on."""
        with self._changed:
            self._markers.setdefault(marker, None)

    def marker_time(self, marker: bytes) -> float | None:
        with self._changed:
            return self._markers.get(marker)

    @property
    def end(self) -> int:
        with self._changed:
            return self._base + len(self._data)

    def since(self, position: int) -> tuple[int, bytes]:
        """(the position actually read from, the bytes from there to the end)."""
        with self._changed:
            start = max(position, self._base)
            return start, bytes(self._data[start - self._base:])

    def tail(self) -> bytes:
        """Everything still kept."""
        return self.since(0)[1]

    def wait_for_more(self, position: int, timeout: float) -> None:
        """Return once there is output past position, or after timeout seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self._base + len(self._data) > position, timeout)

    def close(self) -> None:
        self.sink.close()


class SerialConsole:
    """The guest's COM1 from Python: read() what it wrote, write() what it reads,
    expect() a regex.  `send` delivers typed bytes; `ended()` says the VM is gone."""

    def __init__(self, capture: ConsoleCapture, send: Callable[[bytes], None],
                 ended: Callable[[], bool], error: type[Exception] = ConsoleError) -> None:
        self.capture = capture
        self._error = error
        self._send = send
        self._ended = ended
        self.position = 0                   # where read() and expect() start by default

    def read(self) -> bytes:
        """The output since the last read() or expect(); moves past it."""
        start, data = self.capture.since(self.position)
        self.position = start + len(data)
        return data

    def write(self, data: bytes | str) -> None:
        """Bytes for the guest to read (what a user would type)."""
        self._send(data.encode() if isinstance(data, str) else data)

    def expect(self, pattern: bytes | str | re.Pattern, timeout: float = 30.0,
               since: int | None = None) -> re.Match:
        """Wait for a regex over the output since `since` (default: the end of the last
        read() or expect()); returns the match (bytes) and moves past it.  Raises
        `error` (ConsoleError by default) at timeout or when the VM ends without a
        match."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        regex = re.compile(pattern) if not isinstance(pattern, re.Pattern) else pattern
        start = self.position if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            ended = self._ended()
            first, data = self.capture.since(start)
            match = regex.search(data)
            if match:
                self.position = first + match.end()
                return match
            now = time.monotonic()
            if ended or now >= deadline:
                tail = data[-2000:].decode(errors="replace")
                why = "the VM ended" if ended else f"{timeout:g} s passed"
                raise self._error(f"{regex.pattern!r} did not appear on the serial "
                                         f"console before {why}; its last output:\n{tail}")
            self.capture.wait_for_more(first + len(data), min(0.5, deadline - now))


class StdinReader:
    """Feeds host stdin to the guest; raw mode when stdin is a terminal."""

    def __init__(self, feed: Callable[[bytes], None], quit: Callable[[], None]) -> None:
        self.feed = feed
        self.quit = quit
        self.fd = sys.stdin.fileno()
        self._saved: list | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stdin", daemon=True)
        self._escape = False
        self.seccomp: seccomp.Policy | None = None     # its "console" filter

    def start(self) -> None:
        if os.isatty(self.fd):            # termios only for a terminal: a pipe needs none
            import termios
            import tty
            self._saved = termios.tcgetattr(self.fd)
            atexit.register(self.restore)
            tty.setraw(self.fd)
        self._thread.start()

    def restore(self) -> None:
        if self._saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def stop(self) -> None:
        self._stop.set()
        self.restore()

    def _loop(self) -> None:
        seccomp.enter_thread("console", self.seccomp, "stdin")
        while not self._stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:
                return                       # EOF: the guest keeps running
            self.feed(self._filter(data))

    def _filter(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self._escape:
                self._escape = False
                if byte == QUIT_KEY:
                    self.quit()
                    continue
                if byte != ESCAPE:
                    continue
            elif byte == ESCAPE:
                self._escape = True
                continue
            out.append(byte)
        return bytes(out)

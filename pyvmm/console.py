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
from typing import Callable

from pyvmm.errors import PyvmmError

ESCAPE = 0x01                   # Ctrl-A
QUIT_KEY = ord("x")
CAPTURE_LIMIT = 4 << 20         # console bytes kept for expect(), read() and the panic check


class ConsoleError(PyvmmError):
    """A bad --console value, an output file that cannot be opened, or an
    expected output that did not come."""


class ConsoleSink:
    """Where guest output goes besides the capture: `stdio`, `file:PATH` or `none`."""

    def __init__(self, spec: str = "none") -> None:
        self.spec = spec
        self._fd: int | None = None
        self._owned = False
        if spec == "stdio":
            self._fd = sys.stdout.fileno()
        elif spec.startswith("file:") and len(spec) > 5:
            try:
                self._fd = os.open(spec[5:], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                   0o644)
            except OSError as exc:
                raise ConsoleError(f"cannot open console file {spec[5:]}: {exc.strerror}") \
                    from None
            self._owned = True
        elif spec != "none":
            raise ConsoleError(f"bad --console {spec!r}: use stdio, file:PATH or none")

    def write(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
        except OSError:
            # The reader went away (a closed pipe, a full disk): the guest must
            # not die of it.  The capture still keeps the output.
            self.close()

    def close(self) -> None:
        if self._owned and self._fd is not None:
            os.close(self._fd)
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

"""The serial console on the host side: output sinks, and stdin in raw mode.

Ctrl-A x quits and Ctrl-A Ctrl-A sends a literal Ctrl-A, as in QEMU.  The
terminal's settings are restored however the VMM ends.
"""
from __future__ import annotations

import atexit
import os
import select
import sys
import termios
import threading
import time
import tty
from typing import Callable, BinaryIO

from pyvmm.errors import PyvmmError

ESCAPE = 0x01                   # Ctrl-A
QUIT_KEY = ord("x")
OUTPUT_HISTORY = 1 << 20        # bytes kept for expect() and for panic detection


class ConsoleError(PyvmmError):
    """A bad --console value, or an output file that cannot be opened."""


class ConsoleOutput:
    """Where guest serial output goes: stdout, a file or nowhere; a tail is kept."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._file: BinaryIO | None = None
        self._fd: int | None = None
        if spec == "stdio":
            self._fd = sys.stdout.fileno()
        elif spec.startswith("file:") and len(spec) > 5:
            try:
                self._file = open(spec[5:], "ab", buffering=0)
            except OSError as exc:
                raise ConsoleError(f"cannot open console file {spec[5:]}: {exc.strerror}") from None
        elif spec != "none":
            raise ConsoleError(f"bad --console {spec!r}: use stdio, file:PATH or none")
        self.history = bytearray()
        self.total = 0                  # bytes ever written: positions for since()
        # Boot timer: the first time each marker is written, time.monotonic().
        self.markers: dict[bytes, float | None] = {}
        self._changed = threading.Condition()

    def __call__(self, data: bytes) -> None:
        try:
            if self._fd is not None:
                os.write(self._fd, data)
            elif self._file is not None:
                self._file.write(data)
        except OSError:
            # The reader went away (a closed pipe, a full disk): the guest must
            # not die of it.  Output is still kept in history.
            self._fd = None
            self._file = None
        with self._changed:
            self.history += data
            self.total += len(data)
            for marker, seen in self.markers.items():
                if seen is None and marker in self.history[-(len(marker) + len(data)):]:
                    self.markers[marker] = time.monotonic()
            if len(self.history) > OUTPUT_HISTORY:
                del self.history[:len(self.history) - OUTPUT_HISTORY]
            self._changed.notify_all()

    def since(self, position: int) -> bytes:
        """Output from absolute position `position` (a past value of .total) on."""
        with self._changed:
            kept_from = self.total - len(self.history)
            return bytes(self.history[max(0, position - kept_from):])

    def wait_for(self, predicate: Callable[[bytes], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(bytes(self.history)), timeout)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            atexit.register(self.restore)
            tty.setraw(self.fd)
        self._thread.start()

    def restore(self) -> None:
        if self._saved is not None:
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

"""The I/O thread: an epoll loop that serves virtqueue kicks (ioeventfds) and
backend fds (TAP) off the vCPU threads, like Firecracker's event manager."""
from __future__ import annotations

import collections
import os
import selectors
import threading
from typing import Callable

Handler = Callable[[], None]


class IoThread:
    def __init__(self, name: str = "io") -> None:
        self._selector = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wake, selectors.EVENT_READ, None)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self.errors: list[BaseException] = []

    def add_eventfd(self, fd: int, handler: Handler) -> None:
        """Call handler (on the I/O thread) each time eventfd fd is signalled."""
        def drain_then_handle() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            handler()
        self._selector.register(fd, selectors.EVENT_READ, drain_then_handle)

    def watch(self, fd: int, handler: Handler, on: bool) -> None:
        """Start or stop calling handler when fd is readable.  Safe from any
        thread: the selector itself is only ever changed on the I/O thread."""
        def change() -> None:
            registered = fd in self._selector.get_map()
            if on and not registered:
                self._selector.register(fd, selectors.EVENT_READ, handler)
            elif not on and registered:
                self._selector.unregister(fd)
        if threading.current_thread() is self._thread:
            change()
        else:
            self._calls.append(change)
            os.eventfd_write(self._wake, 1)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join(5)
        self._selector.close()
        os.close(self._wake)

    def _loop(self) -> None:
        while not self._stop:
            for key, _ in self._selector.select():
                if key.data is None:
                    self._run_calls()
                    continue
                try:
                    key.data()
                except Exception as exc:  # noqa: BLE001 - a device bug must not kill the loop
                    self.errors.append(exc)

    def _run_calls(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        while self._calls:
            self._calls.popleft()()

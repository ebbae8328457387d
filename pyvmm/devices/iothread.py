"""The I/O thread: an epoll loop that serves virtqueue kicks (ioeventfds) and
backend fds (TAP) off the vCPU threads, like Firecracker's event manager.

A handler that raises is a device bug or a hostile guest's doing: the loop
counts it, keeps the last few messages and carries on.  Nothing it keeps
grows with the number of errors."""
from __future__ import annotations

import collections
import os
import selectors
import threading
from typing import Callable

from pyvmm import seccomp

Handler = Callable[[], None]

RECENT_ERRORS = 8                      # messages kept of the errors handlers raised
ERROR_TEXT_LIMIT = 200                 # characters kept of each


def describe_error(exc: BaseException) -> str:
    """One bounded line for an exception: its type and the start of its message."""
    return f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_LIMIT]


class IoThread:
    """Pausable: while the VM is paused the loop serves nothing, so no device writes
    guest memory (a frame arriving on the TAP waits in the TAP's queue, as it does
    for QEMU's stopped VM) and a snapshot sees memory that does not change."""

    def __init__(self, name: str = "io") -> None:
        self._selector = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wake, selectors.EVENT_READ, None)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self.error_count = 0
        self.recent_errors: collections.deque[str] = collections.deque(maxlen=RECENT_ERRORS)
        self.seccomp: seccomp.Policy | None = None     # its "io" filter, set before start()
        self._pause = threading.Condition()
        self._pausing = False       # asked to serve nothing until resume()
        self._parked = False        # the loop is waiting in _park()
        self._pause_hooks: list[Handler] = []

    def add_eventfd(self, fd: int, handler: Handler) -> None:
        """Call handler (on the I/O thread) each time eventfd fd is signalled."""
        def drain_then_handle() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            handler()
        self._selector.register(fd, selectors.EVENT_READ, drain_then_handle)

    def add_pause_hook(self, hook: Handler) -> None:
        """Call hook (on the I/O thread) each time the loop is about to park for
        pause(): a disk engine completes its requests in flight there, so a paused
        VM has none (Firecracker drains its io_uring too).  Add before start()."""
        self._pause_hooks.append(hook)

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
            self.call_soon(change)

    def call_soon(self, call: Handler) -> None:
        """Run call on the I/O thread after the fds that are ready now have been
        served: a device that used up its budget continues here, behind the others."""
        self._calls.append(call)
        os.eventfd_write(self._wake, 1)

    def start(self) -> None:
        self._thread.start()

    def pause(self, timeout: float = 5.0) -> bool:
        """Serve nothing until resume(); True once the loop is parked between handlers
        (or was never started: it then starts parked).  False if a handler did not
        return within timeout (a backend blocked in the host kernel)."""
        with self._pause:
            self._pausing = True
        if not self._thread.is_alive() or threading.current_thread() is self._thread:
            return True
        os.eventfd_write(self._wake, 1)
        with self._pause:
            return self._pause.wait_for(lambda: self._parked or self._stop, timeout)

    def resume(self) -> None:
        """From any thread; a no-op unless paused."""
        with self._pause:
            self._pausing = False
            self._pause.notify_all()

    def _park(self) -> None:
        with self._pause:
            self._parked = True
            self._pause.notify_all()
            self._pause.wait_for(lambda: not self._pausing or self._stop)
            self._parked = False

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the loop; True if the thread ended within timeout.  A thread still in a
        handler (a backend blocked in the host kernel) is left to finish it: guest RAM
        it reaches through memoryviews stays mapped while they live."""
        if self._wake < 0:
            return True
        with self._pause:
            self._stop = True
            self._pause.notify_all()
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join(timeout)
        ended = not self._thread.is_alive()
        if ended:
            self._selector.close()
            os.close(self._wake)
            self._wake = -1
        return ended

    def _loop(self) -> None:
        seccomp.enter_thread("io", self.seccomp, self._thread.name)
        while not self._stop:
            if self._pausing:
                for hook in self._pause_hooks:
                    self._run(hook)
                self._park()
                continue
            for key, _ in self._selector.select():
                if self._pausing:
                    break       # what is left stays ready (level-triggered) for resume()
                if key.data is None:
                    self._run_calls()
                else:
                    self._run(key.data)

    def _run(self, handler: Handler) -> None:
        try:
            handler()
        except Exception as exc:  # noqa: BLE001 - a device bug must not kill the loop
            self.error_count += 1
            self.recent_errors.append(describe_error(exc))

    def _run_calls(self) -> None:
        """The calls queued before this round: one queued while they run (a device
        continuing again) waits for the next round, so it cannot starve the fds."""
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        for _ in range(len(self._calls)):
            self._run(self._calls.popleft())

"""The I/O thread: served fds, and pausing it with the VM (a paused VM's devices leave
guest memory alone, so two snapshots in a row hold the same bytes)."""
from __future__ import annotations

import os
import threading
import time

import pytest

from pyvmm.devices.iothread import IoThread


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    os.close(r)
    os.close(w)


def reader(fd: int, got: list[bytes], event: threading.Event):
    def handle() -> None:
        got.append(os.read(fd, 4096))
        event.set()
    return handle


def test_a_watched_fd_is_served(pipe):
    r, w = pipe
    got: list[bytes] = []
    seen = threading.Event()
    io = IoThread()
    io.watch(r, reader(r, got, seen), on=True)
    io.start()
    try:
        os.write(w, b"x")
        assert seen.wait(5) and got == [b"x"]
    finally:
        assert io.stop()


def test_paused_it_serves_nothing_and_resumed_it_serves_what_waited(pipe):
    r, w = pipe
    got: list[bytes] = []
    seen = threading.Event()
    io = IoThread()
    io.watch(r, reader(r, got, seen), on=True)
    io.start()
    try:
        assert io.pause()
        os.write(w, b"while paused")
        io.call_soon(lambda: got.append(b"a queued call"))
        assert not seen.wait(0.3) and got == []
        io.resume()
        assert seen.wait(5)
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(got) == [b"a queued call", b"while paused"]
    finally:
        assert io.stop()


def test_paused_before_start_it_starts_parked(pipe):
    r, w = pipe
    got: list[bytes] = []
    seen = threading.Event()
    io = IoThread()
    io.watch(r, reader(r, got, seen), on=True)
    assert io.pause()
    io.start()
    try:
        os.write(w, b"early")
        assert not seen.wait(0.3)
        io.resume()
        assert seen.wait(5) and got == [b"early"]
    finally:
        assert io.stop()


def test_stop_ends_a_paused_loop(pipe):
    io = IoThread()
    io.start()
    assert io.pause()
    assert io.stop(timeout=5)


def test_pause_waits_for_a_handler_to_return_and_says_when_it_does_not(pipe):
    r, w = pipe
    release = threading.Event()
    entered = threading.Event()

    def slow() -> None:
        os.read(r, 4096)
        entered.set()
        release.wait(10)
    io = IoThread()
    io.watch(r, slow, on=True)
    io.start()
    try:
        os.write(w, b"x")
        assert entered.wait(5)
        assert not io.pause(timeout=0.2)        # still in the handler
        release.set()
        assert io.pause(timeout=5)
        io.resume()
    finally:
        release.set()
        assert io.stop()

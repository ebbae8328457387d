"""The io_uring engine (pyvmm.devices.uring, csrc/uring.c) on its own: round trips on
a temporary file, completions out of order, short reads, the in-flight budget, the
iovec array's reuse, and no fd left behind."""
from __future__ import annotations

import os
import select
import threading

import pytest

from pyvmm.devices.iothread import IoThread
from pyvmm.devices.uring import IOV_POOL, Uring, UringUnavailable


def _engine(entries: int = 8) -> Uring:
    try:
        return Uring(entries)
    except UringUnavailable as exc:
        pytest.skip(f"no io_uring here: {exc}")


@pytest.fixture()
def ring():
    engine = _engine()
    yield engine
    engine.drain(5.0)
    assert engine.close()


def settle(engine: Uring, count: int, timeout: float = 5.0) -> list:
    """Wait on the eventfd as the I/O thread would, until `count` completions."""
    done: list = []
    while len(done) < count:
        assert select.select([engine.eventfd], [], [], timeout)[0], "no completion"
        engine.clear_eventfd()
        done += engine.reap()
    return done


def test_write_fsync_read_round_trip(ring, tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(8192))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        payload = os.urandom(4096)
        ring.writev(fd, [memoryview(payload)[:1000], memoryview(payload)[1000:]], 512, "w")
        ring.submit()
        assert settle(ring, 1) == [("w", 4096)]
        ring.fdatasync(fd, "f")
        ring.submit()
        assert settle(ring, 1) == [("f", 0)]
        back = bytearray(4096)
        view = memoryview(back)
        ring.readv(fd, [view[:512], view[512:]], 512, "r")
        ring.submit()
        assert settle(ring, 1) == [("r", 4096)] and bytes(back) == payload
        assert path.read_bytes()[512:4608] == payload and ring.in_flight == 0
    finally:
        os.close(fd)


def test_completions_come_back_out_of_order_with_their_own_request(ring, tmp_path):
    # A read on an empty pipe waits for data; a file read behind it completes first.
    path = tmp_path / "img"
    path.write_bytes(b"f" * 512)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    rd, wr = os.pipe2(os.O_CLOEXEC)
    try:
        slow, fast = bytearray(3), bytearray(512)
        ring.readv(rd, [memoryview(slow)], 0, "slow")
        ring.readv(fd, [memoryview(fast)], 0, "fast")
        ring.submit()
        assert settle(ring, 1) == [("fast", 512)] and ring.in_flight == 1
        os.write(wr, b"abc")
        assert settle(ring, 1) == [("slow", 3)] and slow == b"abc"
    finally:
        for each in (fd, rd, wr):
            os.close(each)


def test_a_short_read_and_a_bad_fd_are_reported_not_raised(ring, tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(1024))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(4096)
        ring.readv(fd, [memoryview(buf)], 0, "short")
        ring.readv(fd, [memoryview(buf)], 1 << 40, "past-end")
        ring.readv(1 << 20, [memoryview(buf)], 0, "bad-fd")   # an fd number never open
        ring.submit()
        results = dict(settle(ring, 3))
        assert results == {"short": 1024, "past-end": 0, "bad-fd": -9}   # -EBADF
    finally:
        os.close(fd)


def test_no_more_requests_than_entries_and_the_iovec_array_is_reused(tmp_path):
    engine = _engine(entries=4)
    path = tmp_path / "img"
    path.write_bytes(bytes(IOV_POOL * 512))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = memoryview(bytearray(IOV_POOL * 512))
        views = [buf[i * 512:(i + 1) * 512] for i in range(IOV_POOL // 2 + 1)]
        engine.readv(fd, views, 0, 1)
        engine.readv(fd, views, 0, 2)       # no room left in the array: submits the first
        engine.readv(fd, views[:1], 0, 3)
        engine.readv(fd, views[:1], 0, 4)
        assert engine.free == 0
        with pytest.raises(RuntimeError, match="more requests than the ring has entries"):
            engine.readv(fd, views[:1], 0, 5)
        with pytest.raises(ValueError):
            engine.readv(fd, [], 0, 6)
        engine.submit()
        done = settle(engine, 4)
        assert sorted(done) == [(1, len(views) * 512), (2, len(views) * 512), (3, 512),
                                (4, 512)]
        assert engine.free == 4
    finally:
        engine.drain(5.0)
        assert engine.close()
        os.close(fd)


def test_close_releases_every_fd(tmp_path):
    def open_fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))
    _engine().close()                       # the first ring loads what stays loaded
    before = open_fds()
    path = tmp_path / "img"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    for _ in range(20):
        engine = Uring(256)
        engine.readv(fd, [memoryview(bytearray(4096))], 0, "r")
        engine.submit()
        assert not engine.close() or engine.in_flight == 0   # refused while in flight
        engine.drain(5.0)
        assert engine.close() and engine.close()             # twice is harmless
    os.close(fd)
    assert open_fds() == before


def test_the_io_thread_runs_pause_hooks_before_it_parks():
    io = IoThread("test-io")
    seen = []
    io.add_pause_hook(lambda: seen.append(threading.current_thread().name))
    io.start()
    try:
        assert io.pause() and seen == ["test-io"]
        io.resume()
        ran = threading.Event()
        io.call_soon(ran.set)               # the loop is serving again
        assert ran.wait(5)
        assert io.pause() and seen == ["test-io"] * 2
        io.resume()
    finally:
        assert io.stop()

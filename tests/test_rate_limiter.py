"""Rate limiters without a guest: Firecracker's token-bucket arithmetic on an
injected clock (pyvmm.devices.rate_limiter), the devices holding requests back
and resuming them when the limiter's timer fires, the configuration model's
checks, and the API's PUT and PATCH of limiters.  The rates a real guest gets
are measured in test_rate_limiter_linux.py."""
from __future__ import annotations

import os
import select
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.config import ConfigError, Drive, Entropy, NetworkInterface, RateLimiterConfig, \
    TokenBucketConfig, VmSpec
from pyvmm.devices.rate_limiter import KEEP, NS_PER_MS, REFILL_TIMER_NS, RateLimiter, \
    Reduction, TimerFd, TokenBucket, TokenKind
from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.blk import S_OK, T_FLUSH, T_IN, T_OUT
from pyvmm.devices.virtio.driver import HostDriver
from pyvmm.devices.virtio.rng import Rng
from tests.framework.virtio import Irq, disk, memory  # noqa: F401 - fixtures
from tests.test_virtio import close_blocks, make_blk, make_net


@pytest.fixture(autouse=True)
def _blocks_closed():
    """make_blk's devices hold their image and timer fds until closed."""
    yield
    close_blocks()


class Clock:
    """An injected monotonic clock in nanoseconds."""

    def __init__(self, now: int = 10**12) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += int(ms * NS_PER_MS)


class FakeTimer:
    """A timer the test fires: records what it was armed for."""

    def __init__(self) -> None:
        self.armed: list[int] = []
        self.pending = False

    def arm(self, delay_ns: int) -> None:
        self.armed.append(delay_ns)
        self.pending = True

    def fired(self) -> bool:
        was, self.pending = self.pending, False
        return was

    def close(self) -> None:
        pass


def limiter(clock, bandwidth=None, ops=None) -> RateLimiter:
    return RateLimiter(bandwidth=TokenBucket.create(*bandwidth, clock) if bandwidth else None,
                       ops=TokenBucket.create(*ops, clock) if ops else None, timer=FakeTimer())


# -- the token bucket ------------------------------------------------------------------

def test_zero_size_or_refill_time_disables_the_bucket():
    assert TokenBucket.create(0, 10, 100) is None
    assert TokenBucket.create(100, 10, 0) is None
    with pytest.raises(ValueError):
        TokenBucket(0, 0, 100)


def test_bucket_starts_full_and_refills_exactly():
    clock = Clock()
    bucket = TokenBucket(1000, 0, 1000, clock)       # 1 token per millisecond
    assert bucket.reduce(1000) == (Reduction.SUCCESS, 0.0)
    assert bucket.reduce(1) == (Reduction.FAILURE, 0.0)
    clock.advance_ms(1.5)                            # 1.5 tokens earned: 1 given, 0.5 kept
    assert bucket.reduce(1) == (Reduction.SUCCESS, 0.0) and bucket.budget == 0
    assert bucket.reduce(1) == (Reduction.FAILURE, 0.0)
    clock.advance_ms(0.5)                            # with the kept half: one more
    assert bucket.reduce(1) == (Reduction.SUCCESS, 0.0)
    clock.advance_ms(5000)                           # a long idle time: full, not more
    assert bucket.reduce(1000) == (Reduction.SUCCESS, 0.0)
    assert bucket.reduce(1) == (Reduction.FAILURE, 0.0)


def test_refill_of_an_awkward_rate_never_counts_a_nanosecond_twice():
    clock = Clock()
    bucket = TokenBucket(7, 0, 3, clock)             # 7 tokens per 3 ms
    bucket.reduce(7)
    got = []
    for step in range(1, 3011):                      # steps of 1 us: a little over 3 ms
        clock.now += 1000
        if bucket.reduce(1)[0] is Reduction.SUCCESS:
            got.append(step)
    # A token every 428.57 us; each one moves last_update on by the time it took,
    # rounded up (Firecracker's choice: a fraction of a nanosecond is never used
    # twice), so the 7th comes a few nanoseconds after 3 ms, not before.
    assert got == [429, 858, 1286, 1715, 2143, 2572, 3001]


def test_one_time_burst_is_spent_first_and_never_refills():
    clock = Clock()
    bucket = TokenBucket(100, 50, 1000, clock)
    assert bucket.reduce(50) == (Reduction.SUCCESS, 0.0)
    assert bucket.one_time_burst == 0 and bucket.budget == 100
    assert bucket.reduce(100)[0] is Reduction.SUCCESS
    clock.advance_ms(10_000)
    assert bucket.reduce(101)[0] is Reduction.OVER_CONSUMPTION       # the burst is gone
    fresh = TokenBucket(100, 50, 1000, clock)
    assert fresh.reduce(120)[0] is Reduction.SUCCESS                  # 50 burst + 70 budget
    assert (fresh.one_time_burst, fresh.budget) == (0, 30)


def test_a_request_larger_than_the_bucket_passes_and_empties_it():
    clock = Clock()
    bucket = TokenBucket(100, 0, 1000, clock)
    bucket.reduce(40)                                # 60 left
    outcome, ratio = bucket.reduce(250)
    assert outcome is Reduction.OVER_CONSUMPTION and ratio == pytest.approx(1.9)
    assert bucket.budget == 0


def test_force_replenish_is_capped():
    clock = Clock()
    bucket = TokenBucket(100, 20, 1000, clock)
    bucket.reduce(10)
    bucket.force_replenish(50)                       # during the burst: back to the burst
    assert (bucket.one_time_burst, bucket.budget) == (20, 100)
    bucket.reduce(20 + 30)
    bucket.force_replenish(500)
    assert bucket.budget == 100


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 10**6), burst=st.integers(0, 10**6),
       refill_ms=st.integers(1, 5000),
       steps=st.lists(st.tuples(st.integers(0, 3 * 10**9), st.integers(0, 10**6)),
                      max_size=60))
def test_bucket_never_gives_more_than_size_burst_and_refill(size, burst, refill_ms, steps):
    """Requests no larger than the bucket get, from its creation to any time, at most
    size + burst + what refilled meanwhile (+1: the fraction carried over); the budget
    stays within [0, size] and the burst within [0, burst].  Over a window starting
    later the bound has one more size: refilling is lazy (Firecracker's), so time
    that passed while the bucket was full can still be credited after it."""
    clock = Clock()
    bucket = TokenBucket(size, burst, refill_ms, clock)
    start = clock.now
    granted_at: list[tuple[int, int]] = []
    for advance, tokens in steps:
        clock.now += advance
        tokens = min(tokens, size)
        if bucket.reduce(tokens)[0] is Reduction.SUCCESS:
            granted_at.append((clock.now, tokens))
        assert 0 <= bucket.budget <= size and 0 <= bucket.one_time_burst <= burst

    def refilled(t0: int, t1: int) -> int:
        return (t1 - t0) * size // (refill_ms * NS_PER_MS)
    total = 0
    for t1, tokens in granted_at:
        total += tokens
        assert total <= size + burst + refilled(start, t1) + 1
    for i, (t0, _) in enumerate(granted_at):
        total = 0
        for t1, tokens in granted_at[i:]:
            total += tokens
            assert total <= 2 * size + burst + refilled(t0, t1) + 1


# -- the limiter -------------------------------------------------------------------

def test_limiter_blocks_for_the_refill_timer_when_short():
    clock = Clock()
    rl = limiter(clock, bandwidth=(1000, 0, 1000))
    assert rl.consume(900, TokenKind.BYTES)
    assert not rl.consume(200, TokenKind.BYTES)
    assert rl.is_blocked and rl.timer.armed == [REFILL_TIMER_NS]
    clock.advance_ms(200)                            # time alone does not unblock
    assert not rl.consume(1, TokenKind.BYTES)
    assert rl.event_handler() and not rl.is_blocked
    assert rl.consume(200, TokenKind.BYTES)          # 100 + 200 refilled
    assert not rl.event_handler()                    # spurious: no timer fired


def test_limiter_over_consumption_blocks_for_the_excess():
    clock = Clock()
    rl = limiter(clock, bandwidth=(1000, 0, 500))
    assert rl.consume(3000, TokenKind.BYTES)         # 2000 beyond the full bucket
    assert rl.is_blocked and rl.timer.armed == [2 * 500 * NS_PER_MS]
    assert not rl.consume(1, TokenKind.OPS)          # blocked for every kind


def test_request_gives_its_op_back_when_the_bytes_do_not_fit():
    clock = Clock()
    rl = limiter(clock, bandwidth=(1000, 0, 1000), ops=(10, 0, 1000))
    assert rl.consume_request(600)
    assert not rl.consume_request(600)
    assert rl.ops.budget == 9                        # one op for the one request served
    assert rl.consume_request(None) is False         # blocked until the timer
    rl.event_handler()
    assert rl.consume_request(None) and rl.ops.budget == 8


def test_kinds_without_a_bucket_are_not_limited():
    rl = limiter(Clock(), ops=(1, 0, 1000))
    assert rl.consume(10**12, TokenKind.BYTES) and rl.consume(10**12, TokenKind.BYTES)


def test_update_keeps_replaces_or_disables_and_wakes_a_blocked_limiter():
    clock = Clock()
    rl = limiter(clock, bandwidth=(100, 0, 1000), ops=(5, 0, 1000))
    assert rl.consume(10**6, TokenKind.BYTES)        # a long over-consumption wait
    assert rl.is_blocked
    rl.update_buckets(TokenBucket(10**6, 0, 1000, clock), KEEP)
    assert rl.timer.armed[-1] == 1                   # woken at once, not in 10000 s
    assert rl.ops.size == 5 and rl.bandwidth.size == 10**6 and rl.bandwidth.budget == 10**6
    rl.update_buckets(None, None)
    assert rl.to_json() is None and not rl.enabled


def test_timerfd_fires_once_armed():
    timer = TimerFd()
    try:
        assert not timer.fired()
        timer.arm(5 * NS_PER_MS)
        assert select.select([timer.fd], [], [], 2)[0] == [timer.fd]
        assert timer.fired() and not timer.fired()
    finally:
        timer.close()


# -- devices --------------------------------------------------------------------

def limited(device, name, clock, bandwidth=None, ops=None) -> RateLimiter:
    rl = limiter(clock, bandwidth, ops)
    device.set_rate_limiter(name, rl)
    return rl


def submit_blk(driver, rtype, sector, length, slot):
    """A request whose buffers sit at their own slot (several can be in the ring)."""
    mem = driver.memory
    base = driver.data + slot * 0x3000
    hdr, buf, status = base, base + 0x100, base + 0x2100
    mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    mem.write(status, b"\xee")
    buffers = [(hdr, 16, False)]
    if length:
        buffers.append((buf, length, rtype == T_IN))
    buffers.append((status, 1, True))
    return driver.submit(buffers), status


def test_throttled_blk_leaves_requests_in_the_ring_and_resumes_on_the_timer(memory, disk):
    device, transport, driver, irq = make_blk(memory, disk, queue_size=32)
    clock = Clock()
    rl = limited(device, "rate_limiter", clock, bandwidth=(8192, 0, 100))   # 80 KiB/s
    requests = [submit_blk(driver, T_IN, 8 * i, 4096, i) for i in range(5)]
    driver.kick()
    assert [head for head, _ in driver.used()] == [requests[0][0], requests[1][0]]
    assert device.stats["throttled"] == 1 and rl.is_blocked
    driver.kick()                                    # kicks while blocked: nothing, no loop
    assert driver.used() == [] and device.stats["throttled"] == 2
    clock.advance_ms(50)                             # 4096 bytes earned
    device.rate_limiter_fired("rate_limiter")        # what the I/O thread does on the timer
    assert [head for head, _ in driver.used()] == [requests[2][0]]
    clock.advance_ms(1000)
    device.rate_limiter_fired("rate_limiter")
    assert [head for head, _ in driver.used()] == [r[0] for r in requests[3:]]
    assert all(memory.read(status, 1) == bytes([S_OK]) for _, status in requests)
    assert device.stats["requests"] == 5 and device.stats["bytes_read"] == 5 * 4096


def test_blk_ops_limit_counts_flushes_and_bytes_only_reads_and_writes(memory, disk):
    device, _, driver, _ = make_blk(memory, disk, queue_size=32)
    clock = Clock()
    rl = limited(device, "rate_limiter", clock, bandwidth=(4096, 0, 1000), ops=(3, 0, 1000))
    heads = [submit_blk(driver, T_FLUSH, 0, 0, 0)[0], submit_blk(driver, T_OUT, 0, 4096, 1)[0],
             submit_blk(driver, T_FLUSH, 0, 0, 2)[0], submit_blk(driver, T_FLUSH, 0, 0, 3)[0]]
    driver.kick()
    assert [h for h, _ in driver.used()] == heads[:3]          # 3 ops; 4096 bytes
    assert rl.is_blocked and rl.bandwidth.budget == 0 and rl.ops.budget == 0


def test_limiter_timer_resumes_the_queue_through_the_io_thread(memory, disk):
    """In a VM: the timer is an fd the I/O thread watches; when it fires the queue
    is served again through the transport, with no kick from the guest."""
    from pyvmm.devices.iothread import IoThread
    device, transport, driver, _ = make_blk(memory, disk, queue_size=32)
    device.update_rate_limiter("rate_limiter", RateLimiterConfig(
        bandwidth=TokenBucketConfig(size=8192, refill_time=20)))       # 400 KiB/s
    io = IoThread()
    device.wire_rate_limiters(io.watch, transport.notify)
    io.start()
    try:
        heads = [submit_blk(driver, T_IN, 8 * i, 4096, i)[0] for i in range(8)]
        with device.lock:
            driver.kick()
        used = []
        for _ in range(200):
            used += driver.used()
            if len(used) == 8:
                break
            select.select([], [], [], 0.01)
        assert [h for h, _ in used] == heads and device.stats["throttled"] >= 1
    finally:
        io.stop()
        assert not io.error_count, io.recent_errors


def test_rng_waits_for_entropy_budget(memory):
    device = Rng()
    transport = mmio.VirtioMmio(device, memory, Irq())
    driver = HostDriver(transport, memory)
    driver.setup()
    clock = Clock()
    limited(device, "rate_limiter", clock, bandwidth=(100, 0, 1000))
    heads = [driver.submit([(driver.data + 0x100 * i, 64, True)]) for i in range(3)]
    driver.kick()
    assert driver.used() == [(heads[0], 64)]
    clock.advance_ms(1000)
    device.rate_limiter_fired("rate_limiter")
    assert driver.used() == [(heads[1], 64)]          # 100 tokens: one more 64-byte request
    assert device.stats["throttled"] == 2


def test_net_tx_throttled_frames_stay_in_the_ring(memory):
    device, t, rx, tx, host = make_net(memory)
    clock = Clock()
    limited(device, "tx_rate_limiter", clock, ops=(2, 0, 1000))
    heads = []
    for i in range(3):
        memory.write(tx.data + 0x1000 * i, bytes(12) + bytes([i]) * 100)
        heads.append(tx.submit([(tx.data + 0x1000 * i, 112, False)]))
    t.notify(1)
    assert [h for h, _ in tx.used()] == heads[:2]
    clock.advance_ms(500)
    device.rate_limiter_fired("tx_rate_limiter")
    assert [h for h, _ in tx.used()] == heads[2:]
    assert [host.recv(4096)[12] for _ in range(3)] == [0, 1, 2]      # in order, none lost


def test_net_rx_throttled_frames_wait_in_the_tap(memory):
    device, t, rx, tx, host = make_net(memory)
    watching = []
    device.watch_tap = watching.append
    clock = Clock()
    limited(device, "rx_rate_limiter", clock, bandwidth=(300, 0, 1000))
    for i in range(4):
        rx.submit([(rx.data + 0x1000 * i, 2048, True)])
    for i in range(4):
        host.send(bytes(12) + bytes([i]) * 88)       # 100-byte frames
    device.tap_readable()
    assert len(rx.used()) == 3 and watching[-1] is False    # the TAP is not read meanwhile
    assert device._pending is not None and len(device._pending) == 100     # one held back
    clock.advance_ms(1000)
    device.rate_limiter_fired("rx_rate_limiter")
    assert len(rx.used()) == 1 and watching[-1] is True
    got = [memory.read(rx.data + 0x1000 * i + 12, 1)[0] for i in range(4)]
    assert got == [0, 1, 2, 3] and device.stats["rx_packets"] == 4
    assert device.stats["throttled"] >= 1


def test_devices_report_throttled_in_their_stats(memory, disk):
    device, transport, _, _ = make_blk(memory, disk)
    assert transport.report()["throttled"] == 0


# -- the configuration model -------------------------------------------------------------

def test_rate_limiter_config_round_trips_and_zero_disables(tmp_path, disk):
    body = {"bandwidth": {"size": 1 << 20, "one_time_burst": 4096, "refill_time": 1000},
            "ops": {"size": 0, "refill_time": 100}}
    drive = Drive.from_json({"drive_id": "d", "path_on_host": str(disk),
                             "is_root_device": False, "rate_limiter": body})
    assert drive.to_json()["rate_limiter"] == {"bandwidth": body["bandwidth"]}
    assert Entropy.from_json({"rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}) \
        .to_json() == {}
    iface = NetworkInterface.from_json({"iface_id": "e", "host_dev_name": "tap0",
                                        "tx_rate_limiter": {"ops": {"size": 10,
                                                                    "refill_time": 10}}})
    assert iface.to_json()["tx_rate_limiter"] == {"ops": {"size": 10, "refill_time": 10}}
    assert "rx_rate_limiter" not in iface.to_json()


@pytest.mark.parametrize("limiter_body, words", [
    ({"bandwidth": {"size": -1, "refill_time": 100}}, "out of range"),
    ({"bandwidth": {"size": 1 << 64, "refill_time": 100}}, "out of range"),
    ({"ops": {"size": 1, "refill_time": 1 << 60}}, "too long"),
    ({"ops": {"size": 1, "refill_time": 10, "one_time_burst": -5}}, "out of range"),
    ({"ops": {"size": 1.5, "refill_time": 10}}, "integer"),
    ({"ops": {"size": True, "refill_time": 10}}, "integer"),
    ({"ops": {"refill_time": 10}}, "missing field 'size'"),
    ({"ops": {"size": 1}}, "missing field 'refill_time'"),
    ({"ops": {"size": 1, "refill_time": 1, "extra": 1}}, "unknown field"),
    ({"bytes": {"size": 1, "refill_time": 1}}, "unknown field"),
    ({"ops": []}, "object"),
    ([], "object"),
])
def test_hostile_limiters_are_refused_with_one_sentence(limiter_body, words, disk):
    with pytest.raises(ConfigError, match=words):
        Drive.from_json({"drive_id": "d", "path_on_host": str(disk), "is_root_device": False,
                         "rate_limiter": limiter_body})


def test_config_file_limiters_reach_the_devices(tmp_path, disk):
    """A Firecracker config file's rate_limiter builds devices with those buckets."""
    from pyvmm.builder import _create_device
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    spec = VmSpec.from_json({
        "boot-source": {"kernel_image_path": str(kernel)},
        "drives": [{"drive_id": "d", "path_on_host": str(disk), "is_root_device": False,
                    "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 10}}}],
        "entropy": {"rate_limiter": {"ops": {"size": 5, "refill_time": 1000,
                                             "one_time_burst": 7}}}})
    again = VmSpec.from_json(spec.to_json())        # and GET /vm/config reads back the same
    for section, name, expected in (
            (again.drives["d"], "rate_limiter", {"bandwidth": {"size": 1000, "refill_time": 10}}),
            (again.entropy, "rate_limiter",
             {"ops": {"size": 5, "one_time_burst": 7, "refill_time": 1000}})):
        device = _create_device(section)
        try:
            assert device.rate_limiter_json(name) == expected
        finally:
            device.close()


# -- the API --------------------------------------------------------------------------------

BUCKET = {"size": 1 << 20, "refill_time": 1000}


def test_put_and_patch_limiters_through_the_api(api, api_files):
    from tests.framework.api import FakeLinuxVm
    api.call("PUT", "/boot-source", {"kernel_image_path": str(api_files / "vmlinux")}, 204)
    api.call("PUT", "/drives/data", {"drive_id": "data",
                                     "path_on_host": str(api_files / "data.img"),
                                     "is_root_device": False,
                                     "rate_limiter": {"bandwidth": BUCKET}}, 204)
    api.call("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                                 "rx_rate_limiter": {"ops": BUCKET}}, 204)
    api.call("PUT", "/entropy", {"rate_limiter": {"bandwidth": BUCKET}}, 204)
    config = api.payload("GET", "/vm/config", expect=200)
    assert config["drives"][0]["rate_limiter"] == {"bandwidth": BUCKET}
    assert config["network-interfaces"][0]["rx_rate_limiter"] == {"ops": BUCKET}
    assert config["entropy"] == {"rate_limiter": {"bandwidth": BUCKET}}
    api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
    fake = FakeLinuxVm.instances[-1]
    ops = {"size": 100, "one_time_burst": 10, "refill_time": 1000}
    api.call("PATCH", "/drives/data", {"drive_id": "data", "rate_limiter": {"ops": ops}}, 204)
    assert fake.limits["drive:data", "rate_limiter"] == RateLimiterConfig(
        ops=TokenBucketConfig(100, 1000, 10))
    api.call("PATCH", "/network-interfaces/eth0",
             {"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": BUCKET},
              "rx_rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}, 204)
    config = api.payload("GET", "/vm/config", expect=200)
    assert config["drives"][0]["rate_limiter"] == {"bandwidth": BUCKET, "ops": ops}
    iface = config["network-interfaces"][0]
    assert iface["tx_rate_limiter"] == {"bandwidth": BUCKET} and "rx_rate_limiter" not in iface
    for url, body, words in [
            ("/drives/ghost", {"drive_id": "ghost", "rate_limiter": {"ops": ops}},
             "does not exist"),
            ("/network-interfaces/eth9", {"iface_id": "eth9",
                                          "rx_rate_limiter": {"ops": ops}}, "does not exist"),
            ("/network-interfaces/eth0", {"iface_id": "eth1"}, "does not match"),
            ("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap1"},
             "unknown field"),
            ("/network-interfaces/eth0", {"iface_id": "eth0",
                                          "rx_rate_limiter": {"ops": {"size": -1,
                                                                      "refill_time": 1}}},
             "out of range"),
            ("/drives/data", {"drive_id": "data", "rate_limiter": {"ops": {"size": 1}}},
             "missing field 'refill_time'")]:
        _, fault = api.call("PATCH", url, body, 400)
        assert words in fault["fault_message"], (url, fault)
    assert api.payload("GET", "/vm/config", expect=200)["drives"][0]["rate_limiter"] == \
        {"bandwidth": BUCKET, "ops": ops}                      # a refused PATCH changed nothing


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) |
                         st.floats(allow_nan=False) | st.text(max_size=5),
                         lambda inner: st.lists(inner, max_size=3) |
                         st.dictionaries(st.sampled_from(["size", "refill_time",
                                                          "one_time_burst", "bandwidth",
                                                          "ops", "x"]), inner, max_size=4),
                         max_leaves=12))
def test_any_limiter_body_is_accepted_or_refused_cleanly(body):
    try:
        parsed = RateLimiterConfig.from_json(body, "rate_limiter")
    except ConfigError as exc:
        assert str(exc).startswith("rate_limiter")
        return
    assert RateLimiterConfig.from_json(parsed.to_json(), "again") == parsed
    RateLimiter.from_config(parsed.effective(), timer=FakeTimer())


def test_update_on_a_device_wakes_it_with_its_new_limit(memory, disk):
    device, _, driver, _ = make_blk(memory, disk, queue_size=32)
    clock = Clock()
    rl = limited(device, "rate_limiter", clock, bandwidth=(4096, 0, 10_000))
    heads = [submit_blk(driver, T_IN, 8 * i, 4096, i)[0] for i in range(3)]
    driver.kick()
    assert len(driver.used()) == 1 and rl.is_blocked
    device.update_rate_limiter("rate_limiter", RateLimiterConfig(
        bandwidth=TokenBucketConfig(size=0, refill_time=0)))        # PATCH: no limit
    assert rl.timer.armed[-1] == 1
    device.rate_limiter_fired("rate_limiter")
    assert [h for h, _ in driver.used()] == heads[1:]
    assert os.path.getsize(disk) > 0


def test_serial_output_beyond_its_bucket_is_dropped_and_counted(tmp_path):
    """PUT /serial's rate_limiter (a TokenBucket of bytes): Firecracker's SerialOut
    drops a write it has no budget for, and counts it."""
    from pyvmm.config import SerialConfig
    from pyvmm.console import ConsoleSink
    from pyvmm.devices.rate_limiter import TokenBucket
    config = SerialConfig.from_json({"serial_out_path": str(tmp_path / "out"),
                                     "rate_limiter": {"size": 4, "refill_time": 1_000_000}})
    assert config.to_json()["rate_limiter"] == {"size": 4, "refill_time": 1_000_000}
    assert SerialConfig.from_json({"rate_limiter": {"size": 0, "refill_time": 5}}) \
        .rate_limiter is None                       # a zero bucket limits nothing
    sink = ConsoleSink(f"file:{tmp_path / 'out'}",
                       rate_limiter=TokenBucket.from_config(config.rate_limiter))
    for byte in b"abcdefgh":                         # the UART hands over one byte a time
        sink.write(bytes([byte]))
    sink.close()
    assert (tmp_path / "out").read_bytes() == b"abcd"
    assert sink.rate_limited == 4

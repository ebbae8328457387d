"""Rate limiters: Firecracker's token buckets (src/vmm/src/rate_limiter/mod.rs),
arithmetic and blocking rules included, so that a configuration written for
Firecracker limits a pyvmm guest to the same rates.

A RateLimiter has up to two TokenBuckets: `bandwidth` (tokens are bytes) and
`ops` (tokens are requests).  A bucket holds at most `size` tokens, starts
full, and refills continuously at size / refill_time, capped at size; its
`one_time_burst` is extra credit spent first that never refills.  A request
larger than the whole bucket is let through (it could never fit otherwise)
and empties it; the limiter then blocks for as long as refilling the excess
takes.  A request that does not fit the budget blocks the limiter for
REFILL_TIMER (100 ms) and is tried again then.

"Blocked" is a timer, not a clock comparison: while the limiter's timer is
armed, every consume() fails; the device registers the timer's fd with its
I/O thread and calls event_handler() when it fires, then serves its queue
again.  That is what keeps a throttled device off the CPU: nothing runs
between the refusal and the timer.

The clock is injectable (integer nanoseconds, time.monotonic_ns by default)
and so is the timer, so tests can check the refill arithmetic exactly.
"""
from __future__ import annotations

import ctypes
import enum
import functools
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from pyvmm.config import RateLimiterConfig, TokenBucketConfig

Clock = Callable[[], int]              # monotonic time in nanoseconds

NS_PER_MS = 1_000_000
U64_MAX = (1 << 64) - 1
# How long a limiter stays blocked after a request did not fit (Firecracker's
# REFILL_TIMER_DURATION): short enough to follow the refill, long enough that
# a throttled device costs ~10 wake-ups a second.
REFILL_TIMER_NS = 100 * NS_PER_MS
# timerfd_settime takes a time_t: an over-consumption of a huge request on a tiny
# bucket can ask for longer than that (the device then waits ~68 years, as asked).
MAX_TIMER_NS = (1 << 31) * 1_000_000_000


class Reduction(enum.Enum):
    """What TokenBucket.reduce() did (Firecracker's BucketReduction)."""
    FAILURE = "failure"                # not enough tokens: nothing taken
    SUCCESS = "success"                # taken from the one-time burst and/or the budget
    OVER_CONSUMPTION = "over"          # more than the bucket's size: taken, the bucket emptied


class TokenKind(enum.Enum):
    BYTES = "bytes"
    OPS = "ops"


@dataclass
class TokenBucket:
    """One bucket (Firecracker's TokenBucket).  Build it with create(), which
    returns None for a disabled bucket (size or refill_time 0), as Firecracker."""
    size: int
    initial_one_time_burst: int
    refill_time_ms: int
    clock: Clock = time.monotonic_ns
    one_time_burst: int = field(init=False)
    budget: int = field(init=False)
    last_update: int = field(init=False)

    def __post_init__(self) -> None:
        if self.size <= 0 or self.refill_time_ms <= 0:
            raise ValueError("a token bucket needs a positive size and refill_time "
                             "(use TokenBucket.create for Firecracker's 'zero disables')")
        self.one_time_burst = self.initial_one_time_burst
        self.budget = self.size                    # starts full
        self.last_update = self.clock()
        self._refill_ns = self.refill_time_ms * NS_PER_MS

    @classmethod
    def create(cls, size: int, one_time_burst: int, refill_time_ms: int,
               clock: Clock = time.monotonic_ns) -> "TokenBucket | None":
        """A bucket, or None when size or refill_time is 0: limiting disabled."""
        if size == 0 or refill_time_ms == 0:
            return None
        return cls(size, one_time_burst, refill_time_ms, clock)

    @classmethod
    def from_config(cls, config: "TokenBucketConfig | None",
                    clock: Clock = time.monotonic_ns) -> "TokenBucket | None":
        if config is None:
            return None
        return cls.create(config.size, config.one_time_burst or 0, config.refill_time, clock)

    def _auto_replenish(self) -> None:
        """Add the tokens earned since last_update, capped at size.  Only whole
        tokens are added, and last_update moves on by exactly the time they took
        (rounded up), so the fraction of a token earned is kept for next time and
        no nanosecond is counted twice: Firecracker's arithmetic, exact here
        because Python's integers do not overflow."""
        now = self.clock()
        delta = now - self.last_update
        if delta >= self._refill_ns:
            self.budget = self.size
            self.last_update = now
            return
        if delta <= 0:
            return                                 # a clock that has not moved on
        tokens = delta * self.size // self._refill_ns
        adjustment = -(-tokens * self._refill_ns // self.size)     # ceil division
        self.last_update += adjustment
        self.budget = min(self.budget + tokens, self.size)

    def reduce(self, tokens: int) -> tuple[Reduction, float]:
        """Take `tokens`: (SUCCESS, 0), (FAILURE, 0) with nothing taken, or
        (OVER_CONSUMPTION, ratio): more than the bucket's size was taken, `ratio`
        times its size beyond what was in it."""
        if self.one_time_burst > 0:
            if self.one_time_burst >= tokens:
                self.one_time_burst -= tokens
                self.last_update = self.clock()
                return Reduction.SUCCESS, 0.0
            tokens -= self.one_time_burst
            self.one_time_burst = 0
        if tokens > self.budget:
            self._auto_replenish()                 # only refilled when needed, as Firecracker
            if tokens > self.size:
                tokens -= self.budget
                self.budget = 0
                return Reduction.OVER_CONSUMPTION, tokens / self.size
            if tokens > self.budget:
                return Reduction.FAILURE, 0.0
        self.budget -= tokens
        return Reduction.SUCCESS, 0.0

    def force_replenish(self, tokens: int) -> None:
        """Give tokens back (a request taken and then not carried out).  During the
        one-time burst they go back to the burst, as Firecracker does."""
        if self.one_time_burst > 0:
            self.one_time_burst = min(self.one_time_burst + tokens, self.initial_one_time_burst)
            return
        self.budget = min(self.budget + tokens, self.size)

    def to_json(self) -> dict:
        out = {"size": self.size, "refill_time": self.refill_time_ms}
        if self.initial_one_time_burst:
            out["one_time_burst"] = self.initial_one_time_burst
        return out


class Timer(Protocol):
    """What a RateLimiter needs of a one-shot timer."""

    def arm(self, delay_ns: int) -> None: ...
    def fired(self) -> bool: ...            # consumes the expiry; False if it had not fired
    def close(self) -> None: ...


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class TimerFd:
    """A one-shot CLOCK_MONOTONIC timerfd armed relative to now (Python 3.11 has no
    os.timerfd_create).  Created on first use of fd or arm(): a VM's devices ask for
    the fd when they are wired to the I/O thread, before any seccomp filter."""
    CLOCK_MONOTONIC = 1
    _libc: ctypes.CDLL | None = None

    def __init__(self) -> None:
        self._fd = -1

    @property
    def fd(self) -> int:
        if self._fd < 0:
            if TimerFd._libc is None:
                TimerFd._libc = ctypes.CDLL(None, use_errno=True)
            fd = TimerFd._libc.timerfd_create(self.CLOCK_MONOTONIC,
                                              os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "timerfd_create failed")
            self._fd = fd
        return self._fd

    def arm(self, delay_ns: int) -> None:
        fd = self.fd
        delay_ns = min(max(delay_ns, 1), MAX_TIMER_NS)   # 0 would disarm it
        spec = _Itimerspec()
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(delay_ns, 1_000_000_000)
        assert TimerFd._libc is not None
        if TimerFd._libc.timerfd_settime(fd, 0, ctypes.byref(spec), None) < 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def fired(self) -> bool:
        if self._fd < 0:
            return False
        try:
            return os.read(self._fd, 8) != b""
        except BlockingIOError:
            return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Keep:
    """PATCH left this bucket out: keep it as it is (Firecracker's BucketUpdate::None)."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()
BucketUpdate = "TokenBucket | None | _Keep"     # replace, disable, or keep


@dataclass
class RateLimiter:
    """Bandwidth and ops buckets behind one timer (Firecracker's RateLimiter).
    Either bucket may be None: no limit of that kind."""
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None
    timer: Timer = field(default_factory=TimerFd)
    timer_active: bool = False

    @classmethod
    def from_config(cls, config: "RateLimiterConfig | None", clock: Clock = time.monotonic_ns,
                    timer: Timer | None = None) -> "RateLimiter":
        """A limiter from the configuration model (None: one that never limits, still
        with its timer, so a PATCH can enable it at run time)."""
        limiter = cls(timer=timer if timer is not None else TimerFd())
        if config is not None:
            limiter.bandwidth = TokenBucket.from_config(config.bandwidth, clock)
            limiter.ops = TokenBucket.from_config(config.ops, clock)
        return limiter

    @property
    def enabled(self) -> bool:
        return self.bandwidth is not None or self.ops is not None

    @property
    def is_blocked(self) -> bool:
        return self.timer_active

    def _activate_timer(self, delay_ns: int) -> None:
        self.timer.arm(delay_ns)
        self.timer_active = True

    def consume(self, tokens: int, kind: TokenKind) -> bool:
        """Take tokens of one kind; False (and blocked until the timer fires) if the
        budget does not allow it.  Always True for a kind with no bucket."""
        if self.timer_active:
            return False
        bucket = self.bandwidth if kind is TokenKind.BYTES else self.ops
        if bucket is None:
            return True
        outcome, ratio = bucket.reduce(tokens)
        if outcome is Reduction.FAILURE:
            self._activate_timer(REFILL_TIMER_NS)
            return False
        if outcome is Reduction.OVER_CONSUMPTION:
            # The request borrowed `ratio` bucket-fulls: refilling those takes
            # ratio * refill_time, and nothing passes meanwhile.  Firecracker
            # truncates to whole milliseconds.
            self._activate_timer(int(ratio * bucket.refill_time_ms) * NS_PER_MS)
        return True

    def consume_request(self, byte_count: int | None) -> bool:
        """One request of byte_count bytes (None: a request that moves no data, which
        takes only an op): the ops token first, given back if the bytes do not fit,
        as Firecracker's devices do."""
        if not self.consume(1, TokenKind.OPS):
            return False
        if byte_count is not None and not self.consume(byte_count, TokenKind.BYTES):
            self.manual_replenish(1, TokenKind.OPS)
            return False
        return True

    def manual_replenish(self, tokens: int, kind: TokenKind) -> None:
        bucket = self.bandwidth if kind is TokenKind.BYTES else self.ops
        if bucket is not None:
            bucket.force_replenish(tokens)

    def event_handler(self) -> bool:
        """The timer's fd is readable: unblock.  False for a spurious event."""
        if not self.timer.fired():
            return False
        self.timer_active = False
        return True

    def update_buckets(self, bandwidth: BucketUpdate = KEEP, ops: BucketUpdate = KEEP) -> None:
        """PATCH: each bucket kept (KEEP), disabled (None) or replaced (a new, full
        bucket).  A limiter blocked on a long over-consumption wait is woken at
        once, so that a raised limit applies now (Firecracker waits the old wait out)."""
        if bandwidth is not KEEP:
            self.bandwidth = bandwidth              # type: ignore[assignment]
        if ops is not KEEP:
            self.ops = ops                          # type: ignore[assignment]
        if self.timer_active and (bandwidth is not KEEP or ops is not KEEP):
            self.timer.arm(1)

    def to_json(self) -> dict | None:
        """The configuration this limiter has now (None: no limit at all)."""
        if not self.enabled:
            return None
        out = {}
        if self.bandwidth is not None:
            out["bandwidth"] = self.bandwidth.to_json()
        if self.ops is not None:
            out["ops"] = self.ops.to_json()
        return out

    def close(self) -> None:
        self.timer.close()


def bucket_update(config: "TokenBucketConfig | None", given: bool,
                  clock: Clock = time.monotonic_ns) -> BucketUpdate:
    """What a PATCH body's bucket means (Firecracker's get_bucket_update): absent,
    KEEP; zero size or refill_time, None (disabled); else a new, full bucket."""
    if not given:
        return KEEP
    return TokenBucket.from_config(config, clock)


# What serve_limited() charges a chain (cost() returns bytes, or one of these).
OPS_ONLY = -1          # a request that moves no data: one op, no bytes (a flush)
UNLIMITED = -2         # a malformed chain: not charged; the device fails it as usual


def serve_limited(device: Any, queue: Any, limiter: RateLimiter, chains_per_slice: int,
                  cost: Callable[[Any], int], serve: Callable[[Any], int | None]) -> int:
    """VirtioDevice.serve_each with a limiter in front: each chain is charged
    cost(chain) bytes and one op before it is served; one that does not fit is
    given back to the ring (unpop: nothing is lost, the guest sees nothing) and
    the queue waits for the limiter's timer, counted in the device's
    `throttled` stat.  Returns how many chains were served.  Without a limiter
    (none configured, none waiting) it is the device's serve_each.  serve() may
    return None: the chain is in flight (virtio-blk's Async engine), charged
    already, and the device returns it when it completes."""
    if not limiter.enabled and not limiter.is_blocked:
        return device.serve_each(queue, serve, chains_per_slice)
    served = used = 0
    while served < chains_per_slice:
        if limiter.is_blocked:
            if queue.has_available():
                device.stats["throttled"] += 1
            break
        chain = queue.pop()
        if chain is None:
            break
        charge = cost(chain)
        if charge != UNLIMITED and \
                not limiter.consume_request(None if charge == OPS_ONLY else charge):
            queue.unpop(1)
            device.stats["throttled"] += 1
            break
        written = serve(chain)
        if written is not None:
            queue.push_used(chain.head, written)
            used += 1
        served += 1
    if used:
        device.interrupt.signal_used(queue)
    return served


class RateLimited:
    """What a VirtioDevice with rate limiters adds (blk, net, rng): its limiters by
    their API name, each in front of one queue; their timers' handlers; PATCH.

    `limiters[name] = (limiter, queue index)`.  Without wire_rate_limiters() (a
    device driven directly, in tests) a fired timer serves the queue itself;
    in a VM the builder wires the timers to the I/O thread and resuming to the
    transport's notify(), which yields to the other devices between slices."""

    limiters: dict[str, tuple[RateLimiter, int]]

    def init_limiters(self, configs: dict[str, "tuple[RateLimiterConfig | None, int]"]) -> None:
        self.limiters = {name: (RateLimiter.from_config(config), index)
                         for name, (config, index) in configs.items()}
        self.stats["throttled"] = 0                 # type: ignore[attr-defined]
        self._resume: Callable[[int], None] = self._serve_until_done

    def _serve_until_done(self, index: int) -> None:
        serve_slice = functools.partial(self.process_queue, index)   # type: ignore[attr-defined]
        while self.serve(serve_slice):                                # type: ignore[attr-defined]
            pass

    def wire_rate_limiters(self, watch: Callable[[int, Callable[[], None], bool], None],
                           resume: Callable[[int], None]) -> None:
        """watch(fd, handler, True) each limiter's timer (the I/O thread's watch());
        resume(queue index) serves a queue again once its limiter unblocks."""
        self._resume = resume
        for name, (limiter, _) in self.limiters.items():
            watch(limiter.timer.fd, functools.partial(self.rate_limiter_fired, name), True)

    def rate_limiter_fired(self, name: str) -> None:
        """A limiter's timer fired (I/O thread): unblock it and serve what it held back."""
        limiter, index = self.limiters[name]
        with self.lock:                             # type: ignore[attr-defined]
            unblocked = limiter.event_handler()
        if unblocked:
            self._resume(index)

    def set_rate_limiter(self, name: str, limiter: RateLimiter) -> None:
        """Replace a limiter outright (tests: an injected clock and timer)."""
        with self.lock:                             # type: ignore[attr-defined]
            old, index = self.limiters[name]
            self.limiters[name] = (limiter, index)
        old.close()

    def update_rate_limiter(self, name: str, update: "RateLimiterConfig") -> None:
        """PATCH (API thread): the buckets `update` gives replace ours, full; a zero
        one disables its kind; the others stay.  KeyError for an unknown name."""
        limiter, _ = self.limiters[name]
        with self.lock:                             # type: ignore[attr-defined]
            limiter.update_buckets(
                bucket_update(update.bandwidth, update.bandwidth is not None),
                bucket_update(update.ops, update.ops is not None))

    def rate_limiter_json(self, name: str) -> dict | None:
        return self.limiters[name][0].to_json()

    def close_limiters(self) -> None:
        for limiter, _ in self.limiters.values():
            limiter.close()


__all__ = ["KEEP", "OPS_ONLY", "UNLIMITED", "RateLimited", "RateLimiter", "Reduction", "TimerFd",
           "TokenBucket", "TokenKind", "bucket_update", "serve_limited"]

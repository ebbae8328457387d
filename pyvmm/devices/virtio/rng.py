"""virtio-rng / entropy device (virtio 1.2, section 5.4): buffers filled from getrandom().

A rate limiter may stand in front of the queue (Firecracker's: one op and the
buffer's whole length in bytes per request); a request over budget stays in
the ring until the limiter's timer fires."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pyvmm.devices.rate_limiter import UNLIMITED, RateLimited, serve_limited
from pyvmm.devices.virtio.chain import Chain, QueueError
from pyvmm.devices.virtio.device import CHAINS_PER_SLICE, REQUEST_MEMORY_BOUND, VirtioDevice

DEVICE_ID_ENTROPY = 4
MAX_REQUEST = REQUEST_MEMORY_BOUND      # per chain: one bytes object; the driver asks for less

if TYPE_CHECKING:
    from pyvmm.config import RateLimiterConfig


class Rng(VirtioDevice, RateLimited):
    device_id = DEVICE_ID_ENTROPY
    queue_sizes = (64,)
    name = "virtio-rng"

    def __init__(self, rate_limiter: "RateLimiterConfig | None" = None) -> None:
        super().__init__()
        self.init_limiters({"rate_limiter": (rate_limiter, 0)})

    def close(self) -> None:
        self.close_limiters()

    def process_queue(self, index: int) -> bool:
        limiter = self.limiters["rate_limiter"][0]
        return serve_limited(self, self.queues[index], limiter, CHAINS_PER_SLICE,
                             self._cost, self._fill) >= CHAINS_PER_SLICE

    @staticmethod
    def _cost(chain: Chain) -> int:
        """Firecracker charges the whole writable length, before its 64 KiB cap;
        a chain with device-readable buffers is not charged (_fill fails it)."""
        return UNLIMITED if chain.readable_buffers else chain.total_bytes

    def _fill(self, chain: Chain) -> int:
        if chain.readable_buffers:
            raise QueueError("virtio-rng buffers must be device-writable")
        buffers = chain.writer()
        wanted = min(buffers.available_bytes(), MAX_REQUEST)
        if wanted:
            # getrandom() may return fewer bytes than asked: the driver gets those.
            buffers.write(os.getrandom(wanted))
        self.stats["requests"] += 1
        self.stats["bytes_read"] += buffers.bytes_written
        return buffers.bytes_written

"""virtio-rng / entropy device (virtio 1.2, section 5.4): buffers filled from getrandom()."""
from __future__ import annotations

import os

from pyvmm.devices.virtio.chain import Chain, QueueError
from pyvmm.devices.virtio.device import CHAINS_PER_SLICE, REQUEST_MEMORY_BOUND, VirtioDevice

DEVICE_ID_ENTROPY = 4
MAX_REQUEST = REQUEST_MEMORY_BOUND      # per chain: one bytes object; the driver asks for less


class Rng(VirtioDevice):
    device_id = DEVICE_ID_ENTROPY
    queue_sizes = (64,)
    name = "virtio-rng"

    def process_queue(self, index: int) -> bool:
        return self.serve_each(self.queues[index], self._fill) >= CHAINS_PER_SLICE

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

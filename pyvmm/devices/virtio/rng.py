"""virtio-rng / entropy device (virtio 1.2, section 5.4): buffers filled from getrandom()."""
from __future__ import annotations

import os

from pyvmm.devices.virtio.mmio import VirtioDevice
from pyvmm.devices.virtio.queue import QueueError

DEVICE_ID_ENTROPY = 4
MAX_REQUEST = 64 * 1024                 # per chain; the driver asks for far less


class Rng(VirtioDevice):
    device_id = DEVICE_ID_ENTROPY
    queue_sizes = (64,)
    name = "virtio-rng"

    def process_queue(self, index: int) -> None:
        queue = self.queues[index]
        memory = self.transport.memory
        served = 0
        while (chain := queue.pop()) is not None:
            if chain.readable:
                raise QueueError("virtio-rng buffers must be device-writable")
            budget, written = MAX_REQUEST, 0
            for desc in chain.writable:
                n = min(desc.length, budget)
                if n:
                    memory.write(desc.addr, os.getrandom(n))
                written += n
                budget -= n
            self.stats["requests"] += 1
            self.stats["bytes_read"] += written
            queue.push_used(chain.head, written)
            served += 1
        if served:
            self.signal_used(queue)

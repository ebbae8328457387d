"""What the virtio device tests share: guest RAM, a random disk image, an interrupt counter.

Import the fixtures into a test module (`from tests.framework.virtio import memory,
disk`) to use them there.
"""
from __future__ import annotations

import os

import pytest

from pyvmm.memory import GuestMemory, MiB

MEM = 4 * MiB                 # the guest RAM a device test's rings and buffers live in
DISK_SECTORS = 2048           # a 1 MiB image


class Irq:
    """Counts the interrupts a transport raises (its raise_irq callable)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture()
def memory():
    mem = GuestMemory([(0, MEM)])
    yield mem
    mem.close()


@pytest.fixture()
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(512 * DISK_SECTORS))
    return path

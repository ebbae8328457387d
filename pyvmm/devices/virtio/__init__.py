"""virtio 1.2 devices on the virtio-mmio transport (spec sections 2, 4.2, 5).

- device.py: the device contract (VirtioDevice: activate, reset, close, save,
  restore) and VirtioInterrupt, the device's line to its driver;
- mmio.py: the virtio-mmio register file (VirtioMmio) and attach() to a VM;
- queue.py: split virtqueues, read defensively;
- chain.py: descriptor chains and their Reader/Writer cursors;
- state.py: reading saved state back as hostile input;
- blk.py, net.py, rng.py: the devices; driver.py: a host-side driver for tests.
"""

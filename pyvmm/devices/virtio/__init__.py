"""virtio 1.2 devices on the virtio-mmio transport (spec sections 2, 4.2, 5)."""

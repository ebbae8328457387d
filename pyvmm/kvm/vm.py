"""The VM fd: memory slots, the in-kernel irqchip and PIT, irqfds, ioeventfds."""
from __future__ import annotations

import os

from pyvmm.kvm.ioctl import ffi, ioctl_int, ioctl_struct, lib


class VmFd:
    """A KVM VM file descriptor (KVM_CREATE_VM)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int,
                               host_addr: int, flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": guest_phys_addr,
            "memory_size": size, "userspace_addr": host_addr})
        ioctl_struct(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region,
                     f"KVM_SET_USER_MEMORY_REGION(slot {slot} at {guest_phys_addr:#x})")

    def set_tss_addr(self, addr: int) -> None:
        """Three pages Intel VMX uses to emulate real mode; must not overlap RAM or MMIO."""
        ioctl_int(self.fd, lib.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        """One page for VMX's real-mode identity page table, next to the TSS pages."""
        value = ffi.new("uint64_t *", addr)
        ioctl_struct(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, value, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        """The in-kernel PIC, IOAPIC and per-vCPU LAPICs; must precede vCPU creation."""
        ioctl_int(self.fd, lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        # PIT_SPEAKER_DUMMY: port 0x61 reads are answered in the kernel too.
        config = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        ioctl_struct(self.fd, lib.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        line = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level})
        ioctl_struct(self.fd, lib.KVM_IRQ_LINE, line, f"KVM_IRQ_LINE({irq})")

    def irqfd(self, eventfd: int, gsi: int, deassign: bool = False) -> None:
        """Signalling eventfd raises (edge) interrupt gsi with no exit to userspace."""
        flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        arg = ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi, "flags": flags})
        ioctl_struct(self.fd, lib.KVM_IRQFD, arg, f"KVM_IRQFD(gsi {gsi})")

    def ioeventfd(self, eventfd: int, addr: int, length: int, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        """A guest write of length bytes at addr signals eventfd instead of exiting."""
        flags = 0
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": eventfd,
            "flags": flags})
        ioctl_struct(self.fd, lib.KVM_IOEVENTFD, arg, f"KVM_IOEVENTFD({addr:#x})")

    def get_clock(self) -> int:
        """kvmclock's current value (ns), KVM_GET_CLOCK."""
        data = ffi.new("struct kvm_clock_data *")
        ioctl_struct(self.fd, lib.KVM_GET_CLOCK, data, "KVM_GET_CLOCK")
        return data.clock

    def set_clock(self, clock: int) -> None:
        data = ffi.new("struct kvm_clock_data *", {"clock": clock})
        ioctl_struct(self.fd, lib.KVM_SET_CLOCK, data, "KVM_SET_CLOCK")

    def create_vcpu(self, index: int) -> int:
        return ioctl_int(self.fd, lib.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU({index})")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

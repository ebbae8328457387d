"""The guest map: every guest-physical address, I/O port and IRQ pyvmm uses.

One place for the whole x86 microVM, as Firecracker's arch/x86_64/layout.rs
(whose addresses these are, so its documentation and ours agree).

Guest-physical memory:

    0x0000_0500  GDT                         0x0000_6000  PVH hvm_start_info, modlist, memmap
    0x0000_7000  zero page (boot_params)     0x0000_8ff0  boot stack (grows down)
    0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD: identity map of the first 1 GiB
    0x0002_0000  kernel command line         0x0009_fc00  EBDA: MP floating pointer + table
    0x0010_0000  the kernel (1 MiB)          initrd: as high in low RAM as the kernel allows
    (a bzImage decompressed on the host: its vmlinux at its own p_paddr, 16 MiB for Linux)
    RAM up to 3 GiB, then the 32-bit MMIO gap, then the rest of RAM from 4 GiB:
    0xd000_0000  virtio-mmio windows, 4 KiB each, one IRQ each (VIRTIO_IRQS)
    0xfec0_0000  IOAPIC                      0xfee0_0000  LAPIC
    0xfffb_c000  KVM identity-map page       0xfffb_d000  KVM real-mode TSS (3 pages)

I/O ports and ISA IRQs:

    0x060, 0x064  i8042 (keyboard), IRQ 1    0x3f8-0x3ff  COM1 8250 UART, IRQ 4
    IRQ 0 PIT, 2 cascade, 8 RTC: KVM's; virtio devices take 5, 6, 7 and 9-23.
"""
from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB

# -- RAM and the MMIO gap ---------------------------------------------------------
# RAM runs from 0 up to the 32-bit MMIO gap and continues above 4 GiB (the
# Firecracker / QEMU microvm convention).
MMIO_GAP_START = 3 * GiB
MMIO_GAP_END = 4 * GiB

# -- boot tables in low memory (the boot protocol and PVH) ------------------------
GDT_START = 0x500
PVH_INFO_START = 0x6000
PVH_MODLIST_START = 0x6040
PVH_MEMMAP_START = 0x6100
PVH_MEMMAP_MAX_ENTRIES = 64
ZERO_PAGE_START = 0x7000
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000
IDENTITY_MAP_END = 1 * GiB        # what those boot page tables map (2 MiB pages)
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000           # up to 64 KiB; the kernel's own limit is checked too
EBDA_START = 0x9FC00                 # the MP table lives here, where Linux scans for it
HIMEM_START = 0x100000               # 1 MiB: the protected-mode kernel

# -- the MMIO gap -----------------------------------------------------------------
# virtio-mmio windows (virtio 1.2, 4.2): announced to Linux as
# virtio_mmio.device=4K@ADDR:IRQ.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_WINDOW = 0x1000
# The ISA lines nothing else uses (0 timer, 1 keyboard, 2 cascade, 3/4 serial, 8 RTC).
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23)
MAX_VIRTIO_DEVICES = len(VIRTIO_IRQS)
IOAPIC_ADDR = 0xFEC0_0000
APIC_ADDR = 0xFEE0_0000
# Intel VMX needs three pages for its real-mode TSS and one for an identity
# page table, somewhere outside RAM and MMIO (KVM api.rst 4.48 and 4.43): just
# under the BIOS area at 4 GiB, as Firecracker and QEMU put them.
KVM_IDENTITY_MAP_ADDRESS = 0xFFFB_C000
KVM_TSS_ADDRESS = 0xFFFB_D000

# -- legacy devices: I/O ports and ISA IRQs ----------------------------------------
COM1_PORT = 0x3F8                    # the 8250 UART's 8 registers
COM1_IRQ = 4
I8042_DATA_PORT = 0x60               # 0x60..0x64 (0x61 is the PIT's, handled in KVM)
I8042_COMMAND_PORT = 0x64
KEYBOARD_IRQ = 1


def virtio_window(index: int) -> tuple[int, int]:
    """(MMIO base, IRQ) of the index-th virtio device."""
    if not 0 <= index < MAX_VIRTIO_DEVICES:
        raise ValueError(f"virtio device index {index} is out of range: at most "
                         f"{MAX_VIRTIO_DEVICES} devices")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_WINDOW, VIRTIO_IRQS[index]

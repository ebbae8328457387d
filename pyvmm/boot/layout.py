"""Where the x86 boot path puts things in guest RAM (low memory map).

    0x0500  GDT                      0x6000  PVH hvm_start_info, modlist, memmap
    0x7000  zero page (boot_params)  0x8ff0  boot stack (grows down)
    0x9000  PML4, 0xa000 PDPT, 0xb000 PD: identity map of the first 1 GiB
    0x20000 kernel command line      0x9fc00 EBDA: MP floating pointer + table
    0x100000 (1 MiB) kernel          initrd: as high as the kernel allows
These are Firecracker's choices (arch/x86_64/layout.rs), kept so that its
documentation and ours agree.
"""
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
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000           # up to 64 KiB; the kernel's own limit is checked too
EBDA_START = 0x9FC00                 # the MP table lives here, where Linux scans for it
HIMEM_START = 0x100000               # 1 MiB: the protected-mode kernel
IOAPIC_ADDR = 0xFEC00000
APIC_ADDR = 0xFEE00000

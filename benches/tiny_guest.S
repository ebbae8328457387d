/* The start-up and memory benchmarks' guest: a PVH entry that writes "X\n" to
 * COM1 at once, then halts with interrupts off (an idle vCPU).  Built by
 * benches/vmms.py:tiny_pvh_guest() into a ~200-byte ELF that pyvmm
 * (--kernel) and QEMU -M microvm (-kernel) both boot through PVH. */
    .section .note.pvh, "a", @note
    .p2align 2
    .long 4, 4, 18              /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .long _start
    .text
    .code32
    .globl _start
_start:                         /* 32-bit protected mode, paging off */
    mov $0x3f8, %dx
    mov $'X', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
1:  cli
    hlt
    jmp 1b

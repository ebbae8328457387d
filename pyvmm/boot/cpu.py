"""vCPU state at kernel entry: CPUID, MSRs, LAPIC, FPU, segments, paging.

Two entry states:
- bzImage, 64-bit boot protocol: long mode, identity-mapped first 1 GiB,
  __BOOT_CS = 0x10 and __BOOT_DS = 0x18 (boot.rst "64-bit BOOT PROTOCOL");
- PVH: 32-bit flat protected mode, paging off (Xen's hvm start_info ABI).
Only the boot vCPU gets an entry state; the others wait for INIT/SIPI in the
in-kernel LAPIC, as on real hardware.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyvmm import pvm
from pyvmm.boot.errors import BootError
from pyvmm.layout import (BOOT_STACK_POINTER, GDT_START, PDE_START, PDPTE_START,
                               PML4_START, PVH_INFO_START, ZERO_PAGE_START)
from pyvmm.kvm import Kvm, KvmError, VcpuFd, ffi
from pyvmm.memory import GuestMemory

# Segment descriptors (Intel SDM vol. 3, 3.4.5), as Firecracker's gdt.rs builds them.
GDT_CODE64 = 0x00AF9B000000FFFF
GDT_CODE32 = 0x00CF9B000000FFFF
GDT_DATA = 0x00CF93000000FFFF
GDT_TSS = 0x00808B000000FFFF
BOOT_CS, BOOT_DS, BOOT_TSS = 0x10, 0x18, 0x20     # boot.rst: __BOOT_CS, __BOOT_DS
PVH_CS, PVH_DS, PVH_TSS = 0x08, 0x10, 0x18

CR0_PE, CR0_ET, CR0_PG = 1, 1 << 4, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
PTE_PRESENT_RW = 0x3
PDE_HUGE = 0x83                       # present, writable, 2 MiB page
RFLAGS_RESERVED = 0x2
FCW_DEFAULT = 0x37F                   # x87 state after FINIT
MXCSR_DEFAULT = 0x1F80                # all SSE exceptions masked

# MSRs (SDM vol. 4) set at boot, Firecracker's list: zeroed syscall MSRs and
# TSC, fast strings on, and write-back as the default memory type.
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE, MTRR_TYPE_WB = 1 << 11, 6
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
    MSR_IA32_TSC: 0, MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WB,
}

# LAPIC local vector table (SDM vol. 3, 10.5.1): LINT0 takes the PIC's ExtINT,
# LINT1 is wired to NMI, as on a PC.
APIC_LVT0, APIC_LVT1 = 0x350, 0x360
APIC_MODE_NMI, APIC_MODE_EXTINT = 0x4, 0x7

# CPUID bits (SDM vol. 2A, CPUID).
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_HTT = 1 << 28


@dataclass(frozen=True)
class EntryState:
    """Where and how the boot vCPU starts."""
    rip: int
    pvh: bool


def build_cpuid(supported: list[dict[str, int]], index: int, num_cpus: int,
                hide_pvm_features: bool) -> list[dict[str, int]]:
    """KVM's supported CPUID, with this vCPU's APIC ID and the topology filled in."""
    entries = []
    for src in supported:
        e = dict(src)
        fn = e["function"]
        if fn == 1:
            e["ebx"] = (e["ebx"] & 0x0000FFFF) | (index << 24) | (num_cpus << 16)
            e["ecx"] |= CPUID_1_ECX_HYPERVISOR
            e["edx"] = e["edx"] | CPUID_1_EDX_HTT if num_cpus > 1 else e["edx"] & ~CPUID_1_EDX_HTT
        elif fn == 4:
            e["eax"] = (e["eax"] & 0x03FFFFFF) | ((num_cpus - 1) << 26)
        elif fn in (0xB, 0x1F):
            e["edx"] = index                           # x2APIC ID
        if hide_pvm_features:
            pvm.hide_cpuid(e)
        entries.append(e)
    return entries


def setup_lapic(vcpu: VcpuFd) -> None:
    lapic = vcpu.get_lapic()
    regs = ffi.buffer(lapic.regs)
    for offset, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = int.from_bytes(regs[offset:offset + 4], "little")
        value = (value & ~0x700) | (mode << 8)         # bits 8-10: delivery mode
        regs[offset:offset + 4] = value.to_bytes(4, "little")
    vcpu.set_lapic(lapic)


def setup_msrs(vcpu: VcpuFd) -> None:
    try:
        vcpu.set_msrs(BOOT_MSRS)
    except KvmError as exc:
        raise BootError(f"the host KVM refused a boot MSR: {exc}") from None


def setup_fpu(vcpu: VcpuFd) -> None:
    fpu = vcpu.get_fpu()
    fpu.fcw = FCW_DEFAULT
    fpu.mxcsr = MXCSR_DEFAULT
    vcpu.set_fpu(fpu)


def write_identity_page_tables(memory: GuestMemory) -> None:
    """PML4 -> PDPT -> PD of 2 MiB pages covering the first 1 GiB."""
    memory.write_int(PML4_START, 8, PDPTE_START | PTE_PRESENT_RW)
    memory.write_int(PDPTE_START, 8, PDE_START | PTE_PRESENT_RW)
    memory.write(PDE_START, b"".join(((i << 21) | PDE_HUGE).to_bytes(8, "little")
                                     for i in range(512)))


def _segment(seg, selector: int, descriptor: int) -> None:
    """Fill a kvm_segment from a GDT descriptor, the way the CPU would load it."""
    seg.selector = selector
    seg.base = ((descriptor >> 16) & 0xFFFFFF) | (((descriptor >> 56) & 0xFF) << 24)
    limit = (descriptor & 0xFFFF) | (((descriptor >> 48) & 0xF) << 16)
    seg.g = (descriptor >> 55) & 1
    seg.limit = (limit << 12) | 0xFFF if seg.g else limit
    seg.type = (descriptor >> 40) & 0xF
    seg.s = (descriptor >> 44) & 1
    seg.dpl = (descriptor >> 45) & 3
    seg.present = (descriptor >> 47) & 1
    seg.avl = (descriptor >> 52) & 1
    seg.l = (descriptor >> 53) & 1
    seg.db = (descriptor >> 54) & 1
    seg.unusable = 0


def setup_boot_vcpu(vcpu: VcpuFd, memory: GuestMemory, entry: EntryState) -> None:
    sregs = vcpu.get_sregs()
    if entry.pvh:
        gdt = [0, GDT_CODE32, GDT_DATA, GDT_TSS]
        cs, ds, tss = PVH_CS, PVH_DS, PVH_TSS
        sregs.cr0 = CR0_PE | CR0_ET
        sregs.cr4 = 0
        sregs.efer = 0
    else:
        gdt = [0, 0, GDT_CODE64, GDT_DATA, GDT_TSS]
        cs, ds, tss = BOOT_CS, BOOT_DS, BOOT_TSS
        write_identity_page_tables(memory)
        sregs.cr3 = PML4_START
        sregs.cr4 = CR4_PAE
        sregs.cr0 = CR0_PE | CR0_ET | CR0_PG
        sregs.efer = EFER_LME | EFER_LMA
    memory.write(GDT_START, b"".join(d.to_bytes(8, "little") for d in gdt))
    sregs.gdt.base, sregs.gdt.limit = GDT_START, 8 * len(gdt) - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    _segment(sregs.cs, cs, gdt[cs // 8])
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, ds, gdt[ds // 8])
    _segment(sregs.tr, tss, gdt[tss // 8])
    vcpu.set_sregs(sregs)
    if entry.pvh:
        vcpu.set_regs(rip=entry.rip, rbx=PVH_INFO_START, rflags=RFLAGS_RESERVED, rsp=0, rsi=0)
    else:
        vcpu.set_regs(rip=entry.rip, rsi=ZERO_PAGE_START, rsp=BOOT_STACK_POINTER,
                      rbp=BOOT_STACK_POINTER, rflags=RFLAGS_RESERVED)


def setup_vcpus(kvm: Kvm, vcpus: list[VcpuFd], memory: GuestMemory, entry: EntryState,
                hide_pvm_features: bool) -> None:
    supported = kvm.supported_cpuid()
    for vcpu in vcpus:
        vcpu.set_cpuid(build_cpuid(supported, vcpu.index, len(vcpus), hide_pvm_features))
        setup_msrs(vcpu)
        setup_fpu(vcpu)
        setup_lapic(vcpu)
    setup_boot_vcpu(vcpus[0], memory, entry)

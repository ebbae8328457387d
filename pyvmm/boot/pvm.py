"""Running Linux on KVM PVM hosts (no VT-x/AMD-V; guest ring 0 is emulated).

Measured on such hosts (issue 3):
- KVM's emulator fails on a few ring-0 instructions: lock cmpxchg16b, xsave/
  xrstor, popcnt, ldmxcsr, int3, fwait.  KVM_SET_CPUID2 only partly reaches
  the guest there (ring 0 still sees POPCNT and XSAVE; ring 3 sees the host's
  CPUID), so the features go away through the kernel command line instead.
- What remains is resolved in userspace by an exit hook: int3 becomes an
  injected #BP (the kernel's int3 self-test, text patching), fwait is skipped
  (a no-op with no x87 exception pending).
On hardware KVM none of this applies and nothing here is used.
"""
from __future__ import annotations

from collections import Counter

from pyvmm.kvm import Outcome, OutcomeKind, VcpuFd
from pyvmm.memory import GuestMemory, GuestMemoryError

# Kernel parameters that keep the guest off the instructions PVM cannot emulate.
PVM_CMDLINE = ("noxsave nofsgsbase noinvpcid nopcid "
               "clearcpuid=cx16,popcnt,rdrand,rdseed,smap,rdpid")

INT3, FWAIT = 0xCC, 0x9B
BP_VECTOR = 3                         # #BP
CR0_PG = 1 << 31
CR4_PAE, CR4_LA57 = 1 << 5, 1 << 12
EFER_LMA = 1 << 10
PTE_PRESENT, PTE_PS = 1, 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000


def translate(memory: GuestMemory, cr0: int, cr3: int, cr4: int, efer: int,
              vaddr: int) -> int:
    """Guest-virtual to guest-physical for 4-level long-mode paging (or no paging)."""
    if not cr0 & CR0_PG:
        return vaddr & 0xFFFFFFFF
    if not efer & EFER_LMA or cr4 & CR4_LA57:
        raise GuestMemoryError("only 4-level long-mode paging is walked")
    table = cr3 & ADDR_MASK
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = memory.read_int(table + ((vaddr >> shift) & 0x1FF) * 8, 8)
        if not entry & PTE_PRESENT:
            raise GuestMemoryError(f"{vaddr:#x} is not mapped")
        if level in (1, 2) and entry & PTE_PS:           # 1 GiB or 2 MiB page
            return (entry & ADDR_MASK & ~((1 << shift) - 1)) | (vaddr & ((1 << shift) - 1))
        table = entry & ADDR_MASK
    return table | (vaddr & 0xFFF)


class PvmFixups:
    """An exit hook (Machine.exit_hooks) that resolves PVM emulation failures."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.counts: Counter[str] = Counter()

    def instruction_bytes(self, vcpu: VcpuFd, rip: int, length: int = 16) -> bytes:
        s = vcpu.get_sregs()
        paddr = translate(self.memory, s.cr0, s.cr3, s.cr4, s.efer, rip)
        length = min(length, 0x1000 - (paddr & 0xFFF))  # stay within the page
        return self.memory.read(paddr, length)

    def __call__(self, vcpu: VcpuFd, outcome: Outcome) -> bool:
        if outcome.kind != OutcomeKind.INTERNAL_ERROR:
            return False
        rip = outcome.regs.get("rip", 0)
        try:
            opcode = self.instruction_bytes(vcpu, rip, 1)[0]
        except GuestMemoryError:
            return False
        if opcode == INT3:
            # int3 is a trap: #BP is delivered with RIP after the instruction.
            vcpu.set_regs(rip=rip + 1)
            vcpu.inject_exception(BP_VECTOR)
            self.counts["int3"] += 1
            return True
        if opcode == FWAIT:
            vcpu.set_regs(rip=rip + 1)
            self.counts["fwait"] += 1
            return True
        return False

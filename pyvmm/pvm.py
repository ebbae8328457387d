"""KVM PVM: what pyvmm does differently on hosts without VT-x/AMD-V.

Some hosts (cloud sandboxes without nested virtualization, and our own CI)
have KVM PVM, a software "pvm" module: guest ring 3 runs natively, guest
ring 0 is emulated by KVM's instruction emulator at about 1 us per
instruction.  Everything pyvmm knows about it lives here:

- Detection: the module registers /sys/module/kvm_pvm (is_pvm_host).
- KVM's emulator fails on a few ring-0 instructions (lock cmpxchg16b, xsave/
  xrstor, popcnt, ldmxcsr, rdrand, ...).  KVM_SET_CPUID2 only partly reaches
  the guest there (ring 0 still sees POPCNT and XSAVE; ring 3 sees the host's
  CPUID), so the features go away twice: kernel parameters (KERNEL_PARAMS)
  and hidden CPUID bits (HIDDEN_CPUID).
- A VMCALL/VMMCALL never returns, so the KVM paravirt features that work by
  hypercall (PV IPIs, PV spinlock kicks, PV yield) are hidden too: with PV IPIs
  an SMP Linux hangs at its first cross-CPU call.
- What still fails is resolved in userspace by an exit hook (PvmFixups): int3
  becomes an injected #BP (the kernel's int3 self-test, text patching), fwait
  is skipped (a no-op with no x87 exception pending).
- A 64-bit SYSCALL from guest user mode does not reach ring 0: a kernel
  without firmware/kernel/patches/0001-pvm-syscall-fixup.patch boots to /init,
  whose first system call then kills it (DEAD_INIT_HINT explains that).
- Guest ring 3 runs with IOPL 0 whatever RFLAGS says: ring-3 in/out fault.
- Guest ring 3 sees the host's AVX while the guest kernel (noxsave) does not switch
  its state: glibc is told not to use it (GLIBC_NO_AVX).

On hardware KVM none of this applies and nothing here is used.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm.errors import PyvmmError

if TYPE_CHECKING:
    from pyvmm.kvm import Outcome, VcpuFd
    from pyvmm.memory import GuestMemory

# The kvm_pvm module registers this directory.
PVM_MODULE_PATH = Path("/sys/module/kvm_pvm")

# glibc in guest user mode must not use AVX: ring 3 sees the host's CPUID and XCR0, so
# glibc picks its AVX2/EVEX string routines, but the guest kernel (booted with noxsave)
# saves only x87 and xmm0-15 on a task switch.  A process switched out inside memcpy
# came back with another's ymm/zmm registers: its TLS block got garbage and it
# segfaulted at its first TLS read (~1 in 10 execs with other processes busy; 0 in 25
# with this, scripts/pvm_tls_repro.py).  The kernel hands an unknown NAME=value
# parameter to init as environment, so every process inherits it (the guest agent
# passes it on to its commands).  Code that picks AVX by itself is not covered.
GLIBC_NO_AVX = ("GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,"
                "-AVX512DQ,-AVX512CD,-FMA,-FMA4,-AVX_Fast_Unaligned_Load")
# Kernel parameters that keep the guest off the instructions PVM cannot emulate.
KERNEL_PARAMS = ("noxsave nofsgsbase noinvpcid nopcid "
                 "clearcpuid=cx16,popcnt,rdrand,rdseed,smap,rdpid " + GLIBC_NO_AVX)

# KVM's paravirt leaf (Documentation/virt/kvm/x86/cpuid.rst).
KVM_CPUID_FEATURES = 0x40000001
KVM_FEATURE_PV_UNHALT = 1 << 7        # spinlock kick: KVM_HC_KICK_CPU
KVM_FEATURE_PV_SEND_IPI = 1 << 11     # KVM_HC_SEND_IPI
KVM_FEATURE_PV_SCHED_YIELD = 1 << 13  # KVM_HC_SCHED_YIELD
# CPUID bits hidden from the guest on PVM, by (leaf, register).
HIDDEN_CPUID = {
    (1, "ecx"): (1 << 13) | (1 << 23) | (1 << 26) | (1 << 27) | (1 << 30) | (1 << 17),
    # CX16, POPCNT, XSAVE, OSXSAVE, RDRAND, PCID
    (7, "ebx"): (1 << 0) | (1 << 10) | (1 << 18) | (1 << 20),
    # FSGSBASE, INVPCID, RDSEED, SMAP
    (7, "ecx"): (1 << 22),             # RDPID
    # The hypercall-based paravirt features: Linux falls back to APIC IPIs,
    # native spinlocks and plain yields.
    (KVM_CPUID_FEATURES, "eax"): KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI
    | KVM_FEATURE_PV_SCHED_YIELD,
}

# Said once at start-up (pyvmm run), so a slow boot is not a surprise.
STARTUP_NOTICE = ("pyvmm: KVM PVM host: adding kernel parameters to avoid instructions it "
                  "cannot emulate, and fixing up int3/fwait")
# Appended to "the guest kernel panicked" when init died on a PVM host.
INIT_DIED_MARKER = b"Attempted to kill init"
DEAD_INIT_HINT = ("; on KVM PVM hosts a 64-bit SYSCALL from guest user mode does not reach "
                  "the guest kernel, so init dies at its first system call unless the kernel "
                  "carries firmware/kernel/patches/0001-pvm-syscall-fixup.patch (the built-in "
                  "guest does)")


def is_pvm_host() -> bool:
    """True on KVM PVM: guest ring 0 is emulated and a few instructions fail."""
    return PVM_MODULE_PATH.exists()


def hide_cpuid(entry: dict[str, int]) -> None:
    """Clear the HIDDEN_CPUID bits of one CPUID entry (in place)."""
    for reg in ("eax", "ebx", "ecx", "edx"):
        entry[reg] &= ~HIDDEN_CPUID.get((entry["function"], reg), 0)


def panic_hint(console_history: bytes) -> str:
    """What to add to "the guest kernel panicked" on a PVM host."""
    return DEAD_INIT_HINT if INIT_DIED_MARKER in console_history else ""


INT3, FWAIT = 0xCC, 0x9B
BP_VECTOR = 3                         # #BP
CR0_PG = 1 << 31
CR4_PAE, CR4_LA57 = 1 << 5, 1 << 12
EFER_LMA = 1 << 10
PTE_PRESENT, PTE_PS = 1, 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000


def translate(memory: "GuestMemory", cr0: int, cr3: int, cr4: int, efer: int,
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
            from pyvmm.memory import GuestMemoryError
            raise GuestMemoryError(f"{vaddr:#x} is not mapped")
        if level in (1, 2) and entry & PTE_PS:           # 1 GiB or 2 MiB page
            return (entry & ADDR_MASK & ~((1 << shift) - 1)) | (vaddr & ((1 << shift) - 1))
        table = entry & ADDR_MASK
    return table | (vaddr & 0xFFF)


class PvmFixups:
    """An exit hook (Machine.exit_hooks) that resolves PVM emulation failures."""

    def __init__(self, memory: "GuestMemory") -> None:
        self.memory = memory
        self.counts: Counter[str] = Counter()

    def instruction_bytes(self, vcpu: "VcpuFd", rip: int, length: int = 16) -> bytes:
        s = vcpu.get_sregs()
        paddr = translate(self.memory, s.cr0, s.cr3, s.cr4, s.efer, rip)
        length = min(length, 0x1000 - (paddr & 0xFFF))  # stay within the page
        return self.memory.read(paddr, length)

    def explain(self, vcpu: "VcpuFd", outcome: "Outcome") -> str:
        """A KVM internal error on PVM, with the instruction bytes it failed on."""
        try:
            insn = self.instruction_bytes(vcpu, outcome.regs.get("rip", 0)).hex(" ")
        except PyvmmError:
            insn = "unreadable"
        return f"{outcome.describe()}; instruction bytes: {insn} (KVM PVM could not emulate it)"

    def __call__(self, vcpu: "VcpuFd", outcome: "Outcome") -> bool:
        from pyvmm.kvm import OutcomeKind
        from pyvmm.memory import GuestMemoryError
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

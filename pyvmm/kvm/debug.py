"""KVM's guest-debug ioctls: KVM_SET_GUEST_DEBUG, KVM_TRANSLATE, debug registers, FPU.

The gdb stub (pyvmm.gdb) and the tiny-guest test bed (pyvmm.testbed) build on
these; the structures and ioctl numbers are kvm_abi.cdef's (<linux/kvm.h>).

Debug-register encodings are the Intel SDM's, vol. 3, 18.2 (DR6, DR7).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from pyvmm.kvm.ioctl import ffi, ioctl_struct, lib
from pyvmm.kvm.vcpu import VcpuFd


KVM_SET_GUEST_DEBUG = lib.KVM_SET_GUEST_DEBUG
KVM_TRANSLATE = lib.KVM_TRANSLATE
KVM_CAP_SET_GUEST_DEBUG2 = lib.KVM_CAP_SET_GUEST_DEBUG2


class GuestDebug(enum.IntFlag):
    """KVM_GUESTDBG_* (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h)."""
    ENABLE = 0x1
    SINGLESTEP = 0x2
    USE_SW_BP = 0x10000
    USE_HW_BP = 0x20000
    INJECT_DB = 0x40000
    INJECT_BP = 0x80000
    BLOCKIRQ = 0x100000      # no interrupt injection while single-stepping (Linux 5.16)


# DR7 (SDM 18.2.4): per slot n an enable bit L<n> at 2n, R/W<n> at 16+4n, LEN<n> at 18+4n.
DR7_FIXED = 0x400            # bit 10 reads as 1
DR7_GE = 1 << 9              # "exact" data breakpoints (what QEMU and Linux set)
DR7_RW_EXEC, DR7_RW_WRITE, DR7_RW_ACCESS = 0b00, 0b01, 0b11
DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
# DR6 (SDM 18.2.3): B0-B3 say which slot matched, BS a single step.
DR6_B_MASK = 0xF
DR6_BS = 1 << 14
HW_SLOTS = 4
# Exception vectors in kvm_debug_exit_arch.exception.
DB_VECTOR, BP_VECTOR = 1, 3


@dataclass(frozen=True)
class HwSlot:
    """One debug-register slot: what DR<n> and its DR7 bits say."""
    addr: int
    rw: int = DR7_RW_EXEC
    length: int = 1

    def dr7_bits(self, n: int) -> int:
        # An execution breakpoint must have LEN 00 (SDM 18.2.5).
        length = 0 if self.rw == DR7_RW_EXEC else DR7_LEN[self.length]
        return (1 << (2 * n)) | (self.rw << (16 + 4 * n)) | (length << (18 + 4 * n))


def dr7_for(slots: list[HwSlot | None]) -> int:
    value = DR7_FIXED
    for n, slot in enumerate(slots):
        if slot is not None:
            value |= slot.dr7_bits(n)
            if slot.rw != DR7_RW_EXEC:
                value |= DR7_GE
    return value


def set_guest_debug(vcpu: VcpuFd, control: int, slots: list[HwSlot | None] | None = None) -> None:
    """KVM_SET_GUEST_DEBUG on a vCPU that is not inside KVM_RUN (the ioctl would wait for
    it).  control 0 turns guest debugging off; slots fill DR0-3 and DR7 with USE_HW_BP."""
    debug = ffi.new("struct kvm_guest_debug *")
    debug.control = control
    if slots:
        for n, slot in enumerate(slots[:HW_SLOTS]):
            if slot is not None:
                debug.arch.debugreg[n] = slot.addr
        debug.arch.debugreg[7] = dr7_for(slots)
    ioctl_struct(vcpu.fd, KVM_SET_GUEST_DEBUG, debug, "KVM_SET_GUEST_DEBUG")


@dataclass(frozen=True)
class Translation:
    physical: int
    writeable: bool
    usermode: bool


def translate(vcpu: VcpuFd, vaddr: int) -> Translation | None:
    """Guest-virtual to guest-physical through the vCPU's current page tables
    (KVM_TRANSLATE); None if not mapped."""
    tr = ffi.new("struct kvm_translation *")
    tr.linear_address = vaddr & (2**64 - 1)
    ioctl_struct(vcpu.fd, KVM_TRANSLATE, tr, "KVM_TRANSLATE")
    if not tr.valid:
        return None
    return Translation(tr.physical_address, bool(tr.writeable), bool(tr.usermode))


def supported_guest_debug(kvm_fd: int) -> int:
    """KVM_CAP_SET_GUEST_DEBUG2: the control bits this KVM accepts (0: unknown, old KVM)."""
    rc = lib.pv_ioctl_ulong(kvm_fd, lib.KVM_CHECK_EXTENSION, KVM_CAP_SET_GUEST_DEBUG2)
    return rc if rc > 0 else 0


def get_debugregs(vcpu: VcpuFd) -> dict[str, int]:
    """The guest's own debug registers (KVM_GET_DEBUGREGS), for `monitor` output."""
    regs = ffi.new("struct kvm_debugregs *")
    ioctl_struct(vcpu.fd, lib.KVM_GET_DEBUGREGS, regs, "KVM_GET_DEBUGREGS")
    return {"dr0": regs.db[0], "dr1": regs.db[1], "dr2": regs.db[2], "dr3": regs.db[3],
            "dr6": regs.dr6, "dr7": regs.dr7}

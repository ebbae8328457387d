"""KVM's guest-debug ioctls: KVM_SET_GUEST_DEBUG, KVM_TRANSLATE, debug registers, FPU.

The gdb stub (pyvmm.gdb) and the tiny-guest test bed (pyvmm.testbed) build on
these.  The structures and ioctl numbers come from pyvmm._native once it is
rebuilt with the declarations in kvm_abi.cdef; an extension built before they
were added gets the same layouts from here (x86-64 <linux/kvm.h>, checked
against the extension in tests/test_gdb_protocol.py when both exist).

Debug-register encodings are the Intel SDM's, vol. 3, 18.2 (DR6, DR7).
"""
from __future__ import annotations

import enum
import fcntl
import struct
from dataclasses import dataclass

from pyvmm.kvm.ioctl import KvmError, ffi, lib
from pyvmm.kvm.vcpu import VcpuFd


def _iow(nr: int, size: int, read: bool = False) -> int:
    """asm-generic/ioctl.h: _IOW / _IOWR with KVMIO (0xAE)."""
    direction = 3 if read else 1
    return (direction << 30) | (size << 16) | (0xAE << 8) | nr


# struct kvm_guest_debug: u32 control, u32 pad, u64 debugreg[8]
GUEST_DEBUG_FORMAT = "<II8Q"
# struct kvm_translation: u64 linear, u64 physical, u8 valid, writeable, usermode, pad[5]
TRANSLATION_FORMAT = "<QQBBB5x"
KVM_SET_GUEST_DEBUG = getattr(lib, "KVM_SET_GUEST_DEBUG", None) or \
    _iow(0x9B, struct.calcsize(GUEST_DEBUG_FORMAT))
KVM_TRANSLATE = getattr(lib, "KVM_TRANSLATE", None) or \
    _iow(0x85, struct.calcsize(TRANSLATION_FORMAT), read=True)
KVM_CAP_SET_GUEST_DEBUG2 = getattr(lib, "KVM_CAP_SET_GUEST_DEBUG2", 195)


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
    regs = [0] * 8
    if slots:
        for n, slot in enumerate(slots[:HW_SLOTS]):
            if slot is not None:
                regs[n] = slot.addr
        regs[7] = dr7_for(slots)
    buf = bytearray(struct.pack(GUEST_DEBUG_FORMAT, control, 0, *regs))
    try:
        fcntl.ioctl(vcpu.fd, KVM_SET_GUEST_DEBUG, buf, True)
    except OSError as exc:
        raise KvmError("KVM_SET_GUEST_DEBUG", exc.errno) from None


@dataclass(frozen=True)
class Translation:
    physical: int
    writeable: bool
    usermode: bool


def translate(vcpu: VcpuFd, vaddr: int) -> Translation | None:
    """Guest-virtual to guest-physical through the vCPU's current page tables
    (KVM_TRANSLATE); None if not mapped."""
    buf = bytearray(struct.pack(TRANSLATION_FORMAT, vaddr & (2**64 - 1), 0, 0, 0, 0))
    try:
        fcntl.ioctl(vcpu.fd, KVM_TRANSLATE, buf, True)
    except OSError as exc:
        raise KvmError("KVM_TRANSLATE", exc.errno) from None
    _, physical, valid, writeable, usermode = struct.unpack(TRANSLATION_FORMAT, buf)
    if not valid:
        return None
    return Translation(physical, bool(writeable), bool(usermode))


def supported_guest_debug(kvm_fd: int) -> int:
    """KVM_CAP_SET_GUEST_DEBUG2: the control bits this KVM accepts (0: unknown, old KVM)."""
    rc = lib.pv_ioctl_ulong(kvm_fd, lib.KVM_CHECK_EXTENSION, KVM_CAP_SET_GUEST_DEBUG2)
    return rc if rc > 0 else 0


def get_debugregs(vcpu: VcpuFd) -> dict[str, int]:
    """The guest's own debug registers (KVM_GET_DEBUGREGS), for `monitor` output."""
    regs = ffi.new("struct kvm_debugregs *")
    try:
        fcntl.ioctl(vcpu.fd, lib.KVM_GET_DEBUGREGS, ffi.buffer(regs), True)
    except OSError as exc:
        raise KvmError("KVM_GET_DEBUGREGS", exc.errno) from None
    return {"dr0": regs.db[0], "dr1": regs.db[1], "dr2": regs.db[2], "dr3": regs.db[3],
            "dr6": regs.dr6, "dr7": regs.dr7}

"""Everything KVM holds for a VM and its vCPUs, saved to and restored from plain dicts.

Snapshots (pyvmm.snapshot) write these dicts into the state file.  KVM's
structures are saved as their raw bytes (base64 in the dict): the layout is
the kernel ABI, checked against <linux/kvm.h> when pyvmm is built, so a
restore checks each blob's length and hands it back unchanged.  MSRs are
saved by index, and only those KVM_GET_MSR_INDEX_LIST names (on KVM PVM its
own MSRs outside that list are not saved: some are read-only even for the
value they already hold).

Restore order matters (api.rst, and what Firecracker's vstate does):
- per VM, before any vCPU: PIT, kvmclock, PIC master and slave, IOAPIC;
- per vCPU: TSC frequency, CPUID (KVM_SET_XCRS before KVM_SET_CPUID2 is
  EINVAL), MP state, regs, sregs, XSAVE, XCRs, debug registers, LAPIC, MSRs
  (MSR_IA32_TSC_DEADLINE written before KVM_SET_LAPIC is silently lost),
  vCPU events last (they may hold an exception to inject on entry).
"""
from __future__ import annotations

import time
from typing import Any

from pyvmm.devices.virtio.state import U32_MAX, U64_MAX, StateError, StateReader, \
    encode_bytes
from pyvmm.kvm.ioctl import KvmError, ffi, ioctl_int, ioctl_struct, lib
from pyvmm.kvm.system import CPUID_FIELDS, Kvm
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.kvm.vm import VmFd

# MSRs with a meaning at restore (Intel SDM vol. 4).
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
# LAPIC timer: LVT Timer register and its TSC-deadline mode (SDM vol. 3, 11.5.1).
APIC_LVTT = 0x320
LVTT_MODE_MASK, LVTT_MODE_TSC_DEADLINE, LVT_MASKED = 3 << 17, 2 << 17, 1 << 16
MAX_MSRS = 1024
MAX_CPUID_ENTRIES = 256
MAX_XSAVE_SIZE = 1 << 20        # KVM_CAP_XSAVE2 is ~11 KiB with AMX; a bound for bad files

# The blobs of a vCPU and of the VM: key -> (struct, GET ioctl, SET ioctl).
VCPU_BLOBS = {
    "regs": ("struct kvm_regs", "KVM_GET_REGS", "KVM_SET_REGS"),
    "sregs": ("struct kvm_sregs", "KVM_GET_SREGS", "KVM_SET_SREGS"),
    "xcrs": ("struct kvm_xcrs", "KVM_GET_XCRS", "KVM_SET_XCRS"),
    "debugregs": ("struct kvm_debugregs", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS"),
    "lapic": ("struct kvm_lapic_state", "KVM_GET_LAPIC", "KVM_SET_LAPIC"),
    "vcpu_events": ("struct kvm_vcpu_events", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS"),
    "fpu": ("struct kvm_fpu", "KVM_GET_FPU", "KVM_SET_FPU"),
}
IRQCHIPS = {"pic_master": "KVM_IRQCHIP_PIC_MASTER", "pic_slave": "KVM_IRQCHIP_PIC_SLAVE",
            "ioapic": "KVM_IRQCHIP_IOAPIC"}


def _get_blob(fd: int, key: str) -> bytes:
    ctype, get, _ = VCPU_BLOBS[key]
    value = ffi.new(f"{ctype} *")
    ioctl_struct(fd, getattr(lib, get), value, get)
    return bytes(ffi.buffer(value))


def _set_blob(fd: int, key: str, data: bytes) -> None:
    ctype, _, put = VCPU_BLOBS[key]
    value = ffi.new(f"{ctype} *")
    ffi.memmove(value, data, len(data))
    ioctl_struct(fd, getattr(lib, put), value, put)


def _blob(saved: StateReader, key: str, ctype: str) -> bytes:
    """A saved struct, exactly sizeof(ctype) bytes."""
    size = ffi.sizeof(ctype)
    data = saved.blob(key, size)
    if len(data) != size:
        raise StateError(f"the saved {saved.what}'s {key!r} is {len(data)} bytes; this "
                         f"host's {ctype} is {size}")
    return data


# -- vCPUs -------------------------------------------------------------------------------

def xsave_size(kvm: Kvm) -> int:
    """Bytes of XSAVE state: KVM_CAP_XSAVE2's answer (larger with AMX), at least 4 KiB;
    0 when the host has no XSAVE support (then the FPU is saved instead)."""
    if not kvm.check_extension("XSAVE"):
        return 0
    return max(kvm.check_extension("XSAVE2"), ffi.sizeof("struct kvm_xsave"))


def save_msrs(vcpu: VcpuFd, indices: list[int]) -> dict[int, int]:
    """Every listed MSR KVM lets us read.  KVM_GET_MSRS stops at the first one it
    cannot read: that one is skipped and the rest read on."""
    values: dict[int, int] = {}
    rest = list(indices)
    while rest:
        got = vcpu.get_msrs(rest)
        values.update(got)
        rest = rest[len(got) + 1:]
    return values


def save_vcpu(vcpu: VcpuFd, kvm: Kvm, msr_indices: list[int],
              irqchip: bool = True) -> dict[str, Any]:
    """One vCPU's whole KVM state (it must not be running); without an in-kernel
    irqchip there is no LAPIC to save."""
    fd = vcpu.fd
    state: dict[str, Any] = {"index": vcpu.index, "cpuid": vcpu.get_cpuid(MAX_CPUID_ENTRIES)}
    mp = ffi.new("struct kvm_mp_state *")
    ioctl_struct(fd, lib.KVM_GET_MP_STATE, mp, "KVM_GET_MP_STATE")
    state["mp_state"] = mp.mp_state
    for key in ("regs", "sregs", "debugregs", "vcpu_events"):
        state[key] = encode_bytes(_get_blob(fd, key))
    state["lapic"] = encode_bytes(_get_blob(fd, "lapic")) if irqchip else None
    size = xsave_size(kvm)
    if size:
        xsave = ffi.new("char[]", size)
        request = lib.KVM_GET_XSAVE2 if kvm.check_extension("XSAVE2") else lib.KVM_GET_XSAVE
        ioctl_struct(fd, request, xsave, "KVM_GET_XSAVE2")
        state["xsave"] = encode_bytes(ffi.buffer(xsave))
        state["fpu"] = None
    else:
        state["xsave"] = None
        state["fpu"] = encode_bytes(_get_blob(fd, "fpu"))
    state["xcrs"] = encode_bytes(_get_blob(fd, "xcrs")) if kvm.check_extension("XCRS") \
        else None
    state["msrs"] = [[index, value] for index, value in save_msrs(vcpu, msr_indices).items()]
    state["tsc_khz"] = _tsc_khz(vcpu)
    return state


def _tsc_khz(vcpu: VcpuFd) -> int | None:
    try:
        return ioctl_int(vcpu.fd, lib.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")
    except KvmError:
        return None


class VcpuState:
    """A saved vCPU, read and checked in full before anything is applied."""

    def __init__(self, state: object, what: str) -> None:
        saved = StateReader(state, what)
        self.what = what
        self.index = saved.number("index", U32_MAX)
        self.cpuid = [_cpuid_entry(entry, what) for entry in
                      _list(saved, "cpuid", MAX_CPUID_ENTRIES)]
        self.mp_state = saved.number("mp_state", U32_MAX)
        self.blobs = {key: _blob(saved, key, VCPU_BLOBS[key][0])
                      for key in ("regs", "sregs", "debugregs", "vcpu_events")}
        lapic = saved.record("lapic")
        self.lapic = None if lapic is None else _blob(saved, "lapic", "struct kvm_lapic_state")
        self.xsave = saved.optional_blob("xsave", MAX_XSAVE_SIZE)
        fpu = saved.record("fpu")
        self.fpu = None if fpu is None else _blob(saved, "fpu", "struct kvm_fpu")
        xcrs = saved.record("xcrs")
        self.xcrs = None if xcrs is None else _blob(saved, "xcrs", "struct kvm_xcrs")
        self.msrs: dict[int, int] = {}
        for entry in _list(saved, "msrs", MAX_MSRS):
            if type(entry) is not list or len(entry) != 2 or \
                    any(type(x) is not int or not 0 <= x <= U64_MAX for x in entry) or \
                    entry[0] > U32_MAX:
                raise StateError(f"the saved {what}'s MSRs hold a bad entry: use "
                                 "[index, value] pairs of integers")
            self.msrs[entry[0]] = entry[1]
        self.tsc_khz = saved.optional_number("tsc_khz", U32_MAX)
        if self.xsave is None and self.fpu is None:
            raise StateError(f"the saved {what} has neither XSAVE nor FPU state")

    @property
    def rip(self) -> int:
        regs = ffi.new("struct kvm_regs *")
        ffi.memmove(regs, self.blobs["regs"], len(self.blobs["regs"]))
        return regs.rip

    def restore(self, vcpu: VcpuFd, kvm: Kvm, advance_ns: int = 0,
                msr_overrides: dict[int, int] | None = None) -> None:
        """Apply it to a fresh vCPU, in the order KVM needs (the module docstring).
        advance_ns: move the TSC on by that much time too (the guest's clocksource may
        be the TSC rather than kvmclock); msr_overrides: MSR values to use instead."""
        fd = vcpu.fd
        if self.tsc_khz and kvm.check_extension("TSC_CONTROL") and \
                _tsc_khz(vcpu) != self.tsc_khz:
            ioctl_int(fd, lib.KVM_SET_TSC_KHZ, self.tsc_khz, "KVM_SET_TSC_KHZ")
        vcpu.set_cpuid(self.cpuid)
        mp = ffi.new("struct kvm_mp_state *", {"mp_state": self.mp_state})
        ioctl_struct(fd, lib.KVM_SET_MP_STATE, mp, "KVM_SET_MP_STATE")
        _set_blob(fd, "regs", self.blobs["regs"])
        _set_blob(fd, "sregs", self.blobs["sregs"])
        if self.xsave is not None:
            size = xsave_size(kvm)
            if size < len(self.xsave) or not size:
                raise StateError(f"the saved {self.what} has {len(self.xsave)} bytes of "
                                 f"XSAVE state; this host takes {size}")
            xsave = ffi.new("char[]", size)
            ffi.memmove(xsave, self.xsave, len(self.xsave))
            ioctl_struct(fd, lib.KVM_SET_XSAVE, xsave, "KVM_SET_XSAVE")
        else:
            _set_blob(fd, "fpu", self.fpu or b"")
        if self.xcrs is not None:
            _set_blob(fd, "xcrs", self.xcrs)
        _set_blob(fd, "debugregs", self.blobs["debugregs"])
        if self.lapic is not None:
            _set_blob(fd, "lapic", self.lapic)
        self._restore_msrs(vcpu, advance_ns, msr_overrides or {})
        _set_blob(fd, "vcpu_events", self.blobs["vcpu_events"])

    def _restore_msrs(self, vcpu: VcpuFd, advance_ns: int,
                      overrides: dict[int, int]) -> None:
        msrs = dict(self.msrs)
        if advance_ns > 0 and self.tsc_khz and MSR_IA32_TSC in msrs:
            # On KVM PVM the guest TSC is the host's and this write is dropped: there
            # the guest's TSC has moved on by itself.
            msrs[MSR_IA32_TSC] = min(U64_MAX, msrs[MSR_IA32_TSC] +
                                     advance_ns * self.tsc_khz // 1_000_000)
        msrs.update((index, value) for index, value in overrides.items() if index in msrs)
        if msrs.get(MSR_IA32_TSC_DEADLINE) == 0 and self._timer_in_deadline_mode():
            # KVM reads the deadline back as 0 once it has passed (the interrupt is
            # pending in the LAPIC or already delivered); written as 0 it would disarm
            # the timer and the guest would wait for a tick that never comes.  A
            # deadline in the past fires at once, and the guest programs the next one.
            msrs[MSR_IA32_TSC_DEADLINE] = max(1, msrs.get(MSR_IA32_TSC, 1))
        try:
            vcpu.set_msrs(msrs)
        except KvmError as exc:
            raise StateError(f"the host KVM refused the saved {self.what}'s MSRs "
                             f"({exc}): was the snapshot taken on another kind of host?") \
                from None

    def _timer_in_deadline_mode(self) -> bool:
        if self.lapic is None:
            return False
        lvtt = int.from_bytes(self.lapic[APIC_LVTT:APIC_LVTT + 4], "little")
        return lvtt & LVTT_MODE_MASK == LVTT_MODE_TSC_DEADLINE and not lvtt & LVT_MASKED


def _list(saved: StateReader, key: str, maximum: int) -> list:
    value = saved.record(key)
    if type(value) is not list or len(value) > maximum:
        raise StateError(f"the saved {saved.what}'s {key!r} is not a list of at most "
                         f"{maximum}")
    return value


def _cpuid_entry(entry: object, what: str) -> dict[str, int]:
    saved = StateReader(entry, f"{what}'s CPUID entry")
    return {name: saved.number(name, U32_MAX) for name in CPUID_FIELDS}


def kvmclock_ctrl(vcpu: VcpuFd) -> bool:
    """Tell the guest it was stopped (its watchdogs then ignore the gap); False until
    the guest has enabled kvmclock (EINVAL)."""
    try:
        ioctl_int(vcpu.fd, lib.KVM_KVMCLOCK_CTRL, 0, "KVM_KVMCLOCK_CTRL")
        return True
    except KvmError:
        return False        # EINVAL: no kvmclock yet; anything else: nothing to tell


# -- the VM ------------------------------------------------------------------------------

def save_vm(vm: VmFd, clock: int, realtime_ns: int) -> dict[str, Any]:
    """The in-kernel PIT, PICs and IOAPIC, and kvmclock (`clock`: its value when the
    vCPUs stopped, and the host's wall clock then, which Machine.pause() records)."""
    pit = ffi.new("struct kvm_pit_state2 *")
    ioctl_struct(vm.fd, lib.KVM_GET_PIT2, pit, "KVM_GET_PIT2")
    state: dict[str, Any] = {"pit": encode_bytes(ffi.buffer(pit)), "clock": clock,
                             "realtime_ns": realtime_ns}
    for key, chip in IRQCHIPS.items():
        irqchip = ffi.new("struct kvm_irqchip *", {"chip_id": getattr(lib, chip)})
        ioctl_struct(vm.fd, lib.KVM_GET_IRQCHIP, irqchip, f"KVM_GET_IRQCHIP({key})")
        state[key] = encode_bytes(ffi.buffer(irqchip))
    return state


class VmState:
    """A saved VM (not its vCPUs), read and checked before anything is applied."""

    def __init__(self, state: object) -> None:
        saved = StateReader(state, "VM state")
        self.pit = _blob(saved, "pit", "struct kvm_pit_state2")
        self.clock = saved.number("clock", U64_MAX)
        self.realtime_ns = saved.number("realtime_ns", U64_MAX)
        self.irqchips = {key: _blob(saved, key, "struct kvm_irqchip") for key in IRQCHIPS}
        for key, chip in IRQCHIPS.items():
            chip_id = int.from_bytes(self.irqchips[key][:4], "little")
            if chip_id != getattr(lib, chip):
                raise StateError(f"the saved VM state's {key} is chip {chip_id}, not "
                                 f"{getattr(lib, chip)}")

    def clock_now(self, clock_realtime: bool) -> int:
        """kvmclock for the restored guest: where it stopped (the default: the guest
        sees no time pass, and its wall clock is behind by the time the snapshot sat
        on disk), or, clock_realtime (Firecracker's option of that name), advanced by
        the host wall-clock time since the pause, so the guest's wall clock is right
        and its timers see that time pass (KVM_CLOCK_REALTIME's arithmetic)."""
        if not clock_realtime:
            return self.clock
        return min(U64_MAX, self.clock + max(0, time.time_ns() - self.realtime_ns))

    def restore(self, vm: VmFd, clock_realtime: bool = False) -> None:
        pit = ffi.new("struct kvm_pit_state2 *")
        ffi.memmove(pit, self.pit, len(self.pit))
        ioctl_struct(vm.fd, lib.KVM_SET_PIT2, pit, "KVM_SET_PIT2")
        vm.set_clock(self.clock_now(clock_realtime))
        for key, data in self.irqchips.items():
            irqchip = ffi.new("struct kvm_irqchip *")
            ffi.memmove(irqchip, data, len(data))
            ioctl_struct(vm.fd, lib.KVM_SET_IRQCHIP, irqchip, f"KVM_SET_IRQCHIP({key})")

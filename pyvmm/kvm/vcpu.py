"""A vCPU fd: register state, CPUID, MSRs, events, and the C run loop."""
from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from typing import Any

from pyvmm.kvm.ioctl import KvmError, ffi, ioctl_struct, lib

REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
CONTROL_REG_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


class ExitReason(enum.IntEnum):
    """KVM_EXIT_* (include/uapi/linux/kvm.h)."""
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    X86_RDMSR = 29
    X86_WRMSR = 30
    OTHER = 63      # the counter slot for every reason >= 63

    @classmethod
    def name_of(cls, value: int) -> str:
        try:
            return cls(value).name
        except ValueError:
            return f"EXIT_{value}"


# Why the C run loop handed a vCPU back to Python: each member is the PV_OUT_*
# constant of the same name in csrc/pyvmm.h.
OUTCOME_NAMES = ("HALT", "SHUTDOWN", "SYSTEM_EVENT", "INTERNAL_ERROR", "FAIL_ENTRY", "STOPPED",
                 "DEVICE_STOP", "HANDLER_ERROR", "UNHANDLED_PIO", "UNHANDLED_MMIO",
                 "UNKNOWN_EXIT", "RUN_ERROR", "DEBUG")
OutcomeKind = enum.IntEnum("OutcomeKind",
                           [(name, getattr(lib, f"PV_OUT_{name}")) for name in OUTCOME_NAMES])


class SystemEvent(enum.IntEnum):
    SHUTDOWN = lib.KVM_SYSTEM_EVENT_SHUTDOWN
    RESET = lib.KVM_SYSTEM_EVENT_RESET
    CRASH = lib.KVM_SYSTEM_EVENT_CRASH


INTERNAL_SUBERRORS = {
    lib.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
    lib.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
    lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "exit while delivering an event",
    lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
}


@dataclass(frozen=True)
class Outcome:
    """The end of one pv_vcpu_run() call, with the diagnostics to explain it."""
    kind: OutcomeKind
    vcpu: int
    exit_reason: int
    addr: int = 0
    length: int = 0
    is_write: bool = False
    data: int = 0
    device: str | None = None
    suberror: int = 0
    info: tuple[int, ...] = ()
    err: int = 0
    regs: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for a human: what happened, where, and the instruction pointer."""
        where = f" at rip={self.regs['rip']:#x}" if "rip" in self.regs else ""
        k = self.kind
        if k in (OutcomeKind.UNHANDLED_PIO, OutcomeKind.UNHANDLED_MMIO,
                 OutcomeKind.DEVICE_STOP, OutcomeKind.HANDLER_ERROR):
            op = "write" if self.is_write else "read"
            space = "port" if k == OutcomeKind.UNHANDLED_PIO or self.device_bus == "pio" else "MMIO"
            dev = f" ({self.device})" if self.device else ""
            return (f"vCPU {self.vcpu}: {k.name.lower()}: {self.length}-byte {op} of {space} "
                    f"{self.addr:#x}{dev} value={self.data:#x}{where}")
        if k == OutcomeKind.INTERNAL_ERROR:
            what = INTERNAL_SUBERRORS.get(self.suberror, f"suberror {self.suberror}")
            data = " ".join(f"{x:#x}" for x in self.info)
            return f"vCPU {self.vcpu}: KVM internal error: {what} [{data}]{where}"
        if k == OutcomeKind.SYSTEM_EVENT:
            event = SystemEvent(self.info[0]).name if self.info and self.info[0] in \
                SystemEvent._value2member_map_ else str(self.info[:1])
            return f"vCPU {self.vcpu}: system event {event}{where}"
        if k == OutcomeKind.FAIL_ENTRY:
            reason = self.info[0] if self.info else 0
            return f"vCPU {self.vcpu}: VM entry failed, hardware reason {reason:#x}{where}"
        if k == OutcomeKind.RUN_ERROR:
            return f"vCPU {self.vcpu}: KVM_RUN failed: {os.strerror(self.err)}{where}"
        if k == OutcomeKind.DEBUG and len(self.info) >= 4:
            exception, pc, dr6, dr7 = self.info[:4]
            return (f"vCPU {self.vcpu}: debug exit, exception {exception} at pc={pc:#x} "
                    f"dr6={dr6:#x} dr7={dr7:#x}")
        if k == OutcomeKind.UNKNOWN_EXIT:
            return f"vCPU {self.vcpu}: unhandled exit {ExitReason.name_of(self.exit_reason)}{where}"
        return f"vCPU {self.vcpu}: {k.name.lower()}{where}"

    @property
    def device_bus(self) -> str:
        return "pio" if self.exit_reason == ExitReason.IO else "mmio"


class VcpuFd:
    """One vCPU: its fd, its mmap'ed kvm_run (owned by C) and its exit counters."""

    def __init__(self, fd: int, index: int, run_mmap_size: int, machine_cdata: Any,
                 describe_device: Any = None) -> None:
        self.fd = fd
        self.index = index
        self._native = ffi.new("struct pv_vcpu *")
        rc = lib.pv_vcpu_init(self._native, fd, index, run_mmap_size, machine_cdata)
        if rc < 0:
            os.close(fd)
            raise KvmError("mmap of kvm_run", -rc)
        self._outcome = ffi.new("struct pv_outcome *")
        self._describe_device = describe_device or (lambda bus, index: None)

    # -- running ---------------------------------------------------------------

    def run(self, with_regs: bool = True) -> Outcome:
        """Run until the C loop needs Python; the GIL is free meanwhile."""
        lib.pv_vcpu_run(self._native, self._outcome)
        return self._make_outcome(with_regs)

    def with_regs(self, outcome: Outcome) -> Outcome:
        """The outcome with the vCPU's registers filled in (for diagnostics)."""
        if outcome.regs or outcome.kind == OutcomeKind.RUN_ERROR or self.fd < 0:
            return outcome
        try:
            return dataclasses.replace(outcome, regs=self.get_regs())
        except KvmError:
            # close() from another thread between the check above and the ioctl (a
            # vCPU thread leaving run() is not "inside" it any more): no registers then.
            if self.fd < 0:
                return outcome
            raise

    def kick(self) -> None:
        """From any thread, at any time: make run() return OutcomeKind.STOPPED soon
        (the next run() at once, if none is in progress).  A no-op after close()."""
        lib.pv_vcpu_kick(self._native)

    def clear_kick(self) -> None:
        lib.pv_vcpu_clear_kick(self._native)

    def _make_outcome(self, with_regs: bool) -> Outcome:
        o = self._outcome
        kind = OutcomeKind(o.kind)
        regs = self.get_regs() if with_regs and kind != OutcomeKind.RUN_ERROR and \
            self.fd >= 0 else {}
        device = self._describe_device(o.bus, o.range_index) if o.range_index >= 0 else None
        return Outcome(kind=kind, vcpu=self.index, exit_reason=o.exit_reason, addr=o.addr,
                       length=o.len, is_write=bool(o.is_write), data=o.data, device=device,
                       suberror=o.suberror, info=tuple(o.info[i] for i in range(o.ndata or
                                                       (1 if o.info[0] else 0))),
                       err=o.err, regs=regs)

    # -- counters --------------------------------------------------------------

    def exit_counts(self) -> dict[str, int]:
        """Exits by KVM_EXIT_* name, only the non-zero ones."""
        exits = self._native.exits
        return {ExitReason.name_of(i): exits[i] for i in range(lib.PV_EXIT_REASONS) if exits[i]}

    def device_exit_count(self, bus: int, range_index: int) -> int:
        return self._native.dev_exits[bus][range_index]

    def unhandled_count(self, bus: int) -> int:
        return self._native.unhandled[bus]

    @property
    def interrupted(self) -> int:
        return self._native.interrupted

    # -- register state --------------------------------------------------------

    def _get(self, ctype: str, request: int, what: str) -> Any:
        value = ffi.new(ctype)
        ioctl_struct(self.fd, request, value, what)
        return value

    def get_regs(self) -> dict[str, int]:
        regs = self._get("struct kvm_regs *", lib.KVM_GET_REGS, "KVM_GET_REGS")
        return {name: getattr(regs, name) for name in REG_NAMES}

    def set_regs(self, **values: int) -> None:
        """Sets the named registers; the others keep their values."""
        regs = self._get("struct kvm_regs *", lib.KVM_GET_REGS, "KVM_GET_REGS")
        for name, value in values.items():
            setattr(regs, name, value)
        ioctl_struct(self.fd, lib.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> Any:
        """struct kvm_sregs (cffi); change fields and hand it to set_sregs."""
        return self._get("struct kvm_sregs *", lib.KVM_GET_SREGS, "KVM_GET_SREGS")

    def set_sregs(self, sregs: Any) -> None:
        ioctl_struct(self.fd, lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> Any:
        return self._get("struct kvm_fpu *", lib.KVM_GET_FPU, "KVM_GET_FPU")

    def set_fpu(self, fpu: Any) -> None:
        ioctl_struct(self.fd, lib.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def set_cpuid(self, entries: list[dict[str, int]]) -> None:
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": entries})
        ioctl_struct(self.fd, lib.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_cpuid(self, max_entries: int = 256) -> list[dict[str, int]]:
        from pyvmm.kvm.system import cpuid_entry_to_dict
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        ioctl_struct(self.fd, lib.KVM_GET_CPUID2, cpuid, "KVM_GET_CPUID2")
        return [cpuid_entry_to_dict(cpuid.entries[i]) for i in range(cpuid.nent)]

    def set_msrs(self, msrs: dict[int, int]) -> None:
        """KVM_SET_MSRS; raises if KVM accepted fewer than all of them."""
        entries = [{"index": index, "data": data} for index, data in msrs.items()]
        arg = ffi.new("struct kvm_msrs *", {"nmsrs": len(entries), "entries": entries})
        done = ioctl_struct(self.fd, lib.KVM_SET_MSRS, arg, "KVM_SET_MSRS")
        if done != len(entries):
            bad = entries[done]["index"]
            raise KvmError(f"KVM_SET_MSRS (MSR {bad:#x} refused)", 22)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        entries = [{"index": index} for index in indices]
        arg = ffi.new("struct kvm_msrs *", {"nmsrs": len(entries), "entries": entries})
        done = ioctl_struct(self.fd, lib.KVM_GET_MSRS, arg, "KVM_GET_MSRS")
        return {arg.entries[i].index: arg.entries[i].data for i in range(done)}

    def get_lapic(self) -> Any:
        return self._get("struct kvm_lapic_state *", lib.KVM_GET_LAPIC, "KVM_GET_LAPIC")

    def set_lapic(self, lapic: Any) -> None:
        ioctl_struct(self.fd, lib.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def get_vcpu_events(self) -> Any:
        return self._get("struct kvm_vcpu_events *", lib.KVM_GET_VCPU_EVENTS,
                         "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events: Any) -> None:
        ioctl_struct(self.fd, lib.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Queue exception `vector` for delivery at the next entry (e.g. #BP for int3)."""
        events = self.get_vcpu_events()
        # Without KVM_CAP_EXCEPTION_PAYLOAD "pending" is reserved: inject directly.
        events.exception.pending = 0
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = 0 if error_code is None else 1
        events.exception.error_code = error_code or 0
        events.flags = 0
        self.set_vcpu_events(events)

    def close(self) -> bool:
        """From any thread, any number of times.  Frees kvm_run and closes the fd, at
        once, or, if another thread is inside run(), when that thread leaves it (it is
        kicked; returns True then).  Register accessors must not race close()."""
        if self.fd < 0:
            return False
        self.fd = -1            # the fd belongs to the C state now; it closes it
        return lib.pv_vcpu_destroy(self._native) == 1

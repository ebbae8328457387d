"""The debugged machine: all-stop control of its vCPUs, breakpoints, registers, memory.

A Debugger attaches to a pyvmm.machine.Machine and works the way gdb's all-stop
mode expects: when one vCPU stops (a breakpoint, a finished step, Ctrl-C) every
vCPU is held where it is until gdb resumes them, each with its own action
(continue or step).  It is used by the gdb stub (pyvmm.gdb.server) and by the
tiny-guest test bed (TinyVm.step(), TinyVm.breakpoint()).

How a vCPU is held: an event (KVM_EXIT_DEBUG, or on KVM PVM the emulation failure
of a planted int3) reaches the Debugger's exit hook in the vCPU's own thread; the
hook records it, kicks the other vCPUs and waits.  A kicked vCPU leaves KVM_RUN
and comes to Machine.debug_hold, which waits too.  So nothing is added to the run
loop: without events and kicks the Debugger is never called.

KVM PVM (pyvmm.pvm; measured with tiny guests, issue 18): single-step works in
guest ring 0 but in ring 3 the #DB goes into the guest and kills it; hardware
execution breakpoints hit in ring 0 but RFLAGS.RF is ignored; data watchpoints
and ring-3 breakpoints never fire; KVM_GUESTDBG_USE_SW_BP intercepts nothing, and
a planted ring-0 int3 ends in an emulation failure at its address, which is the
hit.  Getting past a breakpoint is therefore always: disarm it, step, re-arm.
"""
from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyvmm.errors import PyvmmError
from pyvmm.kvm import KvmError, Outcome, OutcomeKind, VcpuFd
from pyvmm.kvm import debug as kdebug
from pyvmm.kvm.debug import GuestDebug, HwSlot
from pyvmm.kvm.state import kvmclock_ctrl
from pyvmm.kvm.vcpu import INTERNAL_SUBERRORS, REG_NAMES
from pyvmm.memory import GuestMemoryError
from pyvmm.pvm import is_pvm_host

if TYPE_CHECKING:
    from pyvmm.machine import Machine

log = logging.getLogger("pyvmm.gdb")

INT3 = 0xCC
PAGE = 0x1000
# Paging (Intel SDM vol. 3, 2.5 and 4.5).
CR0_PG, EFER_LMA = 1 << 31, 1 << 10
PTE_PRESENT, PTE_USER, PTE_PS = 1, 1 << 2, 1 << 7
PTE_ADDR = 0x000F_FFFF_FFFF_F000
# gdb's signal numbers in stop replies (gdb/signals.def): SIGINT, SIGTRAP.
SIGINT, SIGTRAP = 2, 5
# The one line said when asked for what KVM PVM cannot do (issue 18, measured).
PVM_NO_WATCHPOINTS = ("KVM PVM cannot do data watchpoints: the debug registers' data "
                      "breakpoints never fire there (execution breakpoints and stepping in "
                      "guest ring 0 work)")
PVM_NO_RING3_STEP = ("KVM PVM cannot single-step guest user mode (ring 3): the #DB goes into "
                     "the guest and kills it; step in the kernel, or continue")
PVM_NO_RING3_BREAK = ("KVM PVM cannot stop guest user mode (ring 3): breakpoints there never "
                      "fire (an int3 would kill the process); break in the kernel")
INTERNAL_EMULATION = next(k for k, v in INTERNAL_SUBERRORS.items()
                          if v == "instruction emulation failed")


class DebugError(PyvmmError):
    """A debugger request that cannot be done (bad address, no slot, not on this host)."""


class Unsupported(DebugError):
    """What this host's KVM cannot do; the message is one line for gdb's console."""


class BpKind(enum.IntEnum):
    """gdb's Z packet types (gdb/doc: "insert breakpoint or watchpoint packet")."""
    SOFTWARE = 0
    HARDWARE = 1
    WRITE = 2
    READ = 3
    ACCESS = 4


class StopKind(enum.Enum):
    STEP = "step"
    SW_BREAK = "swbreak"
    HW_BREAK = "hwbreak"
    WATCH = "watch"
    INTERRUPT = "interrupt"     # Ctrl-C, or gdb's attach
    EXITED = "exited"           # the machine ended (halt, shutdown, ...)


@dataclass
class StopEvent:
    kind: StopKind
    vcpu: int
    pc: int = 0
    addr: int = 0               # the watched address for WATCH
    outcome: Outcome | None = None

    @property
    def signal(self) -> int:
        return SIGINT if self.kind == StopKind.INTERRUPT else SIGTRAP


@dataclass
class Breakpoint:
    kind: BpKind
    addr: int
    length: int = 1
    paddr: int = 0              # software: where the int3 is
    original: int = 0           # software: the byte under it
    slot: int = -1              # hardware: DR slot
    planted: bool = False


@dataclass
class VcpuDebug:
    """A vCPU's debug state between a release and its next stop."""
    action: str | None = None              # "c" or "s" while running
    stepping_over: Breakpoint | None = None


@dataclass
class _ArmRequest:
    vcpu: VcpuFd
    control: int
    slots: list | None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Action(enum.Enum):
    CONTINUE = "c"
    STEP = "s"


@dataclass
class _Shared:
    held: set[int] = field(default_factory=set)
    actions: dict[int, Action] = field(default_factory=dict)
    events: list[StopEvent] = field(default_factory=list)
    stopping: bool = False
    released: set[int] | None = None      # the vCPUs the last resume() let run
    report: StopEvent | None = None       # a deferred event resume() chose to report


class Debugger:
    """All-stop debugging of one Machine; see the module docstring."""

    def __init__(self, machine: "Machine", *, pvm: bool | None = None) -> None:
        self.machine = machine
        self.pvm = is_pvm_host() if pvm is None else pvm
        self.breakpoints: dict[tuple[BpKind, int], Breakpoint] = {}
        self.slots: list[Breakpoint | None] = [None] * kdebug.HW_SLOTS
        self.vcpu_state = [VcpuDebug() for _ in machine.vcpus]
        self.physical = False           # memory by guest-physical address (monitor phys on)
        supported = kdebug.supported_guest_debug(machine.kvm.fd)
        self.block_irq = bool(supported & GuestDebug.BLOCKIRQ)
        self._cv = threading.Condition()
        self._s = _Shared()
        self._frozen_clock: int | None = None
        self._attached = False
        # The thread that arms vCPUs whose own thread is seccomp-filtered (attach()).
        self.use_worker = False
        self._worker: threading.Thread | None = None
        self._requests: queue.SimpleQueue[_ArmRequest | None] = queue.SimpleQueue()
        # Called (from a vCPU thread) whenever every vCPU is held after an event.
        self.on_stop: list = []

    # -- attaching -----------------------------------------------------------------

    def attach(self) -> None:
        """Install the exit hook (before PVM's int3 fix-up) and the hold; idempotent."""
        if self._attached:
            return
        self.machine.exit_hooks.insert(0, self._on_exit)
        self.machine.debug_hold = self._on_kick
        self._attached = True
        if self.machine.seccomp is not None or self.use_worker:
            self._worker = threading.Thread(target=self._serve_requests, name="gdb-arm",
                                            daemon=True)
            self._worker.start()
            self.machine.at_release(lambda: self._requests.put(None))

    def hold_at_start(self) -> None:
        """Before Machine.start(): every vCPU stops before its first instruction
        (QEMU's -S)."""
        with self._cv:
            self._s.stopping = True
        for vcpu in self.machine.vcpus:
            vcpu.kick()

    def detach(self) -> None:
        """Remove every breakpoint and let every vCPU run on, undebugged."""
        with self._cv:
            for bp in list(self.breakpoints.values()):
                self._unplant(bp)
            self.breakpoints.clear()
            self.slots = [None] * kdebug.HW_SLOTS
            self._s.events.clear()
            self._s.report = None
        if self.all_stopped():
            self.resume({}, Action.CONTINUE)

    # -- the machine's side: exits and kicks ------------------------------------------

    def _live(self) -> int:
        return sum(1 for t in self.machine._threads if t.is_alive())

    def _machine_ending(self) -> bool:
        return self.machine._stopping or self.machine._done.is_set()

    def _on_kick(self, vcpu: VcpuFd) -> None:
        with self._cv:
            if not self._s.stopping:
                return          # a stale kick (or someone else's): run on
        self._hold(vcpu, None)

    def _on_exit(self, vcpu: VcpuFd, outcome: Outcome) -> bool:
        event = self._classify(vcpu, outcome)
        if event is None:
            return False
        if event.kind == StopKind.STEP and self.vcpu_state[vcpu.index].stepping_over:
            action = self.vcpu_state[vcpu.index].action
            if self._finish_step_over(vcpu):
                return True     # stepped past a breakpoint; the vCPU continues
            if action == Action.CONTINUE:
                self._hold(vcpu, None)      # a stop came meanwhile: no event of its own
                return True
        self._hold(vcpu, event)
        return True

    def _classify(self, vcpu: VcpuFd, outcome: Outcome) -> StopEvent | None:
        state = self.vcpu_state[vcpu.index]
        rip = outcome.regs.get("rip", 0)
        if outcome.kind == OutcomeKind.DEBUG and len(outcome.info) >= 4:
            exception, pc, dr6, _ = outcome.info[:4]
            if state.stepping_over is not None:
                return StopEvent(StopKind.STEP, vcpu.index, rip, outcome=outcome)
            if exception == kdebug.BP_VECTOR:
                # KVM reports the int3's own address; the guest must not see the trap.
                vcpu.set_regs(rip=pc)
                return StopEvent(StopKind.SW_BREAK, vcpu.index, pc, outcome=outcome)
            hit = dr6 & kdebug.DR6_B_MASK
            if hit:
                n = hit.bit_length() - 1
                bp = self.slots[n] if n < len(self.slots) else None
                if bp is not None and bp.kind in (BpKind.WRITE, BpKind.READ, BpKind.ACCESS):
                    return StopEvent(StopKind.WATCH, vcpu.index, rip, bp.addr, outcome)
                return StopEvent(StopKind.HW_BREAK, vcpu.index, rip, outcome=outcome)
            return StopEvent(StopKind.STEP, vcpu.index, rip, outcome=outcome)
        if outcome.kind == OutcomeKind.INTERNAL_ERROR and self.pvm and \
                outcome.suberror == INTERNAL_EMULATION:
            # KVM PVM: a planted ring-0 int3 cannot be emulated; that failure is the hit.
            with self._cv:
                planted = any(bp.planted and bp.kind == BpKind.SOFTWARE and bp.addr == rip
                              for bp in self.breakpoints.values())
            if planted:
                return StopEvent(StopKind.SW_BREAK, vcpu.index, rip, outcome=outcome)
        return None

    def _finish_step_over(self, vcpu: VcpuFd) -> bool:
        """The step past a breakpoint is done: re-arm it; True if the vCPU continues."""
        state = self.vcpu_state[vcpu.index]
        bp = state.stepping_over
        state.stepping_over = None
        with self._cv:
            if bp is not None and self.breakpoints.get((bp.kind, bp.addr)) is bp:
                self._plant(bp)
        if state.action == Action.CONTINUE and not self._s.stopping:
            self._arm(vcpu, Action.CONTINUE)
            return True
        return False

    def _hold(self, vcpu: VcpuFd, event: StopEvent | None) -> None:
        """Keep this vCPU out of KVM_RUN until gdb gives it an action (or the machine
        ends); with an event, stop every other vCPU too."""
        index = vcpu.index
        kick_others = False
        with self._cv:
            if event is not None:
                self._s.events.append(event)
                kick_others = not self._s.stopping
                self._s.stopping = True
                # A vCPU released with this one that has not woken up yet stays held.
                self._s.actions.clear()
            self.vcpu_state[index].action = None
        if kick_others:
            for other in self.machine.vcpus:
                if other.index != index:
                    other.kick()
        with self._cv:
            self._s.held.add(index)
            self._cv.notify_all()
            while index not in self._s.actions:
                if self._machine_ending():
                    self._s.held.discard(index)
                    self._cv.notify_all()
                    return
                self._cv.wait(0.1)
            action = self._s.actions.pop(index)
            self._s.held.discard(index)
        self._arm(vcpu, action)

    # -- arming a vCPU for its next run -------------------------------------------------

    def _bp_at(self, rip: int) -> Breakpoint | None:
        for bp in self.breakpoints.values():
            if bp.addr == rip and bp.kind in (BpKind.SOFTWARE, BpKind.HARDWARE):
                return bp
        return None

    def _arm(self, vcpu: VcpuFd, action: Action) -> None:
        """In the vCPU's thread, before it runs: its KVM_SET_GUEST_DEBUG for action."""
        state = self.vcpu_state[vcpu.index]
        state.action = action
        rip = vcpu.get_regs()["rip"]
        with self._cv:
            old = state.stepping_over
            if old is not None and self.breakpoints.get((old.kind, old.addr)) is not old:
                state.stepping_over = None      # gdb removed it meanwhile
            if state.stepping_over is None:
                over = self._bp_at(rip)
                if over is not None:
                    # Neither int3 nor a debug register can be run past in place (PVM
                    # ignores RFLAGS.RF): take it away for one step (_finish_step_over
                    # re-arms it).  A step-over a stop interrupted is simply finished.
                    state.stepping_over = over
                    self._unplant(over)
            step = action == Action.STEP or state.stepping_over is not None
            slots = [HwSlot(bp.addr, _rw(bp.kind), bp.length) if bp and bp.planted else None
                     for bp in self.slots]
            has_sw = any(bp.kind == BpKind.SOFTWARE for bp in self.breakpoints.values())
        control = 0
        if step or has_sw or any(slots):
            control = GuestDebug.ENABLE
            if step:
                control |= GuestDebug.SINGLESTEP
                if self.block_irq:
                    control |= GuestDebug.BLOCKIRQ
            if has_sw:
                control |= GuestDebug.USE_SW_BP
            if any(slots):
                control |= GuestDebug.USE_HW_BP
        self._set_guest_debug(vcpu, int(control), slots if any(slots) else None)

    def _set_guest_debug(self, vcpu: VcpuFd, control: int, slots: list | None) -> None:
        """KVM_SET_GUEST_DEBUG for a vCPU that is out of KVM_RUN.  A vCPU thread under
        pyvmm's seccomp filter may not issue it (the filter names no debug ioctl), so
        there it is done by the Debugger's own thread, started unfiltered in attach()."""
        if self._worker is None or threading.current_thread() is self._worker:
            kdebug.set_guest_debug(vcpu, control, slots)
            return
        request = _ArmRequest(vcpu, control, slots)
        self._requests.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error

    def _serve_requests(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            try:
                kdebug.set_guest_debug(request.vcpu, request.control, request.slots)
            except BaseException as exc:  # noqa: BLE001 - handed to the vCPU thread
                request.error = exc
            request.done.set()

    # -- gdb's side: stopping and resuming ---------------------------------------------

    def all_stopped(self) -> bool:
        with self._cv:
            return self._s.stopping and len(self._s.held) >= self._live()

    def stop_all(self, timeout: float = 10.0) -> StopEvent:
        """Ctrl-C: hold every vCPU; the event to report (a pending one, or SIGINT)."""
        with self._cv:
            self._s.stopping = True
            self._s.actions.clear()
        self.machine.kick()
        event = self.wait_stop(timeout)
        if event is None:
            raise DebugError(f"the vCPUs did not stop within {timeout} s")
        return event

    def wait_stop(self, timeout: float | None = None) -> StopEvent | None:
        """Wait until every vCPU is held (or the machine ended); the event to report."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                if self.machine._done.is_set():
                    outcome = self.machine.outcome
                    return StopEvent(StopKind.EXITED, outcome.vcpu if outcome else 0,
                                     outcome=outcome)
                if self._s.stopping and len(self._s.held) >= self._live():
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cv.wait(0.1 if left is None else min(0.1, left))
            event = self._next_event() or \
                StopEvent(StopKind.INTERRUPT, min(self._s.held) if self._s.held else 0)
        self._freeze_clock()
        if event.kind == StopKind.INTERRUPT or not event.pc:
            try:
                event.pc = self.machine.vcpus[event.vcpu].get_regs()["rip"]
            except KvmError:
                pass
        return event

    def _next_event(self) -> StopEvent | None:
        """The event to report: a deferred one resume() chose, else the first of a vCPU
        that the last resume released.  Events of vCPUs that stayed held (they stopped
        together with the one reported) wait until gdb resumes those vCPUs."""
        if self._s.report is not None:
            event, self._s.report = self._s.report, None
            return event
        for i, event in enumerate(self._s.events):
            if self._s.released is None or event.vcpu in self._s.released:
                return self._s.events.pop(i)
        return None

    def _deferred(self, plan: dict[int, Action]) -> StopEvent | None:
        """A pending event of a vCPU about to be released that is still true (its
        breakpoint is still there): it is reported instead of running.  Stale ones
        (gdb removed the breakpoint since) are dropped."""
        for event in [e for e in self._s.events if e.vcpu in plan]:
            self._s.events.remove(event)
            if event.kind in (StopKind.SW_BREAK, StopKind.HW_BREAK) and \
                    self._bp_at(event.pc) is None:
                continue
            return event
        return None

    def resume(self, actions: dict[int, Action], default: Action | None) -> None:
        """Release held vCPUs: each with its action, the others with `default` (None:
        they stay held).  On KVM PVM, stepping guest ring 3 is refused (Unsupported)."""
        with self._cv:
            plan = {i: actions.get(i, default) for i in self._s.held}
            plan = {i: a for i, a in plan.items() if a is not None}
        if self.pvm:
            for i, action in plan.items():
                if action == Action.STEP and self.ring(i) == 3:
                    raise Unsupported(PVM_NO_RING3_STEP)
        with self._cv:
            deferred = self._deferred(plan)
            if deferred is not None:
                self._s.report = deferred       # reported at once; nothing runs (all-stop)
                return
            self._s.released = set(plan)
            self._thaw_clock()
            self._s.stopping = False
            self._s.actions.update(plan)
            self._cv.notify_all()

    def _freeze_clock(self) -> None:
        # The guest must not see the time gdb kept it stopped (QEMU stops the clock too).
        if self.machine.irqchip and self._frozen_clock is None:
            try:
                self._frozen_clock = self.machine.vm.get_clock()
            except KvmError:
                self._frozen_clock = None

    def _thaw_clock(self) -> None:
        if self._frozen_clock is None:
            return
        try:
            self.machine.vm.set_clock(self._frozen_clock)
            for vcpu in self.machine.vcpus:
                kvmclock_ctrl(vcpu)
        except KvmError:
            pass
        self._frozen_clock = None

    # -- breakpoints ------------------------------------------------------------------

    def insert(self, kind: BpKind, addr: int, length: int = 1, vcpu: int = 0) -> None:
        """Z packets; DebugError (Unsupported on PVM) when it cannot be done."""
        with self._cv:
            if (kind, addr) in self.breakpoints:
                return
            if self.pvm and kind in (BpKind.SOFTWARE, BpKind.HARDWARE) and \
                    not self.physical and self._user_page(vcpu, addr):
                raise Unsupported(PVM_NO_RING3_BREAK)
            if kind == BpKind.SOFTWARE:
                bp = Breakpoint(kind, addr, 1, paddr=self._phys(vcpu, addr, 1))
                self._plant(bp)
            else:
                if kind in (BpKind.WRITE, BpKind.READ, BpKind.ACCESS) and self.pvm:
                    raise Unsupported(PVM_NO_WATCHPOINTS)
                if kind == BpKind.READ:
                    raise Unsupported("x86 debug registers cannot watch reads only: "
                                      "use an access watchpoint (awatch)")
                if kind != BpKind.HARDWARE and (length not in kdebug.DR7_LEN or addr % length):
                    raise DebugError(f"a watchpoint is 1, 2, 4 or 8 aligned bytes, "
                                     f"not {length} at {addr:#x}")
                free = [n for n, s in enumerate(self.slots) if s is None]
                if not free:
                    raise DebugError("all four debug registers are in use")
                bp = Breakpoint(kind, addr, length, slot=free[0], planted=True)
                self.slots[free[0]] = bp
            self.breakpoints[(kind, addr)] = bp

    def remove(self, kind: BpKind, addr: int) -> bool:
        with self._cv:
            bp = self.breakpoints.pop((kind, addr), None)
            if bp is None:
                return False
            self._unplant(bp)
            if bp.slot >= 0:
                self.slots[bp.slot] = None
            # A vCPU stepping over it finishes its step and does not plant it again.
            return True

    def _plant(self, bp: Breakpoint) -> None:
        if bp.kind == BpKind.SOFTWARE:
            if not bp.planted:
                mem = self.machine.memory
                bp.original = mem.read(bp.paddr, 1)[0]
                mem.write(bp.paddr, bytes([INT3]))
        bp.planted = True

    def _unplant(self, bp: Breakpoint) -> None:
        if bp.kind == BpKind.SOFTWARE and bp.planted:
            self.machine.memory.write(bp.paddr, bytes([bp.original]))
        bp.planted = False

    def _user_page(self, vcpu: int, vaddr: int) -> bool:
        """Whether vaddr is on a user page (U/S set at every level of the vCPU's 4-level
        page tables, SDM vol. 3, 4.6); False without paging or when unmapped."""
        sregs = self.vcpu(vcpu).get_sregs()
        if not sregs.cr0 & CR0_PG or not sregs.efer & EFER_LMA:
            return False
        table = sregs.cr3 & PTE_ADDR
        try:
            for level, shift in enumerate((39, 30, 21, 12)):
                entry = self.machine.memory.read_int(table + ((vaddr >> shift) & 0x1FF) * 8, 8)
                if not entry & PTE_PRESENT or not entry & PTE_USER:
                    return False
                if level in (1, 2) and entry & PTE_PS:
                    return True
                table = entry & PTE_ADDR
        except GuestMemoryError:
            return False
        return True

    # -- registers --------------------------------------------------------------------

    def ring(self, index: int) -> int:
        return self.machine.vcpus[index].get_sregs().cs.selector & 3

    def vcpu(self, index: int) -> VcpuFd:
        if not 0 <= index < len(self.machine.vcpus):
            raise DebugError(f"no vCPU {index}")
        return self.machine.vcpus[index]

    # -- memory -----------------------------------------------------------------------

    def _phys(self, vcpu: int, addr: int, length: int) -> int:
        """The physical address of [addr, addr+length), which must not cross a page."""
        if self.physical:
            paddr = addr
        else:
            result = kdebug.translate(self.vcpu(vcpu), addr)
            if result is None:
                raise DebugError(f"{addr:#x} is not mapped")
            paddr = result.physical
        if not self.machine.memory.contains(paddr, length):
            raise DebugError(f"{addr:#x} is outside guest RAM")
        return paddr

    def _chunks(self, addr: int, length: int) -> list[tuple[int, int]]:
        chunks = []
        while length > 0:
            n = min(length, PAGE - (addr & (PAGE - 1)))
            chunks.append((addr, n))
            addr, length = addr + n, length - n
        return chunks

    def read_memory(self, vcpu: int, addr: int, length: int) -> bytes:
        """By guest-virtual (or, with .physical, guest-physical) address; what is under
        our int3s reads as it was.  DebugError when any byte is not there."""
        if addr < 0 or length < 0 or addr + length > 2**64:
            raise DebugError("address out of range")
        out = bytearray()
        with self._cv:
            for chunk, n in self._chunks(addr, length):
                try:
                    out += self.machine.memory.read(self._phys(vcpu, chunk, n), n)
                except (GuestMemoryError, KvmError) as exc:
                    raise DebugError(str(exc)) from None
            for bp in self.breakpoints.values():
                if bp.kind == BpKind.SOFTWARE and bp.planted and addr <= bp.addr < addr + length:
                    out[bp.addr - addr] = bp.original
        return bytes(out)

    def write_memory(self, vcpu: int, addr: int, data: bytes) -> None:
        if addr < 0 or addr + len(data) > 2**64:
            raise DebugError("address out of range")
        with self._cv:
            targets = [(self._phys(vcpu, chunk, n), chunk, n)
                       for chunk, n in self._chunks(addr, len(data))]
            for paddr, chunk, n in targets:
                self.machine.memory.write(paddr, data[chunk - addr:chunk - addr + n])
            for bp in self.breakpoints.values():
                if bp.kind == BpKind.SOFTWARE and bp.planted and addr <= bp.addr < addr + len(data):
                    bp.original = data[bp.addr - addr]
                    self.machine.memory.write(bp.paddr, bytes([INT3]))


def _rw(kind: BpKind) -> int:
    return {BpKind.HARDWARE: kdebug.DR7_RW_EXEC, BpKind.WRITE: kdebug.DR7_RW_WRITE,
            BpKind.ACCESS: kdebug.DR7_RW_ACCESS}[kind]


__all__ = ["Action", "BpKind", "Debugger", "DebugError", "PVM_NO_RING3_BREAK", "REG_NAMES",
           "StopEvent", "StopKind", "Unsupported"]

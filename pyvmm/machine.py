"""The KVM layer: a Machine is one VM fd, its RAM, its buses and devices, a thread per vCPU.

This is the layer everything else builds on (pyvmm.builder boots Linux on it;
pyvmm.testbed runs tiny guests on it).  Boot code (pyvmm.boot) fills
memory and registers; device models register on the buses; the lifecycle
(start, stop, wait) lives here.

Devices sit on an address-range bus (PIO or MMIO) behind a tiny interface:

    class MyDevice:
        def read(self, offset: int, size: int) -> bytes: ...
        def write(self, offset: int, data: bytes) -> None: ...

Python devices are called from the vCPU thread with the GIL taken just for the
call; C devices (csrc/dev_*.c) are called without it.  A device may raise
StopVcpu from either method to end the vCPU's run with OutcomeKind.DEVICE_STOP.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from pyvmm import seccomp
from pyvmm.closing import Closeable
from pyvmm.errors import PyvmmError
from pyvmm.devices.virtio.state import StateError, StateReader
from pyvmm.kvm import Kvm, Outcome, OutcomeKind, VcpuFd, VmFd, ffi, lib
from pyvmm.kvm.ioctl import ioctl_struct
from pyvmm.kvm.state import VcpuState, VmState, kvmclock_ctrl, save_vcpu, save_vm
from pyvmm.layout import KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS, PAGE_SIZE
from pyvmm.memory import GuestMemory, x86_layout


log = logging.getLogger("pyvmm.machine")

# Process-wide teardown accounting: vCPU threads that Machine.close() could not join
# (stuck in a device handler) and left running with their VM, and how many of them
# have since ended and released it.
teardown_counters = {"vcpu_threads_left_running": 0, "vcpu_threads_reclaimed": 0}


class Bus(enum.IntEnum):
    PIO = lib.PV_BUS_PIO
    MMIO = lib.PV_BUS_MMIO


class MachineError(PyvmmError):
    """Bad machine configuration or use (overlapping devices, running twice...)."""


class DeviceError(PyvmmError):
    """A Python device handler raised; the original exception is the __cause__."""


class StopVcpu(Exception):
    """Raised by a device handler to end its vCPU's run (OutcomeKind.DEVICE_STOP)."""


class Device(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...


@dataclass
class DeviceBinding:
    """A device's place on a bus; `index` is its range index in the C bus."""
    name: str
    bus: Bus
    base: int
    length: int
    device: Any
    handle: Any = None          # cffi handle (Python devices) or the C state (C devices)
    error: BaseException | None = None


@ffi.def_extern()
def pv_py_io(opaque: Any, offset: int, data: Any, length: int, is_write: int) -> int:
    binding: DeviceBinding = ffi.from_handle(opaque)
    try:
        if is_write:
            binding.device.write(offset, ffi.buffer(data, length)[:])
        else:
            value = binding.device.read(offset, length)
            if len(value) != length:
                raise ValueError(f"{binding.name}.read returned {len(value)} bytes, not {length}")
            ffi.memmove(data, value, length)
        return lib.PV_IO_OK
    except StopVcpu:
        return lib.PV_IO_STOP
    except BaseException as exc:  # noqa: BLE001 - reported through the outcome
        binding.error = exc
        return lib.PV_IO_ERROR


# An exit hook sees every outcome before the machine treats it as final; it
# returns True when it has dealt with it and the vCPU should run on.
ExitHook = Callable[[VcpuFd, Outcome], bool]


class Machine(Closeable):
    """A VM with RAM, buses and vCPUs, but no firmware: callers load the guest."""

    def __init__(self, mem_size: int = 128 << 20, vcpus: int = 1, *, irqchip: bool = True,
                 strict: bool = False, layout: list[tuple[int, int]] | None = None,
                 end_on_first_exit: bool = True, kvm: Kvm | None = None,
                 memory: GuestMemory | None = None, track_dirty_pages: bool = False,
                 own_kvm: bool = False) -> None:
        """kvm: a /dev/kvm handle to use, which stays the caller's unless own_kvm (one
        opened here is always the machine's); memory: guest RAM made by the caller (a
        snapshot's), which the machine then owns; track_dirty_pages: KVM logs the
        pages the guest writes (Diff snapshots)."""
        self.kvm = kvm or Kvm()
        self._owns_kvm = kvm is None or own_kvm
        if not 1 <= vcpus <= self.kvm.max_vcpus:
            raise MachineError(f"cannot create {vcpus} vCPUs: this host allows 1 to "
                               f"{self.kvm.max_vcpus}")
        self.irqchip = irqchip
        self.track_dirty_pages = track_dirty_pages
        try:
            self.vm = VmFd(self.kvm.create_vm())
        except BaseException:
            if memory is not None:
                memory.close()
            raise
        self.memory = memory or GuestMemory(layout or x86_layout(mem_size))
        if track_dirty_pages:
            self.memory.device_dirty = set()
        self.vcpus: list[VcpuFd] = []
        self.bindings: dict[Bus, list[DeviceBinding]] = {Bus.PIO: [], Bus.MMIO: []}
        self.exit_hooks: list[ExitHook] = []
        # The gdb stub's (pyvmm.gdb.target.Debugger): a kicked vCPU calls it after any
        # pause, and it holds the vCPU while the debugger has every vCPU stopped.
        # Only kicks reach it, so the run loop pays nothing for it.
        self.debug_hold: Callable[[VcpuFd], None] | None = None
        self.outcome: Outcome | None = None            # the first final outcome
        self.outcomes: list[Outcome | None] = [None] * vcpus
        # Linux guests: the first vCPU to end ends the VM.  Test guests may let
        # each vCPU run to its own end instead.
        self.end_on_first_exit = end_on_first_exit
        # A pyvmm.seccomp.Policy: each vCPU thread puts its "vcpu" filter on as it
        # starts (MicroVM sets it; bare machines, the tests' tiny guests, run without).
        self.seccomp: seccomp.Policy | None = None
        self.device_error: DeviceError | None = None
        self._native = ffi.new("struct pv_machine *")
        self._c_state: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._done = threading.Event()
        # _lock guards the lifecycle: start, _finish, close, and a vCPU thread's exit.
        self._lock = threading.Lock()
        self._stopping = False
        self._closed = False
        self._running: set[int] = set()    # vCPUs whose thread is in _vcpu_thread
        self._left: set[int] = set()       # ... of those, the ones close() left running
        # How long close() and stop_and_join() wait for each vCPU thread.
        self.join_timeout = 5.0
        # vCPU threads close() could not join; they release the VM when they end.
        self.leaked_vcpus = 0
        # Set once the vCPU fds, the VM fd, guest RAM and KVM are closed.
        self.released = threading.Event()
        self._at_release: list[Callable[[], None]] | None = []     # None once released
        # pause(): vCPU threads park on _resumed; _parked counts them in.
        self._pause_lock = threading.Condition()
        self._pausing = False
        self._parked = 0
        self._paused_clock: int | None = None
        self._paused_realtime: int | None = None      # the host's wall clock then (ns)
        self._restored_realtime: int | None = None    # ... as restore_state() found it
        lib.pv_machine_init(self._native)
        self._native.strict = int(strict)
        try:
            # Memory first: KVM_SET_USER_MEMORY_REGION costs ~6 ms once an irqchip
            # exists on our hosts, 0.15 ms before (benches/README.md, Snapshots); it
            # is Firecracker's order too.
            slot_flags = lib.KVM_MEM_LOG_DIRTY_PAGES if track_dirty_pages else 0
            for region in self.memory.regions:
                self.vm.set_user_memory_region(region.slot, region.gpa, region.size,
                                               region.host_addr, slot_flags)
            if irqchip:
                self.vm.set_tss_addr(KVM_TSS_ADDRESS)
                self.vm.set_identity_map_addr(KVM_IDENTITY_MAP_ADDRESS)
                self.vm.create_irqchip()
                self.vm.create_pit2()
            for index in range(vcpus):
                fd = self.vm.create_vcpu(index)
                self.vcpus.append(VcpuFd(fd, index, self.kvm.vcpu_mmap_size, self._native,
                                         self._device_name))
        except BaseException:
            self.close()
            raise

    # -- devices ---------------------------------------------------------------

    def _add_range(self, bus: Bus, base: int, length: int, fn: Any, opaque: Any,
                   binding: DeviceBinding) -> DeviceBinding:
        if self._threads:
            raise MachineError(f"cannot add {binding.name}: the machine is running")
        rc = lib.pv_bus_add(ffi.addressof(self._native.buses[bus]), base, length, fn, opaque,
                            binding.name.encode()[:23])
        if rc < 0:
            reasons = {-22: "the range is empty or wraps", -17: "it overlaps another device",
                       -28: f"the bus is full ({lib.PV_MAX_RANGES} devices)"}
            raise MachineError(f"cannot place {binding.name} at {bus.name} {base:#x}+{length:#x}:"
                               f" {reasons.get(rc, rc)}")
        self.bindings[bus].append(binding)
        self.bindings[bus].sort(key=lambda b: b.base)
        return binding

    def add_device(self, bus: Bus, base: int, length: int, device: Device,
                   name: str | None = None) -> DeviceBinding:
        """Put a Python device on a bus; its handlers run with the GIL."""
        binding = DeviceBinding(name or type(device).__name__, bus, base, length, device)
        binding.handle = ffi.new_handle(binding)
        return self._add_range(bus, base, length, lib.pv_py_io, binding.handle, binding)

    def add_c_device(self, bus: Bus, base: int, length: int, fn: Any, state: Any,
                     name: str) -> DeviceBinding:
        """Put a C device (a pv_io_fn from csrc/ and its state) on a bus."""
        binding = DeviceBinding(name, bus, base, length, state, handle=state)
        self._c_state.append(state)
        return self._add_range(bus, base, length, fn, state, binding)

    def _device_name(self, bus: int, index: int) -> str | None:
        bindings = self.bindings[Bus(bus)]
        return bindings[index].name if 0 <= index < len(bindings) else None

    # -- running ---------------------------------------------------------------

    def start(self, paused: bool = False) -> None:
        """Start one thread per vCPU; returns at once.  Once only, and not after close().

        paused: the vCPUs park before they first enter the guest, with kvmclock held
        where it is (a restored snapshot's), until resume()."""
        with self._lock:
            if self._closed:
                raise MachineError("the machine is closed")
            if self._threads:
                raise MachineError("the machine is already running")
            if paused:
                with self._pause_lock:
                    self._pausing = True
                    self._paused_clock = self.vm.get_clock() if self.irqchip else None
                    # The guest's time stands where the restored state left it.
                    self._paused_realtime = self._restored_realtime or time.time_ns()
                for vcpu in self.vcpus:
                    vcpu.kick()         # KVM_RUN returns at once: the thread parks
            for vcpu in self.vcpus:
                thread = threading.Thread(target=self._vcpu_thread, args=(vcpu,),
                                          name=f"vcpu{vcpu.index}", daemon=True)
                self._threads.append(thread)
                self._running.add(vcpu.index)
            for thread in self._threads:
                thread.start()
        if paused:
            # Paused means parked: a snapshot may be taken as soon as this returns.
            with self._pause_lock:
                self._pause_lock.wait_for(lambda: self._parked >= len(self._threads) or
                                          self._done.is_set(), timeout=10)

    def _vcpu_thread(self, vcpu: VcpuFd) -> None:
        try:
            seccomp.enter_thread("vcpu", self.seccomp, f"vcpu{vcpu.index}")
            while True:
                outcome = vcpu.run(with_regs=False)
                if outcome.kind == OutcomeKind.STOPPED and not self._stopping:
                    self._park_while_paused()
                    if self.debug_hold is not None:
                        self.debug_hold(vcpu)
                    continue    # resumed, or a stale kick from a vCPU that already finished
                outcome = vcpu.with_regs(outcome)
                if outcome.kind != OutcomeKind.STOPPED and not self._closed and \
                        any(hook(vcpu, outcome) for hook in self.exit_hooks):
                    continue
                self._finish(outcome)
                return
        finally:
            self._vcpu_thread_ended(vcpu)

    def _vcpu_thread_ended(self, vcpu: VcpuFd) -> None:
        """The thread is out of the C loop for good: if close() left it running, its
        vCPU, and with the last such thread the VM and guest RAM, are released now."""
        with self._lock:
            self._running.discard(vcpu.index)
            if vcpu.index not in self._left:
                return
            self._left.discard(vcpu.index)
            teardown_counters["vcpu_threads_reclaimed"] += 1
            vcpu.close()
            last = not self._left
        log.info("vCPU %d thread ended after close(); its resources are released", vcpu.index)
        if last:
            self._release()

    def _finish(self, outcome: Outcome) -> None:
        """Record a vCPU's final outcome; the first one (or the last, see
        end_on_first_exit) ends the machine and stops the other vCPUs."""
        with self._lock:
            self.outcomes[outcome.vcpu] = outcome
            if outcome.kind == OutcomeKind.HANDLER_ERROR and self.device_error is None:
                error = next((b.error for bus in self.bindings.values() for b in bus if b.error),
                             None)
                self.device_error = DeviceError(f"device {outcome.device} failed: {error!r}")
                self.device_error.__cause__ = error
            if self.outcome is None:
                self.outcome = outcome
            all_done = all(o is not None for o in self.outcomes)
            if not (self.end_on_first_exit or all_done or self._stopping):
                return
            self._stopping = True
        for vcpu in self.vcpus:
            vcpu.kick()
        if all_done or self.end_on_first_exit:
            self._done.set()
            with self._pause_lock:
                self._pause_lock.notify_all()       # a pause() in progress gives up

    def stop(self) -> None:
        """From any thread, at any time: stop every vCPU; wait() then returns a STOPPED
        outcome.  A no-op before start() and after the machine ended."""
        with self._lock:
            if not self._threads:
                return
            self._stopping = True
        self.kick()
        self.resume()           # parked vCPUs must wake up to see the stop

    def kick(self) -> None:
        """From any thread, at any time: make every running vCPU leave KVM_RUN once.
        They run on (or end, after stop()); a no-op on closed vCPUs."""
        for vcpu in self.vcpus:
            vcpu.kick()

    # -- pause and resume --------------------------------------------------------

    def _park_while_paused(self) -> None:
        with self._pause_lock:
            if not self._pausing:
                return
            self._parked += 1
            self._pause_lock.notify_all()
            self._pause_lock.wait_for(lambda: not self._pausing)
            self._parked -= 1

    @property
    def paused(self) -> bool:
        return self._pausing

    def pause(self, timeout: float = 10.0) -> None:
        """Stop every vCPU where it is, keeping its state; resume() goes on.

        kvmclock is frozen across the pause (as QEMU does on stop/cont), so the
        guest sees no jump in time when it resumes.
        """
        with self._pause_lock:
            if not self._threads or self._done.is_set() or self._stopping:
                raise MachineError("the machine is not running")
            if self._pausing:
                return
            self._pausing = True
        self.kick()
        with self._pause_lock:
            live = sum(1 for t in self._threads if t.is_alive())
            parked = self._pause_lock.wait_for(
                lambda: self._parked >= live or self._done.is_set() or not self._pausing,
                timeout)
            if not self._pausing:
                return          # resume() or stop() came first
            if not parked:
                problem = f"vCPUs did not pause within {timeout} s"
            elif self._done.is_set():
                problem = "the machine ended while pausing"
            else:
                with self._lock:
                    if not self._closed:
                        self._paused_clock = self.vm.get_clock()
                        self._paused_realtime = time.time_ns()
                        return
                problem = "the machine is closed"
            self._pausing = False       # not paused after all: parked vCPUs run on
            self._pause_lock.notify_all()
        raise MachineError(problem)

    def resume(self) -> None:
        """From any thread, at any time; a no-op unless paused."""
        with self._pause_lock:
            if not self._pausing:
                return
            with self._lock:
                if self._paused_clock is not None and not self._closed:
                    self.vm.set_clock(self._paused_clock)
                    for vcpu in self.vcpus:
                        kvmclock_ctrl(vcpu)     # the guest's watchdogs ignore the pause
                self._paused_clock = None
            self._pausing = False
            self._pause_lock.notify_all()

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """The final outcome once every vCPU thread has ended, or None if the machine
        still runs after timeout seconds.  MachineError if it was never started."""
        if not self._threads:
            raise MachineError("the machine was not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._done.wait(timeout):
            return None
        if not self._join(deadline):
            return None
        return self.outcome

    def _join(self, deadline: float | None) -> bool:
        """Join every vCPU thread but the caller's until deadline; True if all ended."""
        me = threading.current_thread()
        for thread in self._threads:
            if thread is not me:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads if t is not me)

    def run(self, timeout: float | None = None) -> Outcome:
        """start() and wait(); on timeout the machine is stopped and STOPPED returned."""
        self.start()
        outcome = self.wait(timeout)
        if outcome is None:
            self.stop()
            outcome = self.wait()
        assert outcome is not None
        return outcome

    # -- saved state (snapshots) --------------------------------------------------

    def _check_stopped(self, what: str) -> None:
        if self._threads and not (self._pausing and self._parked >= sum(
                1 for t in self._threads if t.is_alive())):
            raise MachineError(f"cannot {what} while the vCPUs run: pause first")

    def save_state(self) -> dict[str, Any]:
        """What KVM holds for this VM and its vCPUs (pyvmm.kvm.state); only while
        paused or before start().  Guest RAM is not included."""
        self._check_stopped("save the machine state")
        clock = self._paused_clock if self._paused_clock is not None else (
            self.vm.get_clock() if self.irqchip else 0)
        msr_indices = self.kvm.msr_index_list()
        return {"vm": save_vm(self.vm, clock, self._paused_realtime or time.time_ns())
                if self.irqchip else None,
                "vcpus": [save_vcpu(vcpu, self.kvm, msr_indices, self.irqchip)
                          for vcpu in self.vcpus]}

    def restore_state(self, state: object, clock_realtime: bool = False,
                      msr_overrides: dict[int, int] | None = None) -> None:
        """Apply what save_state() returned, before start(): everything is read and
        checked first (StateError), then applied in the order KVM needs.
        clock_realtime: see pyvmm.kvm.state.VmState.clock_now."""
        if self._threads:
            raise MachineError("restore the machine state before starting it")
        saved = StateReader(state, "machine state")
        vcpus = [VcpuState(v, f"vCPU {i} state")
                 for i, v in enumerate(saved.items("vcpus", len(self.vcpus)))]
        for position, vcpu_state in enumerate(vcpus):
            if vcpu_state.index != position:
                raise StateError(f"the saved vCPU {position} says it is vCPU "
                                 f"{vcpu_state.index}: the state file is corrupt")
        if any((v.lapic is not None) != self.irqchip for v in vcpus):
            raise StateError("the saved vCPUs and this machine differ in having a LAPIC")
        vm_state = saved.record("vm")
        if (vm_state is None) == self.irqchip:
            raise StateError("the saved machine state and this machine differ in having "
                             "an in-kernel irqchip")
        vm = VmState(vm_state) if vm_state is not None else None
        advance_ns = 0
        if vm is not None:
            advance_ns = vm.clock_now(clock_realtime) - vm.clock
            vm.restore(self.vm, clock_realtime)
            self._restored_realtime = None if clock_realtime else vm.realtime_ns
        for vcpu, vcpu_state in zip(self.vcpus, vcpus):
            vcpu_state.restore(vcpu, self.kvm, advance_ns, msr_overrides or {})

    def dirty_pages(self) -> list[bytearray]:
        """Per region, a bitmap (bit n: page n) of the pages written since the last
        call (or since the memory was mapped): KVM's dirty log, which it clears as it
        answers, OR'ed with what our devices wrote.  Needs track_dirty_pages."""
        if not self.track_dirty_pages:
            raise MachineError("dirty pages are not tracked: enable track_dirty_pages")
        bitmaps = []
        for region in self.memory.regions:
            pages = region.size // PAGE_SIZE
            bitmap = bytearray(((pages + 63) // 64) * 8)
            log_arg = ffi.new("struct kvm_dirty_log *")
            log_arg.slot = region.slot
            buf = ffi.from_buffer(bitmap)
            log_arg.dirty_bitmap = buf
            ioctl_struct(self.vm.fd, lib.KVM_GET_DIRTY_LOG, log_arg, "KVM_GET_DIRTY_LOG")
            bitmaps.append(bitmap)
        dirty, self.memory.device_dirty = self.memory.device_dirty or set(), set()
        for slot, page in dirty:
            bitmaps[slot][page // 8] |= 1 << (page % 8)
        return bitmaps

    # -- observing -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Exit counters: per vCPU by exit reason, and per device (all vCPUs)."""
        per_vcpu = [vcpu.exit_counts() for vcpu in self.vcpus]
        devices: dict[str, int] = {}
        for bus, bindings in self.bindings.items():
            for index, binding in enumerate(bindings):
                devices[binding.name] = sum(v.device_exit_count(bus, index) for v in self.vcpus)
        unhandled = {bus.name.lower(): sum(v.unhandled_count(bus) for v in self.vcpus)
                     for bus in Bus}
        return {"vcpus": per_vcpu, "devices": devices, "unhandled": unhandled}

    # -- teardown --------------------------------------------------------------

    def stop_and_join(self, timeout: float | None = None) -> bool:
        """Stop the vCPUs if they run and wait up to timeout (join_timeout) for their
        threads; True if none is left (a vCPU thread calling this does not count)."""
        self.stop()
        return self._join(time.monotonic() + (self.join_timeout if timeout is None
                                               else timeout))

    def close(self) -> None:
        """From any thread, any number of times.  Stops the vCPUs and joins their
        threads (join_timeout), then closes the vCPU fds, the VM fd, guest RAM and KVM.

        A vCPU thread that does not end in time (a device handler that blocks) is left
        running, kicked again so that it stops as soon as its handler returns, and keeps
        its vCPU, the VM fd and guest RAM alive: the last such thread to end releases
        them (`released` is set then).  That is counted in `leaked_vcpus`,
        `teardown_counters` and logged.  A vCPU thread closing its own machine counts
        as one left running."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.stop_and_join()
        with self._lock:
            self._left = set(self._running)
            for vcpu in self.vcpus:
                if vcpu.index not in self._left:
                    vcpu.close()
            left = sorted(self._left)
            self.leaked_vcpus = len(left)
            teardown_counters["vcpu_threads_left_running"] += len(left)
        if not left:
            self._release()
            return
        self.kick()
        log.warning("close(): vCPU thread(s) %s did not end within %.1f s (blocked in a "
                    "device?); they keep the VM and guest RAM until they end",
                    left, self.join_timeout)

    def at_release(self, fn: Callable[[], None]) -> None:
        """Have close() call fn once no vCPU thread runs any more, before the VM fd and
        guest RAM are closed: for what a vCPU's device handler may still use (eventfds,
        backends).  At once if the machine is already released."""
        with self._lock:
            if self._at_release is not None:
                self._at_release.append(fn)
                return
        fn()

    def _release(self) -> None:
        """Close the VM's host resources: called once, by close() or by the last vCPU
        thread close() left running, when no vCPU thread runs any more."""
        with self._lock:
            callbacks, self._at_release = self._at_release or [], None
        for fn in callbacks:
            try:
                fn()
            except Exception:  # noqa: BLE001 - the VM's own resources must still go
                log.exception("a release callback of the machine failed")
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
        self.memory.close()
        if self._owns_kvm:
            self.kvm.close()
        self.released.set()


"""Tiny guests: a few instructions, loaded flat and run in a chosen CPU mode.

This is the place to study the VMM's internals without a kernel: assemble a
snippet, load it, run it, look at the outcome and the exit counters.

    from pyvmm.testbed import Mode, TinyVm, assemble

    code = assemble('''
        mov $0xe9, %dx
        mov $'A', %al
        out %al, %dx          # -> debugcon, handled in C
        hlt
    ''', Mode.LONG_RING0)
    with TinyVm(Mode.LONG_RING0) as vm:
        vm.load(code)
        print(vm.run().describe(), vm.output, vm.machine.stats())

Each mode gets the least a CPU needs: real mode starts at 0000:7c00; the
64-bit modes get a GDT, a TSS, identity page tables for the low 4 GiB (user
accessible in ring-3 mode, so ring 3 can touch MMIO) and an empty IDT, so that any exception
ends in a triple fault (OutcomeKind.SHUTDOWN) instead of running wild.
Ring 3 runs with IOPL 3, so `in`/`out` work there on hardware KVM; KVM PVM
ignores IOPL in guest ring 3, so ring-3 guests that must run everywhere end
by writing to the MMIO debug-exit (DEBUG_EXIT_MMIO) instead of port 0xf4.
"""
from __future__ import annotations

import enum
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from pyvmm.closing import Closeable
from pyvmm.devices.debug import DebugCon, DebugExit
from pyvmm.errors import PyvmmError
from pyvmm.gdb.target import Action, BpKind, Debugger, StopEvent
from pyvmm.kvm import Outcome, VcpuFd
from pyvmm.machine import Machine
from pyvmm.memory import MiB

# Where the 64-bit modes put their CPU tables (all below 64 KiB).
GDT_ADDR = 0x500
TSS_ADDR = 0x600
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000            # four page directories: 0xB000..0xEFFF, 4 GiB of 2 MiB pages
LOAD_ADDR_REAL = 0x7C00
LOAD_ADDR_LONG = 0x10000
# MMIO windows for test devices, inside the 32-bit gap where there is no RAM.
TEST_MMIO_BASE = 0xD000_0000
DEBUG_EXIT_MMIO = 0xD0FF_F000
STACK_TOP = 0x80000         # vCPU n gets STACK_TOP - n * STACK_STRIDE
STACK_STRIDE = 0x4000
RING0_STACK_TOP = 0x90000   # TSS.RSP0: where ring-3 exceptions would land

# Selectors into the GDT below.
KERNEL_CS, KERNEL_DS, USER_DS, USER_CS, TSS_SEL = 0x08, 0x10, 0x1B, 0x23, 0x28
GDT_ENTRIES = (
    0,
    0x00AF9A000000FFFF,     # 0x08 kernel code: 64-bit, DPL 0
    0x00CF92000000FFFF,     # 0x10 kernel data
    0x00CFF2000000FFFF,     # 0x18 user data, DPL 3
    0x00AFFA000000FFFF,     # 0x20 user code: 64-bit, DPL 3
)
TSS_LIMIT = 0x67

# Control register bits (Intel SDM vol. 3, 2.5).
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_RESERVED = 1 << 1
RFLAGS_IOPL3 = 3 << 12
# Page table entry bits.
PTE_PRESENT, PTE_RW, PTE_USER, PTE_PS = 1, 1 << 1, 1 << 2, 1 << 7


class Mode(enum.Enum):
    REAL = "real"
    LONG_RING0 = "long0"
    LONG_RING3 = "long3"


class AssemblyError(PyvmmError):
    """The snippet did not assemble; the message has the assembler's output."""


def _cache_dir() -> Path:
    root = Path(os.environ.get("PYVMM_CACHE", Path.home() / ".cache" / "pyvmm"))
    path = root / "tinyguests"
    path.mkdir(parents=True, exist_ok=True)
    return path


def assemble(source: str, mode: Mode, origin: int | None = None) -> bytes:
    """GNU as syntax to a flat binary linked at origin (cached by content)."""
    if origin is None:
        origin = LOAD_ADDR_REAL if mode == Mode.REAL else LOAD_ADDR_LONG
    prefix = ".code16\n" if mode == Mode.REAL else ".code64\n"
    text = f".globl _start\n.text\n{prefix}_start:\n{source}\n"
    key = hashlib.sha256(f"{origin}\0{text}".encode()).hexdigest()[:24]
    cached = _cache_dir() / f"{key}.bin"
    if cached.exists():
        return cached.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, out = (Path(tmp) / n for n in ("g.s", "g.o", "g.bin"))
        src.write_text(text)
        for cmd in (["as", "--64", "-o", str(obj), str(src)],
                    ["ld", "-m", "elf_x86_64", f"-Ttext={origin:#x}", "--oformat=binary",
                     "-o", str(out), str(obj)]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise AssemblyError(f"{cmd[0]} failed: {proc.stderr.strip()}")
        data = out.read_bytes()
    tmp_path = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_path.write_bytes(data)
    tmp_path.replace(cached)
    return data


class TinyVm(Closeable):
    """A Machine with a debug console (port 0xe9) and a debug-exit port (0xf4)."""

    def __init__(self, mode: Mode = Mode.LONG_RING0, mem_size: int = 4 * MiB, vcpus: int = 1,
                 *, irqchip: bool = False, strict: bool = True,
                 end_on_first_exit: bool = True) -> None:
        self.mode = mode
        self.machine = Machine(mem_size, vcpus, irqchip=irqchip, strict=strict,
                               end_on_first_exit=end_on_first_exit)
        self.debugcon = DebugCon(self.machine)
        self.debug_exit = DebugExit(self.machine, mmio_base=DEBUG_EXIT_MMIO)
        self.entry: int | None = None
        self._debugger: Debugger | None = None
        if mode != Mode.REAL:
            self._write_long_mode_tables()

    # -- loading ---------------------------------------------------------------

    def load(self, code: bytes, at: int | None = None) -> int:
        """Copy code into guest RAM at `at` and make it the entry point of every vCPU."""
        if at is None:
            at = LOAD_ADDR_REAL if self.mode == Mode.REAL else LOAD_ADDR_LONG
        self.machine.memory.write(at, code)
        self.entry = at
        for vcpu in self.machine.vcpus:
            self._setup_vcpu(vcpu, at)
        return at

    def _write_long_mode_tables(self) -> None:
        mem = self.machine.memory
        for i, entry in enumerate(GDT_ENTRIES):
            mem.write_int(GDT_ADDR + 8 * i, 8, entry)
        # 64-bit TSS descriptor (SDM 7.2.3): 16 bytes, type 9 = available TSS.
        low = (TSS_LIMIT & 0xFFFF) | ((TSS_ADDR & 0xFFFFFF) << 16) | (0x89 << 40) \
            | (((TSS_ADDR >> 24) & 0xFF) << 56)
        mem.write_int(GDT_ADDR + TSS_SEL, 8, low)
        mem.write_int(GDT_ADDR + TSS_SEL + 8, 8, TSS_ADDR >> 32)
        mem.fill(TSS_ADDR, TSS_LIMIT + 1)
        mem.write_int(TSS_ADDR + 4, 8, RING0_STACK_TOP)          # RSP0
        mem.write_int(TSS_ADDR + 0x66, 2, TSS_LIMIT + 1)         # no I/O bitmap
        # Ring 0 guests get supervisor pages: the debugger (pyvmm.gdb.target) tells kernel
        # from user code by the U/S bit, as in a real kernel's page tables.
        flags = PTE_PRESENT | PTE_RW | (PTE_USER if self.mode == Mode.LONG_RING3 else 0)
        mem.write_int(PML4_ADDR, 8, PDPT_ADDR | flags)
        for gib in range(4):
            pd = PD_ADDR + gib * 0x1000
            mem.write_int(PDPT_ADDR + 8 * gib, 8, pd | flags)
            for i in range(512):
                mem.write_int(pd + 8 * i, 8, ((gib << 30) + (i << 21)) | flags | PTE_PS)

    def _setup_vcpu(self, vcpu: VcpuFd, entry: int) -> None:
        sregs = vcpu.get_sregs()
        stack = STACK_TOP - vcpu.index * STACK_STRIDE
        if self.mode == Mode.REAL:
            for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
                seg.base, seg.selector = 0, 0
            vcpu.set_sregs(sregs)
            vcpu.set_regs(rip=entry, rsp=stack & 0xFFFF, rflags=RFLAGS_RESERVED,
                          rdi=vcpu.index)
            return
        ring3 = self.mode == Mode.LONG_RING3
        code = dict(base=0, limit=0xFFFFFFFF, type=0xB, present=1, s=1, l=1, db=0, g=1,
                    dpl=3 if ring3 else 0, selector=USER_CS if ring3 else KERNEL_CS)
        data = dict(base=0, limit=0xFFFFFFFF, type=0x3, present=1, s=1, l=0, db=1, g=1,
                    dpl=3 if ring3 else 0, selector=USER_DS if ring3 else KERNEL_DS)
        _set_segment(sregs.cs, code)
        for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _set_segment(seg, data)
        _set_segment(sregs.tr, dict(base=TSS_ADDR, limit=TSS_LIMIT, type=0xB, present=1, s=0,
                                    l=0, db=0, g=0, dpl=0, selector=TSS_SEL))
        sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, TSS_SEL + 16 - 1
        sregs.idt.base, sregs.idt.limit = 0, 0
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sregs.cr3 = PML4_ADDR
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
        sregs.efer = EFER_LME | EFER_LMA
        vcpu.set_sregs(sregs)
        vcpu.set_regs(rip=entry, rsp=stack,
                      rflags=RFLAGS_RESERVED | (RFLAGS_IOPL3 if ring3 else 0), rdi=vcpu.index)

    # -- running ---------------------------------------------------------------

    def run(self, timeout: float | None = 30.0) -> Outcome:
        if self.entry is None:
            raise PyvmmError("nothing loaded: call load() first")
        if self._debugger is not None and self.machine._threads:
            # Started under the debugger: let it go, undebugged, to its end.
            self._debugger.detach()
            outcome = self.machine.wait(timeout)
            if outcome is None:
                self.machine.stop()
                outcome = self.machine.wait()
            assert outcome is not None
        else:
            outcome = self.machine.run(timeout)
        self.debugcon.drain()
        return outcome

    # -- debugging (the gdb stub's machinery, pyvmm.gdb.target) -------------------

    @property
    def debugger(self) -> Debugger:
        """The Debugger, attached on first use; the guest starts held at its entry."""
        if self._debugger is None:
            self._debugger = Debugger(self.machine)
            self._debugger.attach()
        return self._debugger

    def _started(self) -> Debugger:
        debugger = self.debugger
        if not self.machine._threads:
            if self.entry is None:
                raise PyvmmError("nothing loaded: call load() first")
            debugger.hold_at_start()
            self.machine.start()
            if debugger.wait_stop(10.0) is None:
                raise PyvmmError("the vCPUs did not stop at their entry point")
        return debugger

    def breakpoint(self, addr: int, hardware: bool = False) -> None:
        """Stop any vCPU that reaches addr: an int3 planted in guest memory, or with
        hardware=True a debug register (DR0-3)."""
        self.debugger.insert(BpKind.HARDWARE if hardware else BpKind.SOFTWARE, addr)

    def watchpoint(self, addr: int, length: int = 1, access: bool = False) -> None:
        """Stop after a write (access=True: a read or write) of [addr, addr+length).
        On KVM PVM this raises pyvmm.gdb.target.Unsupported: it never fires there."""
        self.debugger.insert(BpKind.ACCESS if access else BpKind.WRITE, addr, length)

    def remove_breakpoint(self, addr: int, hardware: bool = False) -> None:
        self.debugger.remove(BpKind.HARDWARE if hardware else BpKind.SOFTWARE, addr)

    def step(self, vcpu: int = 0, timeout: float = 10.0) -> StopEvent:
        """Execute one instruction on vCPU `vcpu` (the others stay stopped)."""
        debugger = self._started()
        debugger.resume({vcpu: Action.STEP}, None)
        return self._wait(debugger, timeout)

    def cont(self, timeout: float = 30.0) -> StopEvent:
        """Run every vCPU until a breakpoint, a watchpoint or the end (StopKind.EXITED,
        with the machine's outcome)."""
        debugger = self._started()
        debugger.resume({}, Action.CONTINUE)
        return self._wait(debugger, timeout)

    def _wait(self, debugger: Debugger, timeout: float) -> StopEvent:
        event = debugger.wait_stop(timeout)
        if event is None:
            debugger.stop_all()
            raise PyvmmError(f"the guest did not stop within {timeout} s")
        self.debugcon.drain()
        return event

    def regs(self, vcpu: int = 0) -> dict[str, int]:
        """rax..r15, rip, rflags of a stopped (or not yet started) vCPU."""
        return self.machine.vcpus[vcpu].get_regs()

    def set_regs(self, vcpu: int = 0, **values: int) -> None:
        self.machine.vcpus[vcpu].set_regs(**values)

    @property
    def output(self) -> bytes:
        self.debugcon.drain()
        return bytes(self.debugcon.output)

    @property
    def exit_value(self) -> int:
        """The value last written to the debug-exit port."""
        return self.debug_exit.state.last_value

    def close(self) -> None:
        self.machine.close()


def _set_segment(seg, fields: dict[str, int]) -> None:
    for name, value in fields.items():
        setattr(seg, name, value)
    seg.unusable = 0

"""A Linux microVM: the machine, the boot path, the legacy devices, the console.

    vm = LinuxVm(VmConfig(kernel=..., initrd=..., mem_mib=256, vcpus=2))
    vm.start(); vm.wait_for_output(b"PYVMM-INIT-OK", 300); vm.send(b"uname -r\\n")
    result = vm.wait()

The CLI (pyvmm.cli) is a thin layer over this.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.boot.cpu import setup_vcpus
from pyvmm.boot.errors import BootError
from pyvmm.boot.loader import LoadedKernel, load_linux
from pyvmm.pvm import KERNEL_PARAMS as PVM_CMDLINE, PvmFixups
from pyvmm.console import ConsoleOutput
from pyvmm.devices.i8042 import I8042, I8042_PORTS
from pyvmm.layout import COM1_IRQ, COM1_PORT, I8042_DATA_PORT, KEYBOARD_IRQ
from pyvmm.devices.iothread import IoThread
from pyvmm.devices.uart import UART_REGISTERS, Serial
from pyvmm.devices.virtio.blk import Block
from pyvmm.devices.virtio.mmio import MMIO_WINDOW, QUEUE_NOTIFY, VirtioDevice, VirtioMmio, \
    eventfd_irq
from pyvmm.devices.virtio.net import Net, default_mac, parse_mac
from pyvmm.devices.virtio.rng import Rng
from pyvmm.errors import PyvmmError
from pyvmm.kvm import Outcome, OutcomeKind
from pyvmm.machine import Bus, Machine
from pyvmm.memory import MiB

# console on COM1; reboot through the i8042 (no ACPI); reboot at once on panic;
# no PCI bus to probe; the i8042 has a keyboard and no mouse, and the keyboard
# is taken as it is instead of probed (each probe command costs emulated
# ring-0 time on KVM PVM hosts): Firecracker's i8042 parameters.
DEFAULT_CMDLINE = ("console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux "
                   "i8042.nopnp i8042.dumbkbd")
MIN_MEM_MIB = 16
MAX_MEM_MIB = 1 << 20
MAX_VCPUS = 32
# virtio-mmio windows sit in the 32-bit MMIO gap, 4 KiB each; their IRQs are the
# ISA lines nothing else uses (0 timer, 1 keyboard, 2 cascade, 3/4 serial, 8 RTC).
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23)
PANIC_MARKER = b"Kernel panic - not syncing"
# The built-in guest's /init prints this; the serial device time-stamps the
# write that completes it (our boot timer: no guest change, no extra exit).
INIT_MARKER = b"PYVMM-INIT-OK"
INIT_DIED_MARKER = b"Attempted to kill init"
PVM_SYSCALL_HINT = ("; on KVM PVM hosts a 64-bit SYSCALL from guest user mode does not reach "
                    "the guest kernel, so init dies at its first system call unless the kernel "
                    "carries firmware/kernel/patches/0001-pvm-syscall-fixup.patch (the built-in "
                    "guest does)")


class VmError(PyvmmError):
    """The VM configuration is invalid."""


@dataclass
class DriveConfig:
    """A virtio-blk disk backed by a raw image file."""
    drive_id: str
    path: Path
    read_only: bool = False
    is_root: bool = False             # adds root=/dev/vdX to the command line


@dataclass
class NetConfig:
    """A virtio-net interface on an existing TAP device."""
    iface_id: str
    tap: str
    mac: str | None = None            # "02:xx:..."; default: derived from iface_id


@dataclass
class VmConfig:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""                 # appended to DEFAULT_CMDLINE
    mem_mib: int = 256
    vcpus: int = 1
    console: str = "stdio"            # stdio | file:PATH | none
    drives: list[DriveConfig] = field(default_factory=list)
    nets: list[NetConfig] = field(default_factory=list)
    entropy: bool = False             # a virtio-rng device
    pvm_workarounds: bool | None = None   # None: when the host is KVM PVM
    extra_cmdline_defaults: str = field(default=DEFAULT_CMDLINE)

    def validate(self) -> None:
        if not MIN_MEM_MIB <= self.mem_mib <= MAX_MEM_MIB:
            raise VmError(f"memory size {self.mem_mib} MiB is out of range: use "
                          f"{MIN_MEM_MIB} MiB to {MAX_MEM_MIB >> 10} GiB")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise VmError(f"{self.vcpus} vCPUs is out of range: use 1 to {MAX_VCPUS}")


@dataclass(frozen=True)
class VmResult:
    """How the VM ended: exit_code 0 means the guest rebooted or was asked to stop."""
    exit_code: int
    reason: str
    outcome: Outcome | None = field(repr=False)     # every register: too long for a repr


class LinuxVm:
    def __init__(self, config: VmConfig) -> None:
        config.validate()
        self.config = config
        self.console = ConsoleOutput(config.console)
        self.console.markers[INIT_MARKER] = None
        self.machine = Machine(config.mem_mib * MiB, config.vcpus, irqchip=True, strict=False)
        try:
            self.pvm = config.pvm_workarounds if config.pvm_workarounds is not None \
                else self.machine.kvm.pvm
            vm_fd = self.machine.vm
            self.serial = Serial(self.console, lambda level: vm_fd.irq_line(COM1_IRQ, level))
            self.machine.add_device(Bus.PIO, COM1_PORT, UART_REGISTERS, self.serial, "serial")
            self.i8042 = I8042(lambda level: vm_fd.irq_line(KEYBOARD_IRQ, level))
            self.machine.add_device(Bus.PIO, I8042_DATA_PORT, I8042_PORTS, self.i8042, "i8042")
            self.fixups = PvmFixups(self.machine.memory)
            if self.pvm:
                self.machine.exit_hooks.append(self.fixups)
            self.iothread = IoThread()
            self.virtio: dict[str, VirtioMmio] = {}
            self._eventfds: list[int] = []
            virtio_cmdline = self._add_virtio_devices(config)
            self.cmdline = " ".join(filter(None, (config.extra_cmdline_defaults,
                                                  PVM_CMDLINE if self.pvm else "",
                                                  virtio_cmdline, config.cmdline)))
            self.kernel: LoadedKernel = load_linux(self.machine.memory, config.kernel,
                                                   config.initrd, self.cmdline, config.vcpus)
            setup_vcpus(self.machine.kvm, self.machine.vcpus, self.machine.memory,
                        self.kernel.entry, hide_pvm_features=self.pvm)
        except BaseException:
            self.close()
            raise
        self.started_at: float | None = None

    # -- virtio ----------------------------------------------------------------

    def _add_virtio_devices(self, config: VmConfig) -> str:
        """Create the configured virtio devices; returns their kernel parameters."""
        devices: list[tuple[str, VirtioDevice]] = []
        try:
            return self._create_virtio_devices(config, devices)
        except BaseException:
            for _, device in devices:
                if isinstance(device, (Block, Net)):
                    device.close()
            raise

    def _create_virtio_devices(self, config: VmConfig,
                               devices: list[tuple[str, VirtioDevice]]) -> str:
        drives = sorted(config.drives, key=lambda d: not d.is_root)    # the root is vda
        for drive in drives:
            devices.append((f"drive:{drive.drive_id}",
                            Block(drive.path, drive.read_only, serial=drive.drive_id)))
        for net in config.nets:
            mac = parse_mac(net.mac) if net.mac else default_mac(net.iface_id)
            device = Net(net.tap, mac)
            device.watch_tap = functools.partial(self.iothread.watch, device.fd,
                                                 device.tap_readable)
            devices.append((f"net:{net.iface_id}", device))
        if config.entropy:
            devices.append(("entropy", Rng()))
        if len(devices) > len(VIRTIO_IRQS):
            raise VmError(f"{len(devices)} virtio devices is too many: at most "
                          f"{len(VIRTIO_IRQS)}")
        params = [f"virtio_mmio.device=4K@{VIRTIO_MMIO_BASE + i * MMIO_WINDOW:#x}:"
                  f"{VIRTIO_IRQS[i]}" for i in range(len(devices))]
        for index, (name, device) in enumerate(devices):
            self._attach_virtio(index, name, device)
        root = next((d for d in drives if d.is_root), None)
        if root is not None:
            params.append(f"root=/dev/vda {'ro' if root.read_only else 'rw'}")
        return " ".join(params)

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._eventfds.append(fd)
        return fd

    def _attach_virtio(self, index: int, name: str, device: VirtioDevice) -> None:
        base = VIRTIO_MMIO_BASE + index * MMIO_WINDOW
        irqfd = self._eventfd()
        self.machine.vm.irqfd(irqfd, VIRTIO_IRQS[index])
        transport = VirtioMmio(device, self.machine.memory, eventfd_irq(irqfd))
        self.machine.add_device(Bus.MMIO, base, MMIO_WINDOW, transport, name[:23])
        for queue in range(len(device.queues)):
            kick = self._eventfd()
            # A 4-byte write of the queue's index to QueueNotify signals `kick`
            # inside KVM; the vCPU never exits for it.
            self.machine.vm.ioeventfd(kick, base + QUEUE_NOTIFY, 4, datamatch=queue)
            self.iothread.add_eventfd(kick, functools.partial(transport.notify, queue))
        self.virtio[name] = transport

    def update_drive(self, drive_id: str, path: Path) -> None:
        """Point a drive at another image (Firecracker's PATCH /drives/{id})."""
        transport = self.virtio.get(f"drive:{drive_id}")
        if transport is None:
            raise VmError(f"there is no drive {drive_id!r}")
        device = transport.device
        assert isinstance(device, Block)
        with transport.lock:
            device.replace_backing(path)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.iothread.start()
        self.machine.start()

    def stop(self) -> None:
        self.machine.stop()

    def pause(self) -> None:
        self.machine.pause()

    def resume(self) -> None:
        self.machine.resume()

    def wait(self, timeout: float | None = None) -> VmResult | None:
        outcome = self.machine.wait(timeout)
        if outcome is None:
            return None
        return self._result(outcome)

    def _result(self, outcome: Outcome) -> VmResult:
        panicked = PANIC_MARKER in self.console.history
        if outcome.kind == OutcomeKind.DEVICE_STOP and outcome.device == "i8042":
            if panicked:
                hint = PVM_SYSCALL_HINT if self.pvm and \
                    INIT_DIED_MARKER in self.console.history else ""
                return VmResult(1, f"the guest kernel panicked{hint}", outcome)
            return VmResult(0, "the guest rebooted", outcome)
        if outcome.kind == OutcomeKind.STOPPED:
            return VmResult(0, "stopped by the host", outcome)
        if outcome.kind == OutcomeKind.SHUTDOWN:
            return VmResult(1, f"the guest triple-faulted ({outcome.describe()})", outcome)
        if outcome.kind == OutcomeKind.HANDLER_ERROR:
            return VmResult(1, str(self.machine.device_error), outcome)
        if outcome.kind == OutcomeKind.INTERNAL_ERROR and self.pvm:
            try:
                insn = self.fixups.instruction_bytes(self.machine.vcpus[outcome.vcpu],
                                                     outcome.regs.get("rip", 0)).hex(" ")
            except PyvmmError:
                insn = "unreadable"
            return VmResult(1, f"{outcome.describe()}; instruction bytes: {insn} "
                               "(KVM PVM could not emulate it)", outcome)
        return VmResult(1, outcome.describe(), outcome)

    # -- console ---------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.serial.feed(data)

    def send_ctrl_alt_del(self) -> None:
        """Press Ctrl-Alt-Del on the guest's keyboard (Firecracker's SendCtrlAltDel).

        Linux reboots, or signals its init if that asked for it (ours syncs
        first); either way the VM then ends through `reboot=k`."""
        self.i8042.press_ctrl_alt_del()

    def wait_for_output(self, marker: bytes, timeout: float) -> bool:
        """True once marker appears on the console (or False at timeout or VM end)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.console.wait_for(lambda out: marker in out, 0.5):
                return True
            if self.machine.wait(0) is not None:
                return marker in self.console.history
        return False

    def boot_times(self) -> dict[str, float | None]:
        """Seconds from process start (exec) and from start() to the /init marker."""
        seen = self.console.markers.get(INIT_MARKER)
        if seen is None:
            return {"exec_to_init": None, "start_to_init": None}
        return {"exec_to_init": seen - process_start_monotonic(),
                "start_to_init": seen - self.started_at if self.started_at else None}

    def stats(self) -> dict:
        stats = self.machine.stats()
        stats["boot"] = self.boot_times()
        stats["pvm_fixups"] = dict(self.fixups.counts)
        stats["serial_tx_bytes"] = self.serial.tx_bytes
        stats["virtio"] = {name: dict(t.device.stats, error=t.error)
                           for name, t in self.virtio.items()}
        return stats

    def close(self) -> None:
        self.machine.close()
        iothread = getattr(self, "iothread", None)
        if iothread is not None:
            iothread.stop()
        for transport in getattr(self, "virtio", {}).values():
            if isinstance(transport.device, (Block, Net)):
                transport.device.close()
        for fd in getattr(self, "_eventfds", []):
            os.close(fd)
        self.console.close()

    def __enter__(self) -> "LinuxVm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def process_start_monotonic() -> float:
    """When this process was exec'd, on the time.monotonic() clock (10 ms steps).

    /proc/self/stat's starttime counts clock ticks since boot; CLOCK_BOOTTIME
    and CLOCK_MONOTONIC differ only by time spent suspended, zero here.
    """
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start_ticks = int(fields[19])            # field 22, counted after "(comm)"
    since_boot = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - since_boot


__all__ = ["BootError", "DriveConfig", "LinuxVm", "NetConfig", "VmConfig", "VmError", "VmResult"]

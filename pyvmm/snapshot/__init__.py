"""Snapshots: save a paused VM (state file + memory file), load it in a fresh process.

Firecracker's semantics (its docs/snapshotting/): a snapshot is taken while the
VM is paused; a Full one writes all of guest memory, a Diff one only the pages
dirtied since the last snapshot (KVM's dirty log OR'ed with what our devices
wrote); loading happens in a process where nothing boot-specific was
configured, and the VM comes back paused unless resume_vm.  The state file's
format is pyvmm.snapshot.format's; the memory file's pyvmm.snapshot.memfile's.

What is saved, in order (and restored in the order pyvmm.kvm.state explains):
per VM the PIT, kvmclock, both PICs and the IOAPIC; per vCPU CPUID, MP state,
regs, sregs, XSAVE (or FPU), XCRs, debug registers, LAPIC, the MSRs that
KVM_GET_MSR_INDEX_LIST names, vCPU events and the TSC frequency; the UART,
the i8042, and every virtio-mmio transport with its device (registers, queue
addresses and indices, features, config).  A request in flight in a virtio
device completes before the state is saved: the snapshot holds every device's
serving lock while it saves the devices and guest memory.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyvmm.config import ConfigError, VmSpec
from pyvmm.devices.virtio.state import StateError
from pyvmm.layout import PAGE_SIZE
from pyvmm.memory import GuestMemory, GuestMemoryError, x86_layout
from pyvmm.snapshot import memfile
from pyvmm.snapshot.format import SnapshotError, read_state_file, write_state_file

if TYPE_CHECKING:
    from pyvmm.builder import LinuxVm
    from pyvmm.kvm import Kvm

log = logging.getLogger("pyvmm.snapshot")
FULL, DIFF = "Full", "Diff"
FILE, UFFD = "File", "Uffd"
# Sections of the configuration that belong to the process, not to the guest:
# the restoring process configures its own (as Firecracker's does).
PROCESS_SECTIONS = ("logger", "metrics", "serial")


_host_identity: dict[str, str] | None = None


def host_identity(kvm: "Kvm") -> dict[str, str]:
    """What a snapshot must be loaded on: the kind of KVM and the CPU vendor (their
    MSR lists and CPUID differ; a PVM snapshot cannot run on hardware KVM).  Asked
    once per process: KVM_GET_SUPPORTED_CPUID is 0.4 ms of every restore otherwise."""
    global _host_identity
    if _host_identity is None:
        vendor = ""
        for entry in kvm.supported_cpuid():
            if entry["function"] == 0:
                vendor = b"".join(entry[r].to_bytes(4, "little")
                                  for r in ("ebx", "edx", "ecx")).decode("ascii", "replace")
                break
        _host_identity = {"kvm": "pvm" if kvm.pvm else "hardware", "cpu_vendor": vendor}
    return dict(_host_identity)


@dataclass
class SnapshotResult:
    """What create() did."""
    snapshot_type: str
    state_bytes: int
    memory_bytes_written: int
    memory_size: int
    seconds: float


def create(vm: "LinuxVm", snapshot_path: str | os.PathLike, mem_file_path: str | os.PathLike,
           snapshot_type: str = FULL) -> SnapshotResult:
    """Save a paused VM.  Diff needs track_dirty_pages; every snapshot starts a new
    dirty-page period (the next Diff holds what changed after this one)."""
    if snapshot_type not in (FULL, DIFF):
        raise SnapshotError(f"snapshot_type {snapshot_type!r} is invalid: use Full or Diff")
    machine = vm.machine
    if snapshot_type == DIFF and not machine.track_dirty_pages:
        raise SnapshotError("a Diff snapshot needs dirty page tracking: set "
                            "machine-config track_dirty_pages (or track_dirty_pages on "
                            "snapshot load) before the VM starts")
    started = time.monotonic()
    from pyvmm import __version__ as version
    with contextlib.ExitStack() as locks:
        # No device touches guest memory or its own state until both are saved.
        for transport in vm.virtio.values():
            locks.enter_context(transport.device.lock)
            locks.enter_context(transport.lock)
        body: dict[str, Any] = {
            "snapshot_type": snapshot_type,
            "created_unix_ns": time.time_ns(),
            "pyvmm_version": version,
            "host": host_identity(machine.kvm),
            "vm_spec": vm.spec.to_json(),
            "kvm": machine.save_state(),
            "devices": {"serial": vm.uart.save(), "i8042": vm.i8042.save(),
                        "virtio": {name: t.save() for name, t in vm.virtio.items()}},
        }
        layout = machine.memory.layout
        memory: dict[str, Any] = {"regions": [list(r) for r in layout],
                                  "page_size": PAGE_SIZE, "dirty_pages": None}
        if machine.track_dirty_pages:
            bitmaps = machine.dirty_pages()          # a new period starts either way
        if snapshot_type == DIFF:
            written = memfile.write_diff(machine.memory, mem_file_path, bitmaps)
            memory["dirty_pages"] = memfile.encode_bitmaps(bitmaps)
        else:
            written = memfile.write_full(machine.memory, mem_file_path)
        body["memory"] = memory
    state_bytes = write_state_file(snapshot_path, body)
    result = SnapshotResult(snapshot_type, state_bytes, written, machine.memory.size,
                            time.monotonic() - started)
    log.info("snapshot %s: %d bytes of state, %d of %d bytes of memory written in %.3f s",
             snapshot_type, state_bytes, written, result.memory_size, result.seconds)
    return result


# -- loading -------------------------------------------------------------------------------

@dataclass
class LoadRequest:
    """PUT /snapshot/load, parsed (pyvmm.api), or its CLI and Python equivalents."""
    snapshot_path: str
    backend_path: str
    backend_type: str = FILE
    track_dirty_pages: bool = False
    resume_vm: bool = False
    network_overrides: dict[str, str] = field(default_factory=dict)   # iface_id -> TAP
    clock_realtime: bool = False        # advance kvmclock by the time since the pause
    # A pyvmm extension (Python and CLI, not the API): drive_id -> the image this VM
    # uses instead of the snapshot's, e.g. a clone's own copy.  It must hold what the
    # snapshot's image held when the snapshot was taken.
    drive_overrides: dict[str, str] = field(default_factory=dict)
    # vsock_override's uds_path: the restored vsock device's socket (its connections
    # never survive a snapshot; the guest is told to reset them).
    vsock_override: str | None = None


    FIELDS = ("snapshot_path", "mem_file_path", "mem_backend", "enable_diff_snapshots",
              "track_dirty_pages", "resume_vm", "network_overrides", "vsock_override",
              "clock_realtime", "huge_pages")

    @classmethod
    def from_json(cls, body: Any, where: str = "PUT /snapshot/load") -> "LoadRequest":
        """Firecracker's SnapshotLoadParams: exactly one of mem_backend and the deprecated
        mem_file_path; enable_diff_snapshots is the deprecated track_dirty_pages."""
        if not isinstance(body, dict):
            raise SnapshotError(f"{where}: the body must be a JSON object")
        unknown = sorted(set(body) - set(cls.FIELDS))
        if unknown:
            raise SnapshotError(f"{where}: unknown field {unknown[0][:40]!r}")
        path = _text(body, "snapshot_path", where, required=True)
        has_file, has_backend = "mem_file_path" in body, "mem_backend" in body
        if has_file == has_backend:
            raise SnapshotError(f"{where}: give exactly one of mem_backend and mem_file_path")
        if has_backend:
            backend = body["mem_backend"]
            if not isinstance(backend, dict) or set(backend) - {"backend_type", "backend_path"}:
                raise SnapshotError(f"{where}: mem_backend must be {{\"backend_type\": "
                                    "\"File\"|\"Uffd\", \"backend_path\": PATH}")
            backend_type = _text(backend, "backend_type", f"{where}: mem_backend",
                                 required=True)
            if backend_type not in (FILE, UFFD):
                raise SnapshotError(f"{where}: mem_backend backend_type "
                                    f"{backend_type[:20]!r} is invalid: use File or Uffd")
            backend_path = _text(backend, "backend_path", f"{where}: mem_backend",
                                 required=True)
        else:
            backend_type, backend_path = FILE, _text(body, "mem_file_path", where, True)
        flags = {name: _flag(body, name, where) for name in
                 ("enable_diff_snapshots", "track_dirty_pages", "resume_vm", "clock_realtime")}
        vsock_override = None
        if body.get("vsock_override") is not None:
            # Firecracker's VsockOverride: the restored vsock device listens here instead.
            override = body["vsock_override"]
            if not isinstance(override, dict) or set(override) != {"uds_path"}:
                raise SnapshotError(f"{where}: vsock_override must be {{\"uds_path\": PATH}}")
            vsock_override = _text(override, "uds_path", f"{where}: vsock_override", True)
        if "huge_pages" in body:
            huge_pages = body["huge_pages"]
            if not isinstance(huge_pages, str):
                raise SnapshotError(f"{where}: huge_pages must be \"Snapshot\" or \"None\"")
            if huge_pages not in ("Snapshot", "None"):
                raise SnapshotError(f"{where}: huge_pages {huge_pages[:20]!r} is not supported "
                                    "yet by pyvmm: use Snapshot or None")
        overrides: dict[str, str] = {}
        items = body.get("network_overrides", [])
        if not isinstance(items, list):
            raise SnapshotError(f"{where}: network_overrides must be an array")
        for index, item in enumerate(items):
            at = f"{where}: network_overrides[{index}]"
            if not isinstance(item, dict) or set(item) != {"iface_id", "host_dev_name"}:
                raise SnapshotError(f"{at} must be {{\"iface_id\": ..., "
                                    "\"host_dev_name\": ...}")
            iface, tap = _text(item, "iface_id", at, True), _text(item, "host_dev_name", at, True)
            if iface in overrides:
                raise SnapshotError(f"{at}: interface {iface[:40]!r} is overridden twice")
            overrides[iface] = tap
        return cls(path, backend_path, backend_type,
                   flags["track_dirty_pages"] or flags["enable_diff_snapshots"],
                   flags["resume_vm"], overrides, flags["clock_realtime"],
                   vsock_override=vsock_override)


def parse_create(body: Any, where: str = "PUT /snapshot/create") -> tuple[str, str, str]:
    """Firecracker's SnapshotCreateParams: (snapshot_path, mem_file_path, snapshot_type)."""
    if not isinstance(body, dict):
        raise SnapshotError(f"{where}: the body must be a JSON object")
    unknown = sorted(set(body) - {"snapshot_path", "mem_file_path", "snapshot_type"})
    if unknown:
        raise SnapshotError(f"{where}: unknown field {unknown[0][:40]!r}")
    kind = body.get("snapshot_type", FULL)
    if kind not in (FULL, DIFF):
        raise SnapshotError(f"{where}: snapshot_type {str(kind)[:20]!r} is invalid: use Full "
                            "or Diff")
    return (_text(body, "snapshot_path", where, True), _text(body, "mem_file_path", where, True),
            kind)


def _text(body: dict, name: str, where: str, required: bool = False) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or "\0" in value:
        raise SnapshotError(f"{where}: {name} must be a non-empty path" if required or
                            value is not None else f"{where}: {name} is invalid")
    return value


def _flag(body: dict, name: str, where: str) -> bool:
    value = body.get(name, False)
    if type(value) is not bool:
        raise SnapshotError(f"{where}: {name} must be true or false")
    return value


@dataclass
class OpenedSnapshot:
    """A state file read and checked, its guest memory mapped: what the builder
    restores a VM from (LinuxVm(spec, console, restore=...))."""
    spec: VmSpec
    body: dict[str, Any]
    memory: GuestMemory
    uffd: int | None = None
    clock_realtime: bool = False

    @property
    def machine_state(self) -> Any:
        return self.body.get("kvm")

    @property
    def devices(self) -> dict[str, Any]:
        devices = self.body.get("devices")
        if not isinstance(devices, dict):
            raise StateError("the snapshot has no device state")
        return devices

    def close(self) -> None:
        """Release the memory (only if no VM took it) and the userfaultfd."""
        self.memory.close()
        self.close_uffd()

    def close_uffd(self) -> None:
        if self.uffd is not None:
            from pyvmm.snapshot.uffd import close_uffd_backend
            uffd, self.uffd = self.uffd, None
            close_uffd_backend(uffd)        # the handler sees the hang-up and exits


def open_snapshot(request: LoadRequest, kvm: "Kvm") -> OpenedSnapshot:
    """Read and check the state file, check it fits this host, map its memory."""
    body = read_state_file(request.snapshot_path)
    here = host_identity(kvm)
    saved_host = body.get("host")
    if not isinstance(saved_host, dict) or saved_host.get("kvm") != here["kvm"]:
        kind = saved_host.get("kvm") if isinstance(saved_host, dict) else None
        theirs = f"a {kind[:20]}" if isinstance(kind, str) and kind else "an unknown"
        raise SnapshotError(f"the snapshot was taken on {theirs} KVM host and this is a "
                            f"{here['kvm']} KVM host: their CPU and MSR state differ; "
                            "load it on the kind of host it was taken on")
    if saved_host.get("cpu_vendor") != here["cpu_vendor"]:
        raise SnapshotError(f"the snapshot was taken on a {saved_host.get('cpu_vendor')} CPU "
                            f"and this host has a {here['cpu_vendor']} CPU: load it on the "
                            "same kind of CPU")
    if body.get("snapshot_type") not in (FULL, DIFF):
        raise SnapshotError(f"{request.snapshot_path}: unknown snapshot type "
                            f"{str(body.get('snapshot_type'))[:20]!r}")
    spec = _spec(body, request)
    layout = _layout(body, spec)
    size = sum(s for _, s in layout)
    if request.backend_type == FILE:
        fd = memfile.open_memory_file(request.backend_path, size)
        try:
            memory = GuestMemory.from_file(layout, fd)
        finally:
            os.close(fd)
        return OpenedSnapshot(spec, body, memory, None, request.clock_realtime)
    if request.backend_type == UFFD:
        from pyvmm.snapshot.uffd import attach_uffd_backend
        memory = GuestMemory(layout, anonymous=True)
        try:
            uffd = attach_uffd_backend(memory, request.backend_path)
        except BaseException:
            memory.close()
            raise
        return OpenedSnapshot(spec, body, memory, uffd, request.clock_realtime)
    raise SnapshotError(f"mem_backend backend_type {request.backend_type!r} is invalid: "
                        "use File or Uffd")


def _spec(body: dict[str, Any], request: LoadRequest) -> VmSpec:
    """The saved configuration, less the process's own sections, with the request's
    network overrides and dirty-page tracking."""
    saved = body.get("vm_spec")
    if not isinstance(saved, dict):
        raise SnapshotError(f"{request.snapshot_path} is corrupt: it has no configuration")
    saved = {k: v for k, v in saved.items() if k not in PROCESS_SECTIONS}
    try:
        spec = VmSpec.from_json(saved, "the snapshot's configuration")
    except ConfigError as exc:
        raise SnapshotError(str(exc)) from None
    for iface_id, tap in request.network_overrides.items():
        iface = spec.network_interfaces.get(iface_id)
        if iface is None:
            raise SnapshotError(f"network_overrides: the snapshot has no network interface "
                                f"{iface_id!r} (it has: "
                                f"{', '.join(spec.network_interfaces) or 'none'})")
        iface.host_dev_name = tap
    for drive_id, path in request.drive_overrides.items():
        drive = spec.drives.get(drive_id)
        if drive is None:
            raise SnapshotError(f"drive override: the snapshot has no drive {drive_id!r} (it "
                                f"has: {', '.join(spec.drives) or 'none'})")
        drive.path_on_host = path
    if request.vsock_override is not None:
        if spec.vsock is None:
            raise SnapshotError("vsock_override: the snapshot has no vsock device")
        spec.vsock.uds_path = request.vsock_override
    spec.machine_config.track_dirty_pages = request.track_dirty_pages
    return spec


def _layout(body: dict[str, Any], spec: VmSpec) -> list[tuple[int, int]]:
    memory = body.get("memory")
    regions = memory.get("regions") if isinstance(memory, dict) else None
    try:
        expected = x86_layout(spec.machine_config.mem_size_mib << 20)
    except GuestMemoryError as exc:
        raise SnapshotError(f"the snapshot's configuration is unusable: {exc}") from None
    if regions != [list(r) for r in expected]:
        raise SnapshotError("the snapshot's memory regions do not match its configured "
                            "memory size: the state file is corrupt")
    return expected


def merge(base_mem_path: str | os.PathLike, diff_snapshot_path: str | os.PathLike,
          diff_mem_path: str | os.PathLike) -> int:
    """Apply a Diff snapshot's memory onto its base memory file (in place): the base
    file then goes with the Diff snapshot's state file.  Returns bytes copied."""
    body = read_state_file(diff_snapshot_path)
    if body.get("snapshot_type") != DIFF:
        raise SnapshotError(f"{os.fspath(diff_snapshot_path)} is a "
                            f"{body.get('snapshot_type')} snapshot, not a Diff one: its "
                            "memory file is complete already")
    memory = body.get("memory") if isinstance(body.get("memory"), dict) else {}
    layout = memory.get("regions")
    if type(layout) is not list or not all(
            type(r) is list and len(r) == 2 and all(type(x) is int and x >= 0 for x in r)
            for r in layout):
        raise SnapshotError(f"{os.fspath(diff_snapshot_path)} is corrupt: bad memory regions")
    bitmaps = memfile.decode_bitmaps(memory.get("dirty_pages"), layout)
    return memfile.merge(base_mem_path, diff_mem_path, [tuple(r) for r in layout], bitmaps)


__all__ = ["DIFF", "FILE", "FULL", "LoadRequest", "OpenedSnapshot", "SnapshotError",
           "SnapshotResult", "UFFD", "create", "host_identity", "merge", "open_snapshot",
           "parse_create"]

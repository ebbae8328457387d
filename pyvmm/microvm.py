r"""MicroVM: a Linux microVM's whole life from Python, and the lifecycle the CLI and API drive.

    from pyvmm.microvm import MicroVM

    with MicroVM(mem_mib=256) as vm:                      # the built-in guest, 1 vCPU
        vm.start()
        vm.serial.expect("PYVMM-INIT-OK", timeout=600)    # ~1 min on KVM PVM hosts
        vm.serial.write("echo $((6 * 7)) && uname -r\n")
        print(vm.serial.expect(rb"\n(\d+\.\d+\.\d+)", timeout=60).group(1).decode())
        vm.pause(); vm.resume()                          # every vCPU stops, then goes on
        vm.serial.write("exit\n")                        # the shell ends: the guest reboots
        result = vm.wait(timeout=120)
        print(result.exit_code, result.reason)           # 0 the guest rebooted

MicroVM(...) takes keyword arguments; MicroVM.from_config() takes the JSON of a
Firecracker config file (the shape of `GET /vm/config`).  Both build the same
pyvmm.config.VmSpec, which the CLI and the API server (pyvmm.api) also use:
they are thin layers over this class.  Building and booting the VM itself is
pyvmm.builder's job; this class holds its state (Not started, Running, Paused,
Exited), its console capture, its metrics and logs.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable

from pyvmm import seccomp as seccomp_filters
from pyvmm.closing import Closeable
from pyvmm.config import DEFAULT_SERIAL_OUT_MAX_BYTES, Logger, Metrics, RateLimiterConfig, \
    VmSpec
from pyvmm.console import ConsoleCapture, ConsoleSink, SerialConsole
from pyvmm.errors import PyvmmError

DEFAULT_ID = "anonymous-instance"         # Firecracker's, without --id
NOT_STARTED, RUNNING, PAUSED, EXITED = "Not started", "Running", "Paused", "Exited"
BEFORE_START = "The requested operation is not supported before starting the microVM."
AFTER_START = "The requested operation is not supported after starting the microVM."
# Firecracker's LoadSnapshotError::LoadSnapshotNotAllowed, word for word.
LOAD_NOT_ALLOWED = ("Loading a microVM snapshot not allowed after configuring boot-specific "
                    "resources.")
NOT_PAUSED = ("Cannot create a snapshot: the microVM is not paused; pause it first "
              "(PATCH /vm {\"state\": \"Paused\"})")

log = logging.getLogger("pyvmm.microvm")
# Nothing is logged anywhere until PUT /logger (or a logger section) says where, as in
# Firecracker; without this, Python would print warnings on stderr.
logging.getLogger("pyvmm").addHandler(logging.NullHandler())


class MicroVMError(PyvmmError):
    """An operation that the microVM's state does not allow, or that failed."""


_NO_LIMIT = RateLimiterConfig()


def _serial_bucket(config: Any) -> Any:
    """The serial rate limiter's pyvmm.devices.rate_limiter.TokenBucket, from its
    pyvmm.config.TokenBucketConfig; None when there is none (Firecracker's)."""
    if config is None:
        return None
    from pyvmm.devices.rate_limiter import TokenBucket
    return TokenBucket.from_config(config)


def _limiter_update(value: "RateLimiterConfig | dict", where: str) -> RateLimiterConfig:
    """A PATCH's rate limiter, given as the model or as its JSON."""
    return value if isinstance(value, RateLimiterConfig) else \
        RateLimiterConfig.from_json(value, where)


def _set_section(name: str) -> Callable[[VmSpec, Any], None]:
    def put(spec: VmSpec, value: Any) -> None:
        setattr(spec, name, value)
    return put


# The sections configure() takes, and how each goes into the model.
SECTIONS: dict[str, Callable[[VmSpec, Any], None]] = {
    "boot_source": _set_section("boot_source"),
    "machine_config": _set_section("machine_config"),
    "drive": VmSpec.put_drive,
    "network_interface": VmSpec.put_network_interface,
    "entropy": _set_section("entropy"),
    "vsock": _set_section("vsock"),
    "serial": _set_section("serial"),
    "logger": _set_section("logger"),
    "metrics": _set_section("metrics"),
    "mmds_config": VmSpec.put_mmds_config,
}


# -- the microVM ---------------------------------------------------------------------

class MicroVM(Closeable):
    """A microVM: configured (kwargs or config JSON), then started, paused, resumed,
    stopped; `serial` is its console, `stats` its counters.  Use it as a context
    manager, or call close(): the VM is stopped and every resource released."""

    # What start() builds the VM with: factory(spec, console_capture) (None:
    # pyvmm.builder.LinuxVm); the API tests put a stand-in here to test the
    # lifecycle without booting anything.
    vm_factory: Callable[[VmSpec, ConsoleCapture], Any] | None = None

    def __init__(self, *, kernel: str | os.PathLike | None = None,
                 initrd: str | os.PathLike | None = None, cmdline: str = "",
                 boot_args: str | None = None, vcpus: int = 1, mem_mib: int = 256,
                 drives: list = (), nets: list = (), rng: bool = False,  # type: ignore
                 serial_out_path: str | os.PathLike | None = None,
                 console: str = "none", vm_id: str = DEFAULT_ID,
                 track_dirty_pages: bool = False, vsock: Any = None,
                 spec: VmSpec | None = None, seccomp: Any = True,
                 host_decompress: bool = True,
                 profile_guest: str | os.PathLike | None = None,
                 profile_hz: int | None = None,
                 trace: str | os.PathLike | None = None,
                 trace_limit_mib: int | None = None,
                 mmds: Any = None, mmds_config: Any = None) -> None:
        """Without spec, the keyword arguments build one; without kernel, the
        built-in guest boots (its PVH vmlinux and initramfs).  console is where the
        guest's output also goes: none (default), stdio or file:PATH.  vsock: a
        pyvmm.config.Vsock or its JSON ({"guest_cid": 3, "uds_path": PATH}).
        seccomp: the filters of the VM's own threads (vCPUs, I/O, console writer,
        metrics): True (pyvmm's, the default), False, or a filter file's path
        (docs/seccomp.md).  The caller's threads are never filtered.
        host_decompress=False lets a bzImage decompress its kernel in the guest.
        mmds: the metadata (a JSON object) the guest reads from MMDS at
        169.254.169.254; mmds_config: a pyvmm.mmds.config.MmdsConfig or its JSON
        (Firecracker's PUT /mmds/config); without it, mmds alone serves V2 on
        every network interface."""
        self.seccomp = seccomp_filters.resolve(seccomp)
        # profile_guest: sample every vCPU's RIP and ring into this file while the VM
        # runs, profile_hz times a second (docs/profiler.md; `pyvmm profile` reads it).
        self.profile_guest = profile_guest
        self.profile_hz = profile_hz
        self.profiler = None                 # pyvmm.profiler.recorder.GuestProfiler
        if profile_guest is not None:
            from pyvmm.profiler.recorder import DEFAULT_HZ, check_hz
            self.profile_hz = check_hz(DEFAULT_HZ if profile_hz is None else profile_hz)
        # trace: record every exit into this file, at most trace_limit_mib MiB of it
        # (docs/trace.md; `pyvmm trace` reads it).
        self.trace = trace
        self.tracer = None                   # pyvmm.trace.recorder.TraceRecorder
        self.trace_limit_mib = trace_limit_mib
        if trace is not None:
            from pyvmm.trace.recorder import DEFAULT_LIMIT_MIB, check_limit_mib
            self.trace_limit_mib = check_limit_mib(
                DEFAULT_LIMIT_MIB if trace_limit_mib is None else trace_limit_mib)
        if spec is None:
            if kernel is None:
                from pyvmm import builtin_guest
                guest = builtin_guest.find_guest()
                if guest is None:
                    raise MicroVMError("the built-in guest is not built yet: run "
                                       "`pyvmm guest build`, or pass kernel=")
                kernel, initrd = guest.vmlinux, initrd or guest.initramfs
            spec = VmSpec.build(kernel=kernel, initrd=initrd, cmdline=cmdline,
                                boot_args=boot_args, vcpus=vcpus, mem_mib=mem_mib,
                                drives=drives, nets=nets, rng=rng,
                                serial_out_path=serial_out_path,
                                host_decompress=host_decompress)
            spec.machine_config.track_dirty_pages = track_dirty_pages
            if vsock is not None:
                from pyvmm.config import Vsock
                spec.vsock = vsock if isinstance(vsock, Vsock) else Vsock.from_json(vsock)
            if mmds_config is None and mmds is not None:
                mmds_config = {"version": "V2", "network_interfaces": list(spec.network_interfaces)}
            if mmds_config is not None:
                from pyvmm.mmds.config import MmdsConfig
                spec.put_mmds_config(mmds_config if isinstance(mmds_config, MmdsConfig)
                                     else MmdsConfig.from_json(mmds_config, "mmds_config"))
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", vm_id):
            raise MicroVMError(f"instance id {vm_id!r} is invalid: use 1 to 64 letters, digits "
                               "or dashes")
        if console not in ("stdio", "none") and not (console.startswith("file:") and
                                                      len(console) > 5):
            raise MicroVMError(f"bad --console {console!r}: use stdio, file:PATH or none")
        self.spec = spec
        self.console = console
        self.vm_id = vm_id
        self.capture = ConsoleCapture()
        self.serial = SerialConsole(self.capture, self._send, lambda: self._state == EXITED,
                                    MicroVMError)
        self.api_counters: dict[str, int] = {"requests": 0, "errors": 0}
        self.result = None                   # pyvmm.builder.VmResult once the VM has ended
        self._lock = threading.RLock()
        self._state = NOT_STARTED
        self._vm = None                      # pyvmm.builder.LinuxVm once started
        self._ended = threading.Event()
        self._started = threading.Event()
        self._watcher: threading.Thread | None = None
        self._metrics = None                 # pyvmm.telemetry.MetricsWriter
        self._log_handler: logging.Handler | None = None
        self._closed = False
        self._agents: dict = {}              # vsock port -> pyvmm.agent.client.Agent
        self._mmds = None                    # pyvmm.mmds.store.DataStore, made on first use
        if mmds is not None:
            self.mmds.put(mmds)
        # Firecracker's boot_path: set by any configuration but the process's own
        # (logger, metrics, serial), whatever its values, even if it is refused.
        self._boot_path = False
        try:
            if spec.logger is not None:
                self._apply_logger(spec.logger)
            if spec.metrics is not None:
                self._apply_metrics(spec.metrics)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, source: dict | str | bytes | os.PathLike, **options: Any) -> "MicroVM":
        """From a Firecracker config file's JSON: a dict, a JSON string, or a path."""
        if isinstance(source, (os.PathLike,)):
            spec = VmSpec.from_file(source)
        else:
            spec = VmSpec.from_json(source)
        return cls(spec=spec, **options)

    @classmethod
    def unconfigured(cls, **options: Any) -> "MicroVM":
        """Nothing configured yet: what the API server starts from."""
        return cls(spec=VmSpec(), **options)

    # -- state -----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """Not started, Running, Paused or Exited."""
        return self._state

    @property
    def started(self) -> threading.Event:
        return self._started

    @property
    def pvm(self) -> bool:
        """Whether the host is KVM PVM (known once started)."""
        return bool(self._vm is not None and self._vm.pvm)

    @property
    def notices(self) -> list[str]:
        """One-line facts about this VM for whoever started it (known once started)."""
        return list(getattr(self._vm, "notices", []))

    def _running_vm(self):
        """The built VM, for operations that need one that has not ended."""
        if self._vm is None:
            raise MicroVMError(BEFORE_START)
        if self._state == EXITED:
            raise MicroVMError("the microVM has exited"
                               + (f": {self.result.reason}" if self.result else ""))
        return self._vm

    def _send(self, data: bytes) -> None:
        self._running_vm().send(data)

    # -- configuration before start ------------------------------------------------------

    def configure(self, section: str, value: Any) -> None:
        """Set one section of the configuration (a name of SECTIONS) before start.

        value is the section (pyvmm.config), or a function that builds it: that is
        called only once the state allows the change, so that a request after start
        is refused as such rather than for what its body holds."""
        put = SECTIONS.get(section)
        if put is None:
            raise MicroVMError(f"unknown configuration section {section!r}: use "
                               f"{', '.join(SECTIONS)}")
        with self._lock:
            if self._closed:
                raise MicroVMError("the microVM is closed")
            if self._state != NOT_STARTED:
                raise MicroVMError(AFTER_START)
            if section not in ("logger", "metrics", "serial"):
                self._boot_path = True
            if callable(value):
                value = value()
            if section == "logger":
                self._apply_logger(value)
            elif section == "metrics":
                if self._metrics is not None:
                    raise MicroVMError("the metrics system is already configured")
                self._apply_metrics(value)
            put(self.spec, value)

    def _apply_logger(self, config: Logger) -> None:
        from pyvmm.telemetry import log_handler
        handler = log_handler(config, self.vm_id)
        root = logging.getLogger("pyvmm")
        if self._log_handler is not None:
            root.removeHandler(self._log_handler)
            self._log_handler.close()
        self._log_handler = handler
        if handler is not None:
            root.addHandler(handler)
            root.setLevel(min(root.level or logging.WARNING, handler.level))
        log.info("logger configured: level %s", config.level)

    def _apply_metrics(self, config: Metrics) -> None:
        from pyvmm.telemetry import MetricsWriter, metrics_from_stats
        self._metrics = MetricsWriter(
            config.metrics_path,
            counters=lambda: metrics_from_stats(self.stats, self.api_counters),
            header=lambda: {**({"id": self.vm_id} if config.emit_id else {}),
                            **({"properties": config.properties}
                               if config.properties is not None else {}),
                            "vmm": {"id": self.vm_id, "state": self.state}})
        self._metrics.seccomp = self.seccomp

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Build the VM from the spec and start its vCPUs (InstanceStart)."""
        with self._lock:
            self._check_not_started()
            self.spec.check_startable()
            self._open_console()
            factory = self.vm_factory
            if factory is None:
                from pyvmm.builder import LinuxVm as factory
            self._run(factory(self.spec, self.capture, **self._mmds_option()), paused=False)
            machine = self.spec.machine_config
            log.info("microVM %s started: %d vCPUs, %d MiB, kernel %s", self.vm_id,
                     machine.vcpu_count, machine.mem_size_mib,
                     self.spec.boot_source.kernel_image_path)

    # -- MMDS's data: not configuration (not in GET /vm/config, not in a snapshot) -------

    @property
    def mmds(self):
        """The metadata the guest reads from MMDS (pyvmm.mmds.store.DataStore: put,
        patch as an RFC 7396 merge patch, get), at any time; created on first use, as
        Firecracker's data store is."""
        with self._lock:
            if self._mmds is None:
                from pyvmm.mmds.store import DataStore
                self._mmds = DataStore()
            return self._mmds

    def mmds_if_initialized(self):
        """The data store for the API's /mmds: before start, created on first use;
        after, only a VM serving MMDS has one (Firecracker's runtime finds it through
        the network devices, and answers "not initialized" otherwise)."""
        with self._lock:
            if self._state == NOT_STARTED:
                return self.mmds
            return self._mmds if self.spec.mmds_config is not None else None

    def _mmds_option(self) -> dict:
        """The builder's mmds= argument: the data store, for a VM whose spec serves MMDS."""
        return {} if self.spec.mmds_config is None else {"mmds": self.mmds}

    def _check_not_started(self) -> None:
        if self._closed:
            raise MicroVMError("the microVM is closed")
        if self._state != NOT_STARTED:
            raise MicroVMError(AFTER_START)

    def _open_console(self) -> None:
        serial = self.spec.serial
        self.capture.sink.close()
        self.capture.sink = ConsoleSink(
            f"file:{serial.serial_out_path}" if serial and serial.serial_out_path
            else self.console,
            limit=serial.serial_out_max_bytes if serial else DEFAULT_SERIAL_OUT_MAX_BYTES,
            rate_limiter=_serial_bucket(serial.rate_limiter if serial else None))

    def _run(self, vm: Any, paused: bool) -> None:
        """Start a built VM (booting, or a loaded snapshot) and watch it end."""
        self._vm = vm
        for part in (getattr(vm, "machine", None), getattr(vm, "iothread", None),
                     self.capture.sink):
            if part is not None:
                part.seccomp = self.seccomp     # each of their threads filters itself
        try:
            self._start_profiler(vm)
            self._start_trace(vm)
            vm.start(paused=True) if paused else vm.start()
        except BaseException:
            self._vm = None
            vm.close()
            raise
        self._state = PAUSED if paused else RUNNING
        self._watcher = threading.Thread(target=self._watch, name="vm-watch", daemon=True)
        self._watcher.start()
        if self._metrics is not None:
            self._metrics.start_periodic()
        self._started.set()

    def _start_profiler(self, vm: Any) -> None:
        """Before the vCPUs start; the profiler stops itself when the machine is released."""
        machine = getattr(vm, "machine", None)
        if self.profile_guest is None or machine is None:
            return
        from pyvmm.profiler.recorder import GuestProfiler
        boot = self.spec.boot_source
        self.profiler = GuestProfiler(machine, self.profile_guest, self.profile_hz,
                                      kernel=str(boot.kernel_image_path) if boot else None,
                                      policy=self.seccomp)

    def _start_trace(self, vm: Any) -> None:
        """Before the vCPUs start, after the devices are placed (their names go in the
        trace's header); the recorder stops itself when the machine is released."""
        machine = getattr(vm, "machine", None)
        if self.trace is None or machine is None:
            return
        from pyvmm.trace.recorder import TraceRecorder
        boot = self.spec.boot_source
        self.tracer = TraceRecorder(machine, self.trace, self.trace_limit_mib,
                                    kernel=str(boot.kernel_image_path) if boot else None,
                                    policy=self.seccomp)

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self, snapshot_path: str | os.PathLike, mem_file_path: str | os.PathLike,
                 snapshot_type: str = "Full"):
        """Save the paused microVM (PUT /snapshot/create): the state file and the memory
        file; Diff needs track_dirty_pages.  Returns a pyvmm.snapshot.SnapshotResult."""
        with self._lock:
            vm = self._running_vm()
            if self._state != PAUSED:
                raise MicroVMError(NOT_PAUSED)
            return vm.snapshot(os.fspath(snapshot_path), os.fspath(mem_file_path),
                               snapshot_type)

    def _boot_specific_configured(self) -> bool:
        """Whether anything but the logger and metrics was configured (Firecracker's
        rule for where a snapshot may be loaded)."""
        from pyvmm.config import MachineConfig
        spec = self.spec
        return bool(self._boot_path or spec.boot_source is not None or spec.drives
                    or spec.network_interfaces or spec.entropy is not None
                    or spec.vsock is not None or spec.machine_config != MachineConfig())

    def load_snapshot(self, request) -> None:
        """Restore a snapshot into this unconfigured microVM (PUT /snapshot/load): a
        pyvmm.snapshot.LoadRequest.  It is Paused afterwards, or Running with resume_vm."""
        from pyvmm.builder import LinuxVm
        from pyvmm.kvm import Kvm
        from pyvmm.snapshot import open_snapshot
        with self._lock:
            self._check_not_started()
            if self._boot_specific_configured():
                raise MicroVMError(LOAD_NOT_ALLOWED)
            kvm = Kvm()
            try:
                opened = open_snapshot(request, kvm)
            except BaseException:
                kvm.close()
                raise
            previous = self.spec
            try:
                for name in ("logger", "metrics", "serial"):     # this process's own
                    setattr(opened.spec, name, getattr(self.spec, name))
                self.spec = opened.spec
                self._open_console()
                vm = LinuxVm(self.spec, self.capture, restore=opened, kvm=kvm,
                             **self._mmds_option())
                self._run(vm, paused=not request.resume_vm)
            except BaseException:
                self.spec = previous        # unconfigured still: a load may be tried again
                opened.close()
                kvm.close()
                raise
            log.info("microVM %s restored from %s (%s)", self.vm_id, request.snapshot_path,
                     self._state)

    @classmethod
    def restore(cls, snapshot_path: str | os.PathLike, mem_file_path: str | os.PathLike,
                *, backend_type: str = "File", resume: bool = True,
                track_dirty_pages: bool = False, network_overrides: dict | None = None,
                drive_overrides: dict | None = None, clock_realtime: bool = False,
                vsock_override: str | os.PathLike | None = None,
                **options: Any) -> "MicroVM":
        """A microVM from a snapshot (options as for MicroVM()); mem_file_path is the
        memory file, or with backend_type="Uffd" the page-fault handler's socket.
        network_overrides: iface_id -> TAP; drive_overrides: drive_id -> image (a copy
        of the snapshot's); clock_realtime: the guest's clock jumps to the present;
        vsock_override: the Unix socket of the vsock device instead of the snapshot's."""
        from pyvmm.snapshot import LoadRequest
        vm = cls.unconfigured(**options)
        try:
            vm.load_snapshot(LoadRequest(
                os.fspath(snapshot_path), os.fspath(mem_file_path), backend_type,
                track_dirty_pages, resume, dict(network_overrides or {}), clock_realtime,
                {k: os.fspath(v) for k, v in (drive_overrides or {}).items()},
                vsock_override=os.fspath(vsock_override) if vsock_override else None))
        except BaseException:
            vm.close()
            raise
        return vm

    def _watch(self) -> None:
        result = self._vm.wait()
        with self._lock:
            self.result = result
            self._state = EXITED
        log.info("microVM %s ended: %s (exit code %d)", self.vm_id, result.reason,
                 result.exit_code)
        if self._metrics is not None:
            self._metrics.flush()
        self._ended.set()

    def pause(self) -> None:
        """Stop every vCPU where it is; the guest's clock stops with it."""
        self._pause_or_resume(pause=True)

    def resume(self) -> None:
        self._pause_or_resume(pause=False)

    def _pause_or_resume(self, pause: bool) -> None:
        before, after = (RUNNING, PAUSED) if pause else (PAUSED, RUNNING)
        with self._lock:
            vm = self._running_vm()
            if self._state == after:
                return
            if pause:
                vm.pause()
            else:
                vm.resume()
            if self._state == before:         # the VM may have ended meanwhile
                self._state = after
            log.info("microVM %s %s", self.vm_id, "paused" if pause else "resumed")

    def send_ctrl_alt_del(self) -> None:
        with self._lock:
            self._running_vm().send_ctrl_alt_del()

    def update_drive(self, drive_id: str, path_on_host: str | None,
                     rate_limiter: "RateLimiterConfig | dict | None" = None) -> None:
        """PATCH /drives/{id} after boot: a new backing file for the same drive, and/or
        new rate limiter buckets (those given replace the drive's; a zero one disables)."""
        with self._lock:
            vm = self._running_vm()
            if drive_id not in self.spec.drives:
                raise MicroVMError(f"drive {drive_id!r} does not exist")
            drive = self.spec.drives[drive_id]
            if rate_limiter is not None:
                update = _limiter_update(rate_limiter, f"drive {drive_id}: rate_limiter")
                vm.update_rate_limiter(f"drive:{drive_id}", "rate_limiter", update)
                drive.rate_limiter = (drive.rate_limiter or _NO_LIMIT).patched(update)
            if path_on_host is None:
                return
            vm.update_drive(drive_id, Path(path_on_host))
            drive.path_on_host = path_on_host

    def update_network_interface(self, iface_id: str,
                                 rx_rate_limiter: "RateLimiterConfig | dict | None" = None,
                                 tx_rate_limiter: "RateLimiterConfig | dict | None" = None) \
            -> None:
        """PATCH /network-interfaces/{id} after boot: new rx and/or tx rate limiter
        buckets (those given replace the interface's; a zero one disables)."""
        with self._lock:
            vm = self._running_vm()
            iface = self.spec.network_interfaces.get(iface_id)
            if iface is None:
                raise MicroVMError(f"network interface {iface_id!r} does not exist")
            for name, given in (("rx_rate_limiter", rx_rate_limiter),
                                ("tx_rate_limiter", tx_rate_limiter)):
                if given is None:
                    continue
                update = _limiter_update(given, f"network interface {iface_id}: {name}")
                vm.update_rate_limiter(f"net:{iface_id}", name, update)
                setattr(iface, name, (getattr(iface, name) or _NO_LIMIT).patched(update))

    def flush_metrics(self) -> None:
        with self._lock:
            if self._metrics is not None:
                self._metrics.flush()

    def stop(self) -> None:
        """Stop the vCPUs (from any thread); wait() then returns exit code 0."""
        with self._lock:
            vm = self._vm
        if vm is not None and self._state != EXITED:
            vm.stop()

    def wait(self, timeout: float | None = None):
        """The VmResult once the VM has ended, or None after timeout seconds."""
        if self._vm is None:
            raise MicroVMError(BEFORE_START)
        if not self._ended.wait(timeout):
            return None
        return self.result

    # -- the guest agent (pyvmm-agent, over vsock) ------------------------------------------

    def agent(self, port: int = 1024, timeout: float = 10.0):
        """The pyvmm.agent.client.Agent of the guest's agent, through this VM's vsock
        device (Firecracker's CONNECT protocol on its uds_path).  The first call waits up
        to timeout seconds for the agent to answer (AgentError if it does not); later
        calls reuse that Agent, which opens a connection per operation."""
        from pyvmm.agent.client import Agent
        vsock = self.spec.vsock
        if vsock is None:
            raise MicroVMError("this microVM has no vsock device, so no guest agent can be "
                               "reached: configure one (vsock=, --vsock or PUT /vsock)")
        self._running_vm()
        if port not in self._agents:
            self._agents[port] = Agent.over_vsock(vsock.uds_path, port, connect_timeout=timeout,
                                                  alive=lambda: self._state != EXITED)
        return self._agents[port]

    def exec(self, argv: list[str], **options: Any):
        """Run argv in the guest through its agent, to the end: an ExecResult with stdout,
        stderr and exit_code (options: env, cwd, stdin, timeout, pty)."""
        return self.agent().exec(list(argv), **options)

    def exec_stream(self, argv: list[str], **options: Any):
        """Start argv in the guest and stream it (the agent client's Process)."""
        return self.agent().start(list(argv), **options)

    def write_file(self, path: str, data: Any, mode: int = 0o644) -> None:
        """Write a guest file (bytes or a binary file object), parent directories made."""
        self.agent().put_file(path, data, mode=mode, mkdirs=True)

    def read_file(self, path: str, out: Any = None) -> bytes | None:
        """A guest file's bytes (or, given out, streamed into that binary file)."""
        return self.agent().get_file(path, out)

    @property
    def stats(self) -> dict:
        """Exit counters per vCPU and device, serial bytes, PVM fix-ups ({} before start)."""
        vm = self._vm
        return vm.stats() if vm is not None else {}

    def config_json(self) -> dict:
        return self.spec.to_json()

    def close(self) -> None:
        """Stop the VM if it runs and release everything; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        vm = self._vm
        if vm is not None:
            if self._state != EXITED:
                vm.stop()
                self._ended.wait(30)
            vm.close()
        self.capture.close()
        if self._metrics is not None:
            self._metrics.close()
        if self._log_handler is not None:
            logging.getLogger("pyvmm").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None


    def __repr__(self) -> str:
        return f"<MicroVM {self.vm_id} {self.state}>"


__all__ = ["MicroVM", "MicroVMError", "SECTIONS"]

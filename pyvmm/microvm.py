r"""MicroVM: a Linux microVM's whole life from Python.

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
they are thin layers over this class.
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pyvmm.config import (BootSource, ConfigError, Drive, Entropy, Logger, MachineConfig,
                          Metrics, NetworkInterface, SerialConfig, VmSpec, Vsock)
from pyvmm.errors import PyvmmError

DEFAULT_ID = "anonymous-instance"         # Firecracker's, without --id
TRANSCRIPT_LIMIT = 4 << 20                # console bytes kept for read() and expect()
METRICS_PERIOD = 60.0                     # seconds, as in Firecracker
NOT_STARTED, RUNNING, PAUSED, EXITED = "Not started", "Running", "Paused", "Exited"
BEFORE_START = "The requested operation is not supported before starting the microVM."
AFTER_START = "The requested operation is not supported after starting the microVM."

log = logging.getLogger("pyvmm.microvm")
# Nothing is logged anywhere until PUT /logger (or a logger section) says where, as in
# Firecracker; without this, Python would print warnings on stderr.
logging.getLogger("pyvmm").addHandler(logging.NullHandler())


class MicroVMError(PyvmmError):
    """An operation that the microVM's state does not allow, or that failed."""


# -- the serial console ---------------------------------------------------------------

class Transcript:
    """Everything the guest wrote to its serial console, with absolute positions
    (the oldest bytes are dropped past TRANSCRIPT_LIMIT)."""

    def __init__(self, limit: int = TRANSCRIPT_LIMIT) -> None:
        self.limit = limit
        self.base = 0                       # absolute position of data[0]
        self.data = bytearray()
        self.lock = threading.Lock()

    def tee(self, sink: Callable[[bytes], None]) -> Callable[[bytes], None]:
        def output(data: bytes) -> None:
            sink(data)
            self.append(data)
        return output

    def append(self, data: bytes) -> None:
        with self.lock:
            self.data += data
            excess = len(self.data) - self.limit
            if excess > 0:
                del self.data[:excess]
                self.base += excess

    @property
    def end(self) -> int:
        with self.lock:
            return self.base + len(self.data)

    def since(self, position: int) -> tuple[int, bytes]:
        """(the position actually read from, the bytes from there to the end)."""
        with self.lock:
            start = max(position, self.base)
            return start, bytes(self.data[start - self.base:])


class SerialConsole:
    """The guest's COM1: read() what it wrote, write() what it reads, expect() a regex."""

    def __init__(self, vm: "MicroVM") -> None:
        self._vm = vm
        self.transcript = Transcript()
        self.position = 0                   # where read() and expect() start by default

    def read(self) -> bytes:
        """The output since the last read() or expect(); moves past it."""
        start, data = self.transcript.since(self.position)
        self.position = start + len(data)
        return data

    def write(self, data: bytes | str) -> None:
        """Bytes for the guest to read (what a user would type)."""
        if isinstance(data, str):
            data = data.encode()
        self._vm._linux_vm(started=True).send(data)

    def expect(self, pattern: bytes | str | re.Pattern, timeout: float = 30.0,
               since: int | None = None) -> re.Match:
        """Wait for a regex over the output since `since` (default: the end of the last
        read() or expect()); returns the match (bytes) and moves past it.  Raises
        MicroVMError at timeout or when the VM ends without a match."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        regex = re.compile(pattern) if not isinstance(pattern, re.Pattern) else pattern
        start = self.position if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            ended = self._vm.state == EXITED
            first, data = self.transcript.since(start)
            match = regex.search(data)
            if match:
                self.position = first + match.end()
                return match
            if ended or time.monotonic() >= deadline:
                tail = data[-2000:].decode(errors="replace")
                why = "the VM ended" if ended else f"{timeout:g} s passed"
                raise MicroVMError(f"{regex.pattern!r} did not appear on the serial console "
                                   f"before {why}; its last output:\n{tail}")
            time.sleep(0.02)


# -- metrics and logs ---------------------------------------------------------------------

def _open_output(path: str) -> int:
    """A file (appended to, created if missing) or a FIFO (opened read-write, so that
    opening never blocks and writes never fail for lack of a reader)."""
    try:
        st = os.stat(path)
        fifo = stat.S_ISFIFO(st.st_mode)
    except FileNotFoundError:
        fifo = False
    flags = (os.O_RDWR if fifo else os.O_WRONLY | os.O_APPEND | os.O_CREAT) | \
        os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc.strerror}") from None


def _write_line(fd: int, line: str) -> bool:
    try:
        os.write(fd, line.encode() + b"\n")
        return True
    except OSError:
        return False            # a full FIFO nobody reads, a full disk...: drop the line


def _delta(now: Any, before: Any) -> Any:
    """Counters since the last flush (Firecracker's metrics are per-period deltas)."""
    if isinstance(now, dict):
        before = before if isinstance(before, dict) else {}
        return {k: _delta(v, before.get(k)) for k, v in now.items()}
    if isinstance(now, list):
        before = before if isinstance(before, list) else []
        return [_delta(v, before[i] if i < len(before) else None) for i, v in enumerate(now)]
    if isinstance(now, (int, float)) and not isinstance(now, bool) and \
            isinstance(before, (int, float)):
        return now - before
    return now


class MetricsWriter:
    """Newline-delimited JSON to a file or FIFO: one line per flush, with the counters
    of the period since the previous line."""

    def __init__(self, path: str, vm: "MicroVM") -> None:
        self.fd = _open_output(path)
        self.vm = vm
        self.last: dict = {}
        self.lock = threading.Lock()
        self.lines = self.dropped = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def snapshot(self) -> dict:
        stats = self.vm.stats if self.vm.state != NOT_STARTED else {}
        per_vcpu = stats.get("vcpus", [])
        devices = {name: {"requests": count} for name, count in stats.get("devices", {}).items()}
        if "serial" in devices:
            devices["serial"]["tx_bytes"] = stats.get("serial_tx_bytes", 0)
        for name, counters in stats.get("virtio", {}).items():      # bytes, requests...
            devices.setdefault(name[:23], {}).update(counters)
        extra = {k: v for k, v in stats.items()
                 if k not in ("vcpus", "devices", "serial_tx_bytes", "virtio")}
        return {"vcpus": [{"exits": counts} for counts in per_vcpu], "devices": devices,
                **extra, "api_server": dict(self.vm.api_counters)}

    def flush(self) -> None:
        with self.lock:
            if self.fd < 0:
                return
            now = self.snapshot()
            line = {"utc_timestamp_ms": int(time.time() * 1000),
                    "vmm": {"id": self.vm.vm_id, "state": self.vm.state},
                    **_delta(now, self.last)}
            self.last = now
            if _write_line(self.fd, json.dumps(line, separators=(",", ":"))):
                self.lines += 1
            else:
                self.dropped += 1

    def start_periodic(self, period: float = METRICS_PERIOD) -> None:
        def loop() -> None:
            while not self._stop.wait(period):
                self.flush()
        self._thread = threading.Thread(target=loop, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


LEVELS = {"Error": logging.ERROR, "Warning": logging.WARNING, "Info": logging.INFO,
          "Debug": logging.DEBUG, "Trace": 5, "Off": logging.CRITICAL + 10}


class _FdHandler(logging.Handler):
    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_line(self.fd, self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the VMM
            pass

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _log_handler(config: Logger, vm_id: str) -> logging.Handler | None:
    if config.log_path is None:
        return None
    handler = _FdHandler(_open_output(config.log_path))
    parts = f"{vm_id}:%(threadName)s" + (":%(levelname)s" if config.show_level else "") + \
        (":%(pathname)s:%(lineno)d" if config.show_log_origin else "")
    handler.setFormatter(logging.Formatter(f"%(asctime)s [{parts}] %(message)s"))
    handler.setLevel(LEVELS[config.level])
    if config.module:
        handler.addFilter(logging.Filter(config.module))
    return handler


# -- the microVM ---------------------------------------------------------------------

class MicroVM:
    """A microVM: configured (kwargs or config JSON), then started, paused, resumed,
    stopped; `serial` is its console, `stats` its counters.  Use it as a context
    manager, or call close(): the VM is stopped and every resource released."""

    # What start() builds from the pyvmm.vmm.VmConfig (None: pyvmm.vmm.LinuxVm); the
    # API tests put a stand-in here to test the lifecycle without booting anything.
    vm_factory: Callable[[Any], Any] | None = None

    def __init__(self, *, kernel: str | os.PathLike | None = None,
                 initrd: str | os.PathLike | None = None, cmdline: str = "",
                 boot_args: str | None = None, vcpus: int = 1, mem_mib: int = 256,
                 drives: list = (), nets: list = (), rng: bool = False,  # type: ignore
                 serial_out_path: str | os.PathLike | None = None,
                 console: str = "none", vm_id: str = DEFAULT_ID,
                 spec: VmSpec | None = None) -> None:
        """Without spec, the keyword arguments build one; without kernel, the
        built-in guest boots (its PVH vmlinux and initramfs).  console is where the
        guest's output also goes: none (default), stdio or file:PATH."""
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
                                serial_out_path=serial_out_path)
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", vm_id):
            raise MicroVMError(f"instance id {vm_id!r} is invalid: use 1 to 64 letters, digits "
                               "or dashes")
        if console not in ("stdio", "none") and not (console.startswith("file:") and
                                                      len(console) > 5):
            raise MicroVMError(f"bad --console {console!r}: use stdio, file:PATH or none")
        self.spec = spec
        self.console = console
        self.vm_id = vm_id
        self.serial = SerialConsole(self)
        self.api_counters: dict[str, int] = {"requests": 0, "errors": 0}
        self.result = None                   # pyvmm.vmm.VmResult once the VM has ended
        self._lock = threading.RLock()
        self._state = NOT_STARTED
        self._vm = None                      # pyvmm.vmm.LinuxVm once started
        self._ended = threading.Event()
        self._started = threading.Event()
        self._watcher: threading.Thread | None = None
        self._metrics: MetricsWriter | None = None
        self._log_handler: logging.Handler | None = None
        self._closed = False
        try:
            if spec.logger is not None:
                self._apply_logger(spec.logger)
            if spec.metrics is not None:
                self._metrics = MetricsWriter(spec.metrics.metrics_path, self)
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

    def _linux_vm(self, started: bool):
        if self._vm is None:
            raise MicroVMError(BEFORE_START)
        if self._state == EXITED:
            raise MicroVMError("the microVM has exited"
                               + (f": {self.result.reason}" if self.result else ""))
        return self._vm

    def _preboot(self) -> None:
        if self._closed:
            raise MicroVMError("the microVM is closed")
        if self._state != NOT_STARTED:
            raise MicroVMError(AFTER_START)

    # -- configuration before start ------------------------------------------------------

    def set_boot_source(self, boot: BootSource) -> None:
        with self._lock:
            self._preboot()
            self.spec.boot_source = boot

    def set_machine_config(self, machine: MachineConfig) -> None:
        with self._lock:
            self._preboot()
            self.spec.machine_config = machine

    def put_drive(self, drive: Drive) -> None:
        with self._lock:
            self._preboot()
            self.spec.put_drive(drive)

    def put_network_interface(self, iface: NetworkInterface) -> None:
        with self._lock:
            self._preboot()
            self.spec.put_network_interface(iface)

    def set_entropy(self, entropy: Entropy) -> None:
        with self._lock:
            self._preboot()
            self.spec.entropy = entropy

    def set_vsock(self, vsock: Vsock) -> None:
        with self._lock:
            self._preboot()
            self.spec.vsock = vsock

    def set_serial(self, serial: SerialConfig) -> None:
        with self._lock:
            self._preboot()
            self.spec.serial = serial

    def set_logger(self, logger: Logger) -> None:
        with self._lock:
            self._preboot()
            self._apply_logger(logger)
            self.spec.logger = logger

    def set_metrics(self, metrics: Metrics) -> None:
        with self._lock:
            self._preboot()
            if self._metrics is not None:
                raise MicroVMError("the metrics system is already configured")
            self._metrics = MetricsWriter(metrics.metrics_path, self)
            self.spec.metrics = metrics

    def _apply_logger(self, config: Logger) -> None:
        handler = _log_handler(config, self.vm_id)
        root = logging.getLogger("pyvmm")
        if self._log_handler is not None:
            root.removeHandler(self._log_handler)
            self._log_handler.close()
        self._log_handler = handler
        if handler is not None:
            root.addHandler(handler)
            root.setLevel(min(root.level or logging.WARNING, handler.level))
        log.info("logger configured: level %s", config.level)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Build the VM from the spec and start its vCPUs (InstanceStart)."""
        with self._lock:
            self._preboot()
            config = self.spec.to_vm_config(self.console)
            factory = self.vm_factory
            if factory is None:
                from pyvmm.vmm import LinuxVm as factory
            vm = factory(config)
            vm.serial.output = self.serial.transcript.tee(vm.serial.output)
            self._vm = vm
            try:
                vm.start()
            except BaseException:
                self._vm = None
                vm.close()
                raise
            self._state = RUNNING
            log.info("microVM %s started: %d vCPUs, %d MiB, kernel %s", self.vm_id,
                     config.vcpus, config.mem_mib, config.kernel)
            self._watcher = threading.Thread(target=self._watch, name="vm-watch", daemon=True)
            self._watcher.start()
            if self._metrics is not None:
                self._metrics.start_periodic()
            self._started.set()

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
        with self._lock:
            vm = self._linux_vm(started=True)
            if self._state == PAUSED:
                return
            vm.pause()
            if self._state == RUNNING:        # the VM may have ended meanwhile
                self._state = PAUSED
            log.info("microVM %s paused", self.vm_id)

    def resume(self) -> None:
        with self._lock:
            vm = self._linux_vm(started=True)
            if self._state == RUNNING:
                return
            vm.resume()
            if self._state == PAUSED:
                self._state = RUNNING
            log.info("microVM %s resumed", self.vm_id)

    def send_ctrl_alt_del(self) -> None:
        with self._lock:
            self._linux_vm(started=True).send_ctrl_alt_del()

    def update_drive(self, drive_id: str, path_on_host: str | None) -> None:
        """PATCH /drives/{id} after boot: a new backing file for the same drive."""
        with self._lock:
            vm = self._linux_vm(started=True)
            if drive_id not in self.spec.drives:
                raise MicroVMError(f"drive {drive_id!r} does not exist")
            if path_on_host is None:
                return
            update = getattr(vm, "update_drive", None)
            if update is None:
                raise MicroVMError("updating a drive after boot is not supported yet")
            update(drive_id, Path(path_on_host))
            self.spec.drives[drive_id].path_on_host = path_on_host

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
        if self._metrics is not None:
            self._metrics.close()
        if self._log_handler is not None:
            logging.getLogger("pyvmm").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def __enter__(self) -> "MicroVM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MicroVM {self.vm_id} {self.state}>"


__all__ = ["MicroVM", "MicroVMError", "SerialConsole"]

"""Recording a guest profile while a Machine runs.

Mechanism in C (csrc/vcpu_loop.c): pv_sampler_run() sleeps to each tick and
sample-kicks every vCPU; each vCPU thread reads its RIP and CPL into its own ring.
Policy here: the rate, the ring size, and a thread (pv-profiler) that runs the C
sampler in bursts of ticks and, between bursts, drains the rings into the file.
That thread takes the vCPU seccomp filter: it needs nothing a vCPU thread may not do
(sleep, tgkill with the kick signal, write to the file it was handed open).
"""
from __future__ import annotations

import datetime
import logging
import os
import threading
from pathlib import Path
from typing import Any

from pyvmm import seccomp
from pyvmm.errors import PyvmmError
from pyvmm.kvm import ffi, lib
from pyvmm.profiler.fileformat import ProfileHeader, dropped_record, header_line

log = logging.getLogger("pyvmm.profiler")

DEFAULT_HZ = 250
MAX_HZ = 10_000
DRAIN_INTERVAL_S = 0.1          # how often the rings are drained into the file
DRAIN_BATCH = 4096


class ProfilerError(PyvmmError):
    """Profiling could not start (a bad rate, an unwritable file)."""


def check_hz(hz: int) -> int:
    if type(hz) is not int or not 1 <= hz <= MAX_HZ:
        raise ProfilerError(f"bad profiling rate {hz!r}: use 1 to {MAX_HZ} samples per second")
    return hz


class GuestProfiler:
    """Samples every vCPU of a machine at hz into path until stop().

    Attach it before machine.start() (it may also come later); it stops by itself
    when the machine is released, after the vCPU threads have ended and before their
    rings are freed, so that no sample is lost."""

    def __init__(self, machine: Any, path: str | os.PathLike, hz: int = DEFAULT_HZ,
                 kernel: str | None = None, policy: seccomp.Policy | None = None) -> None:
        self.hz = check_hz(hz)
        self.path = Path(path)
        self.machine = machine
        self.policy = policy
        vcpus = machine.vcpus
        # The file first: once a vCPU has a ring, this object must live as long as it.
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                               0o644)
        except OSError as exc:
            raise ProfilerError(f"cannot write the profile {path}: "
                                f"{exc.strerror or exc}") from None
        # Rings hold two drain intervals, so a slow writer drops nothing.
        capacity = max(256, int(2 * DRAIN_INTERVAL_S * hz) + 64)
        # The rings are ours, not the vCPUs': Machine.close() destroys the vCPUs before
        # the release callbacks run, and the last samples are drained after that.
        self._rings = [ffi.new("struct pv_sample_ring *") for _ in vcpus]
        self._ring_samples = [ffi.new("struct pv_sample[]", capacity) for _ in vcpus]
        for vcpu, ring, samples in zip(vcpus, self._rings, self._ring_samples):
            ring.samples, ring.capacity = samples, capacity
            rc = lib.pv_vcpu_sampling_enable(vcpu._native, ring)
            if rc < 0:
                os.close(self._fd)
                raise ProfilerError(f"cannot sample vCPU {vcpu.index}: {os.strerror(-rc)}")
        self._vcpu_array = ffi.new("struct pv_vcpu *[]", [v._native for v in vcpus])
        self._sampler = ffi.new("struct pv_sampler *")
        self._sampler.period_ns = 1_000_000_000 // self.hz
        self._batch = ffi.new("struct pv_sample[]", DRAIN_BATCH)
        self.header = ProfileHeader(
            hz=self.hz, vcpus=len(vcpus), start_ns=lib.pv_monotonic_ns(),
            start_time=datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            kernel=kernel)
        self._write(header_line(self.header))
        self._thread = threading.Thread(target=self._run, name="profiler", daemon=True)
        self._stopped = False
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._thread.start()
        machine.at_release(self.stop)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _run(self) -> None:
        try:
            seccomp.enter_thread("vcpu", self.policy, "profiler")
            ticks = max(1, int(self.hz * DRAIN_INTERVAL_S))
            while not self._sampler.stop:
                lib.pv_sampler_run(self._sampler, self._vcpu_array, len(self._vcpu_array), ticks)
                self._drain()
            self._drain()
            now = lib.pv_monotonic_ns()
            self._write(b"".join(dropped_record(index, ring.dropped, now)
                                 for index, ring in enumerate(self._rings) if ring.dropped))
        except BaseException as exc:  # noqa: BLE001 - reported by stop(), not lost
            self.error = exc
            log.error("the guest profiler failed: %r", exc)
        finally:
            os.close(self._fd)

    def _drain(self) -> None:
        for ring in self._rings:
            while True:
                n = lib.pv_samples_drain(ring, self._batch, DRAIN_BATCH)
                if n:
                    self._write(ffi.buffer(self._batch, n * ffi.sizeof("struct pv_sample"))[:])
                if n < DRAIN_BATCH:
                    break

    def stop(self, timeout: float = 5.0) -> None:
        """Take the last samples, write them and close the file; safe to call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._sampler.stop = 1
        self._thread.join(timeout)

    @property
    def stats(self) -> dict[str, int]:
        return {"samples": sum(ring.taken for ring in self._rings),
                "dropped": sum(ring.dropped for ring in self._rings),
                "ticks": self._sampler.ticks, "late_ticks": self._sampler.late_ticks}

"""Recording an exit trace while a Machine runs.

Mechanism in C (csrc/vcpu_loop.c): each vCPU thread appends one record per exit to
its own ring.  Policy here: the ring size, the file and its size limit, and a thread
(pv-trace) that drains the rings into the file every DRAIN_INTERVAL_S.  That thread
takes the vCPU seccomp filter: it needs nothing a vCPU thread may not do (sleep, a
futex, write to the file it was handed open).
"""
from __future__ import annotations

import datetime
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvmm import seccomp
from pyvmm.errors import PyvmmError
from pyvmm.kvm import ffi, lib
from pyvmm.trace.fileformat import (BUS_NAMES, DEFAULT_LIMIT_MIB, KIND_DROPPED, KIND_END,
                                    KIND_OVER_LIMIT, RECORD, DeviceRange, TraceHeader,
                                    header_line, trailer_record)

log = logging.getLogger("pyvmm.trace")

MiB = 1 << 20
MAX_LIMIT_MIB = 1 << 20
# A ring holds 64 Ki exits (2.5 MiB a vCPU): at PVM's ~150k exits/s, 8 drain intervals.
DEFAULT_RING_RECORDS = 1 << 16
DRAIN_INTERVAL_S = 0.05
DRAIN_BATCH = 4096
TRAILER_RESERVE = 8              # records kept free under the limit for the trailer


class TraceRecorderError(PyvmmError):
    """Tracing could not start (an unwritable file, a bad limit)."""


def check_limit_mib(limit_mib: int) -> int:
    if type(limit_mib) is not int or not 1 <= limit_mib <= MAX_LIMIT_MIB:
        raise TraceRecorderError(f"bad trace file limit {limit_mib!r}: use 1 to "
                                 f"{MAX_LIMIT_MIB} MiB")
    return limit_mib


@dataclass(frozen=True)
class TraceStats:
    recorded: int        # exits the vCPUs put in their rings
    dropped: int         # exits lost: a ring was full
    written: int         # exit records in the file
    over_limit: int      # exits drained but not written: the file reached its limit

    @property
    def limit_hit(self) -> bool:
        return self.over_limit > 0

    def as_json(self) -> dict[str, int]:
        return {"recorded": self.recorded, "dropped": self.dropped, "written": self.written,
                "over_limit": self.over_limit}


class TraceRecorder:
    """Traces every exit of every vCPU of a machine into path until stop().

    Attach it before machine.start(), after its devices are added (their names go in
    the header); it stops by itself when the machine is released, after the vCPU
    threads have ended and before anything is freed, so no exit is lost."""

    def __init__(self, machine: Any, path: str | os.PathLike,
                 limit_mib: int = DEFAULT_LIMIT_MIB, ring_records: int = DEFAULT_RING_RECORDS,
                 kernel: str | None = None, policy: seccomp.Policy | None = None,
                 drain_interval_s: float = DRAIN_INTERVAL_S) -> None:
        self.path = Path(path)
        self.drain_interval_s = drain_interval_s
        self.policy = policy
        self.limit_bytes = check_limit_mib(limit_mib) * MiB
        if not 1 <= ring_records <= 1 << 24:
            raise TraceRecorderError(f"bad ring size {ring_records}")
        vcpus = machine.vcpus
        # The file first: once a vCPU has a ring, this object must live as long as it.
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                               0o644)
        except OSError as exc:
            raise TraceRecorderError(f"cannot write the trace {path}: "
                                     f"{exc.strerror or exc}") from None
        self.header = TraceHeader(
            vcpus=len(vcpus), start_ns=lib.pv_monotonic_ns(), devices=_devices(machine),
            limit_bytes=self.limit_bytes, kernel=kernel,
            start_time=datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="milliseconds"))
        head = header_line(self.header)
        self._write(head)
        # Exit records may fill the file up to here; the trailer always fits after them.
        self._room = self.limit_bytes - len(head) - (TRAILER_RESERVE + len(vcpus)) * RECORD.size
        self._written = 0
        self._over_limit = 0
        # The rings are ours, not the vCPUs': Machine.close() destroys the vCPUs before
        # the release callbacks run, and the last records are drained after that.
        self._rings = [ffi.new("struct pv_trace_ring *") for _ in vcpus]
        self._ring_recs = [ffi.new("struct pv_trace_rec[]", ring_records) for _ in vcpus]
        for vcpu, ring, recs in zip(vcpus, self._rings, self._ring_recs):
            ring.recs, ring.capacity = recs, ring_records
            rc = lib.pv_vcpu_trace_enable(vcpu._native, ring)
            if rc < 0:
                os.close(self._fd)
                raise TraceRecorderError(f"cannot trace vCPU {vcpu.index}: {os.strerror(-rc)}")
        self._batch = ffi.new("struct pv_trace_rec[]", DRAIN_BATCH)
        self._stop = threading.Event()
        self._stopped = False
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="trace", daemon=True)
        self._thread.start()
        machine.at_release(self.stop)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _run(self) -> None:
        try:
            seccomp.enter_thread("vcpu", self.policy, "trace")
            while not self._stop.wait(self.drain_interval_s):
                self._drain()
            self._drain()
            self._write(self._trailer())
        except BaseException as exc:  # noqa: BLE001 - reported by stop(), not lost
            self.error = exc
            log.error("the exit trace failed: %r", exc)
        finally:
            os.close(self._fd)

    def _drain(self) -> None:
        size = RECORD.size
        for ring in self._rings:
            while True:
                n = lib.pv_trace_drain(ring, self._batch, DRAIN_BATCH)
                fits = min(n, max(0, self._room - self._written * size) // size)
                if fits:
                    self._write(ffi.buffer(self._batch, fits * size)[:])
                    self._written += fits
                self._over_limit += n - fits
                if n < DRAIN_BATCH:
                    break

    def _trailer(self) -> bytes:
        now = lib.pv_monotonic_ns()
        records = [trailer_record(KIND_DROPPED, ring.dropped, now, index)
                   for index, ring in enumerate(self._rings) if ring.dropped]
        if self._over_limit:
            records.append(trailer_record(KIND_OVER_LIMIT, self._over_limit, now))
        records.append(trailer_record(KIND_END, self._written, now))
        return b"".join(records)

    def stop(self, timeout: float = 10.0) -> None:
        """Drain the last records, write the trailer and close the file; safe to call
        twice.  Call it once the vCPUs are out of the guest (Machine.at_release does)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._stop.set()
        self._thread.join(timeout)

    @property
    def stats(self) -> TraceStats:
        return TraceStats(recorded=sum(ring.recorded for ring in self._rings),
                          dropped=sum(ring.dropped for ring in self._rings),
                          written=self._written, over_limit=self._over_limit)


def _devices(machine: Any) -> dict[str, list[DeviceRange]]:
    """Each bus's devices by range index: the C bus and Machine.bindings are both
    sorted by base address, so a binding's position is its range index."""
    return {BUS_NAMES[bus]: [DeviceRange(b.name, b.base, b.length) for b in bindings]
            for bus, bindings in machine.bindings.items()}

"""The exit trace file (docs/trace.md): one JSON header line, then fixed-size binary
records, each a csrc/pyvmm.h struct pv_trace_rec, little-endian, ended by one END
record that counts the exit records before it.

Reading streams the records in chunks, so memory stays bounded whatever the file's
size, and is defensive: the file may be truncated, corrupt or hostile, and anything
wrong is one TraceError line, never another exception.
"""
from __future__ import annotations

import io
import json
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from pyvmm.errors import PyvmmError

FORMAT_NAME = "pyvmm-exit-trace"
VERSION = 1
# struct pv_trace_rec: t_ns addr value handler_ns vcpu reason range count bus size is_write kind
RECORD = struct.Struct("<QQQIHHhHBBBB")
RECORD_LAYOUT = "<QQQIHHhHBBBB t_ns addr value handler_ns vcpu reason range count bus size " \
                "is_write kind"
KIND_EXIT, KIND_DROPPED, KIND_OVER_LIMIT, KIND_END = 0, 1, 2, 3
BUS_PIO, BUS_MMIO, NO_BUS = 0, 1, 255
BUS_NAMES = ("pio", "mmio")
IO_SIZES = (1, 2, 4, 8)
MAX_HEADER_BYTES = 64 * 1024
MAX_VCPUS = 1024
MAX_RANGES = 64                 # PV_MAX_RANGES: devices per bus
MAX_NAME = 64
DEFAULT_LIMIT_MIB = 256         # the writer's default file limit: ~6.7 million exits
READ_RECORDS = 16384            # records per read: 640 KiB of the file at a time


class TraceError(PyvmmError):
    """A trace file that cannot be read; the message is one line."""


@dataclass(frozen=True)
class DeviceRange:
    name: str
    base: int
    length: int


@dataclass
class TraceHeader:
    vcpus: int
    start_ns: int                 # CLOCK_MONOTONIC of the start; records are absolute
    devices: dict[str, list[DeviceRange]] = field(default_factory=dict)  # bus -> by range index
    limit_bytes: int = 0          # the file's size limit when it was written (0: none)
    start_time: str = ""          # the wall clock then, ISO 8601 (for people)
    kernel: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": VERSION, "vcpus": self.vcpus,
                "start_ns": self.start_ns, "start_time": self.start_time,
                "kernel": self.kernel, "limit_bytes": self.limit_bytes,
                "devices": {bus: [{"name": d.name, "base": d.base, "length": d.length}
                                  for d in self.devices.get(bus, [])] for bus in BUS_NAMES},
                "record": RECORD_LAYOUT}

    def device_name(self, bus: int, index: int) -> str | None:
        if bus not in (BUS_PIO, BUS_MMIO) or index < 0:
            return None
        ranges = self.devices.get(BUS_NAMES[bus], [])
        return ranges[index].name if index < len(ranges) else None


@dataclass(frozen=True)
class ExitRecord:
    """One exit, as Python users of the trace see it (iter_exits)."""
    t_ns: int                     # since the trace's start
    vcpu: int
    reason: int                   # KVM_EXIT_*
    bus: str | None               # "pio", "mmio", or None for other exits
    addr: int
    size: int
    is_write: bool
    value: int
    count: int
    device: str | None
    handler_ns: int


@dataclass
class TraceFooter:
    """What the trace's trailing records say about exits that are not in it."""
    dropped: dict[int, int] = field(default_factory=dict)   # vCPU -> exits lost (ring full)
    over_limit: int = 0           # exits not written: the file reached its limit
    exits: int = 0                # exit records in the file (the END record's count)


def header_line(header: TraceHeader) -> bytes:
    return json.dumps(header.to_json(), sort_keys=True).encode() + b"\n"


def trailer_record(kind: int, value: int, t_ns: int, vcpu: int = 0) -> bytes:
    """A DROPPED, OVER_LIMIT or END record (written by Python at the end)."""
    return RECORD.pack(t_ns, 0, value, 0, vcpu, 0, -1, 0, NO_BUS, 0, 0, kind)


# -- reading ---------------------------------------------------------------------------------

def _int_field(data: dict, name: str, low: int, high: int, source: str) -> int:
    value = data.get(name)
    if type(value) is not int or not low <= value <= high:
        raise TraceError(f"{source}: header field {name!r} must be an integer from {low} "
                         f"to {high}, not {value!r:.40}")
    return value


def _devices(data: Any, source: str) -> dict[str, list[DeviceRange]]:
    if not isinstance(data, dict):
        raise TraceError(f"{source}: header field 'devices' must be an object")
    devices: dict[str, list[DeviceRange]] = {}
    for bus in BUS_NAMES:
        ranges = data.get(bus, [])
        if not isinstance(ranges, list) or len(ranges) > MAX_RANGES:
            raise TraceError(f"{source}: header field 'devices.{bus}' must be a list of at "
                             f"most {MAX_RANGES} devices")
        devices[bus] = []
        for entry in ranges:
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
                raise TraceError(f"{source}: a device in 'devices.{bus}' has no name of 1 to "
                                 f"{MAX_NAME} characters")
            base = _int_field(entry, "base", 0, 2**64 - 1, source)
            length = _int_field(entry, "length", 1, 2**64, source)
            devices[bus].append(DeviceRange(name, base, length))
    return devices


def parse_header(line: bytes, source: str) -> TraceHeader:
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TraceError(f"{source}: not a pyvmm exit trace (the first line is not a JSON "
                         "header)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise TraceError(f"{source}: not a pyvmm exit trace (no \"format\": "
                         f"\"{FORMAT_NAME}\" in its header)")
    if data.get("version") != VERSION:
        raise TraceError(f"{source}: trace version {data.get('version')!r:.20} is not "
                         f"supported (this pyvmm reads version {VERSION})")
    kernel = data.get("kernel")
    start_time = data.get("start_time", "")
    if kernel is not None and not isinstance(kernel, str):
        raise TraceError(f"{source}: header field 'kernel' must be a string or null")
    if not isinstance(start_time, str):
        raise TraceError(f"{source}: header field 'start_time' must be a string")
    return TraceHeader(vcpus=_int_field(data, "vcpus", 1, MAX_VCPUS, source),
                       start_ns=_int_field(data, "start_ns", 0, 2**64 - 1, source),
                       devices=_devices(data.get("devices", {}), source),
                       limit_bytes=_int_field(data, "limit_bytes", 0, 2**63, source),
                       start_time=start_time, kernel=kernel)


RawRecord = tuple[int, int, int, int, int, int, int, int, int, int, int, int]


class TraceReader:
    """Reads a trace from a binary stream: the header at once, then records() yields
    each exit record's raw tuple (RECORD's fields, checked), and fills `footer`."""

    def __init__(self, stream: BinaryIO, source: str = "<trace>") -> None:
        self.stream = stream
        self.source = source
        line = stream.readline(MAX_HEADER_BYTES + 1)
        if not line.endswith(b"\n"):
            raise TraceError(f"{source}: not a pyvmm exit trace (no header line in its "
                             f"first {MAX_HEADER_BYTES} bytes)")
        self.header = parse_header(line[:-1], source)
        self.footer = TraceFooter()
        self._ranges = [len(self.header.devices.get(bus, [])) for bus in BUS_NAMES]

    def records(self) -> Iterator[RawRecord]:
        """Every exit record; TraceError at the first bad one, or if the file does
        not end with its END record (truncated)."""
        index, exits, ended = 0, 0, False
        size = RECORD.size
        while chunk := self.stream.read(size * READ_RECORDS):
            if len(chunk) % size:
                raise TraceError(f"{self.source}: truncated: {len(chunk) % size} bytes after "
                                 f"the last whole {size}-byte record")
            for record in RECORD.iter_unpack(chunk):
                if ended:
                    raise TraceError(f"{self.source}: record {index}: after the end record")
                kind = record[11]
                if kind == KIND_EXIT:
                    self._check_exit(record, index)
                    exits += 1
                    yield record
                else:
                    ended = self._trailer(record, index, exits)
                index += 1
        if not ended:
            raise TraceError(f"{self.source}: truncated: no end record after {exits} exits "
                             "(was pyvmm killed before it closed the trace?)")

    def _check_exit(self, record: RawRecord, index: int) -> None:
        t_ns, _, _, _, vcpu, _, rng, count, bus, size, is_write, _ = record
        where = f"{self.source}: record {index}"
        if vcpu >= self.header.vcpus:
            raise TraceError(f"{where}: vCPU {vcpu}, but the header says {self.header.vcpus} "
                             "vCPU(s)")
        if t_ns < self.header.start_ns:
            raise TraceError(f"{where}: taken before the trace started")
        if bus == NO_BUS:
            if rng != -1 or size or is_write or count:
                raise TraceError(f"{where}: an exit that is not I/O has I/O fields")
            return
        if bus > BUS_MMIO:
            raise TraceError(f"{where}: unknown bus {bus}")
        if size not in IO_SIZES or is_write > 1 or count == 0:
            raise TraceError(f"{where}: bad access (size {size}, is_write {is_write}, "
                             f"count {count})")
        if not -1 <= rng < self._ranges[bus]:
            raise TraceError(f"{where}: device {rng} on the {BUS_NAMES[bus]} bus, which "
                             f"has {self._ranges[bus]} in the header")

    def _trailer(self, record: RawRecord, index: int, exits: int) -> bool:
        """A DROPPED, OVER_LIMIT or END record; True for END."""
        kind, vcpu, value = record[11], record[4], record[2]
        where = f"{self.source}: record {index}"
        if kind == KIND_DROPPED:
            if vcpu >= self.header.vcpus:
                raise TraceError(f"{where}: dropped exits of vCPU {vcpu}, but the header "
                                 f"says {self.header.vcpus} vCPU(s)")
            self.footer.dropped[vcpu] = self.footer.dropped.get(vcpu, 0) + value
            return False
        if kind == KIND_OVER_LIMIT:
            self.footer.over_limit += value
            return False
        if kind == KIND_END:
            if value != exits:
                raise TraceError(f"{where}: the end record counts {value} exits, the file "
                                 f"has {exits}")
            self.footer.exits = exits
            return True
        raise TraceError(f"{where}: unknown record kind {kind}")


def open_trace(path: str | Path) -> BinaryIO:
    """The trace file opened for reading, if it is a regular file (not a FIFO or
    /dev/zero, which would never end); TraceError otherwise."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise TraceError(f"{path}: not a regular file")
    return f


def iter_exits(path: str | Path) -> Iterator[ExitRecord]:
    """Every exit of a trace file, in file order (per vCPU in time order, vCPUs in
    turns), as ExitRecord; TraceError if the file is not a whole trace."""
    with open_trace(path) as f:
        reader = TraceReader(f, str(path))
        header = reader.header
        for t_ns, addr, value, handler_ns, vcpu, reason, rng, count, bus, size, is_write, _ \
                in reader.records():
            yield ExitRecord(t_ns - header.start_ns, vcpu, reason,
                             BUS_NAMES[bus] if bus != NO_BUS else None, addr, size,
                             bool(is_write), value, count, header.device_name(bus, rng),
                             handler_ns)


def reader_of_bytes(data: bytes, source: str = "<trace>") -> TraceReader:
    return TraceReader(io.BytesIO(data), source)

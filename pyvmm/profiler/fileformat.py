"""The profile file (docs/profiler.md): one JSON header line, then fixed-size binary
records, each a csrc/pyvmm.h struct pv_sample, little-endian.

Reading is defensive: the file may be truncated, corrupt or hostile, and anything
wrong is one ProfileError line, never another exception.
"""
from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pyvmm.errors import PyvmmError

FORMAT_NAME = "pyvmm-guest-profile"
VERSION = 1
# struct pv_sample: t_ns, rip, vcpu, cpl, kind, reserved.
RECORD = struct.Struct("<QQHBBI")
KIND_SAMPLE, KIND_DROPPED = 0, 1
MAX_HEADER_BYTES = 64 * 1024
MAX_VCPUS = 1024
MAX_HZ = 100_000
MAX_PROFILE_BYTES = 4 << 30       # 1000 Hz x 4 vCPUs for two days
READ_CHUNK = 1 << 20


class ProfileError(PyvmmError):
    """A profile file or a symbol map that cannot be read; the message is one line."""


@dataclass(frozen=True)
class Sample:
    t_ns: int           # since the profile's start
    vcpu: int
    rip: int
    cpl: int


@dataclass
class ProfileHeader:
    hz: int
    vcpus: int
    start_ns: int               # CLOCK_MONOTONIC of the start; records are absolute
    start_time: str = ""        # the wall clock then, ISO 8601 (for people)
    kernel: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": VERSION, "hz": self.hz, "vcpus": self.vcpus,
                "start_ns": self.start_ns, "start_time": self.start_time,
                "kernel": self.kernel, "record": "<QQHBBI t_ns rip vcpu cpl kind reserved"}


@dataclass
class Profile:
    header: ProfileHeader
    samples: list[Sample] = field(default_factory=list)
    dropped: dict[int, int] = field(default_factory=dict)    # vCPU -> samples lost

    @property
    def duration_ns(self) -> int:
        return self.samples[-1].t_ns if self.samples else 0


def header_line(header: ProfileHeader) -> bytes:
    return json.dumps(header.to_json(), sort_keys=True).encode() + b"\n"


def dropped_record(vcpu: int, count: int, t_ns: int) -> bytes:
    return RECORD.pack(t_ns, count, vcpu, 0, KIND_DROPPED, 0)


# -- reading ---------------------------------------------------------------------------------

def _int_field(data: dict, name: str, low: int, high: int, source: str) -> int:
    value = data.get(name)
    if type(value) is not int or not low <= value <= high:
        raise ProfileError(f"{source}: header field {name!r} must be an integer from {low} "
                           f"to {high}, not {value!r:.40}")
    return value


def parse_header(line: bytes, source: str) -> ProfileHeader:
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProfileError(f"{source}: not a pyvmm guest profile (the first line is not "
                           "a JSON header)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ProfileError(f"{source}: not a pyvmm guest profile (no \"format\": "
                           f"\"{FORMAT_NAME}\" in its header)")
    if data.get("version") != VERSION:
        raise ProfileError(f"{source}: profile version {data.get('version')!r:.20} is not "
                           f"supported (this pyvmm reads version {VERSION})")
    kernel = data.get("kernel")
    start_time = data.get("start_time", "")
    if kernel is not None and not isinstance(kernel, str):
        raise ProfileError(f"{source}: header field 'kernel' must be a string or null")
    if not isinstance(start_time, str):
        raise ProfileError(f"{source}: header field 'start_time' must be a string")
    return ProfileHeader(hz=_int_field(data, "hz", 1, MAX_HZ, source),
                         vcpus=_int_field(data, "vcpus", 1, MAX_VCPUS, source),
                         start_ns=_int_field(data, "start_ns", 0, 2**64 - 1, source),
                         start_time=start_time, kernel=kernel)


def parse_profile(data: bytes, source: str = "<profile>") -> Profile:
    """A profile from the bytes of its file; ProfileError if they are not one."""
    end = data.find(b"\n", 0, MAX_HEADER_BYTES + 1)
    if end < 0:
        raise ProfileError(f"{source}: not a pyvmm guest profile (no header line in its "
                           f"first {MAX_HEADER_BYTES} bytes)")
    header = parse_header(data[:end], source)
    body = memoryview(data)[end + 1:]
    if len(body) % RECORD.size:
        raise ProfileError(f"{source}: truncated: {len(body) % RECORD.size} bytes after the "
                           f"last whole {RECORD.size}-byte record")
    profile = Profile(header)
    for index, (t_ns, rip, vcpu, cpl, kind, _) in enumerate(RECORD.iter_unpack(body)):
        where = f"{source}: record {index}"
        if vcpu >= header.vcpus:
            raise ProfileError(f"{where}: vCPU {vcpu}, but the header says {header.vcpus} "
                               "vCPU(s)")
        if kind == KIND_DROPPED:
            profile.dropped[vcpu] = profile.dropped.get(vcpu, 0) + rip
            continue
        if kind != KIND_SAMPLE:
            raise ProfileError(f"{where}: unknown record kind {kind}")
        if cpl > 3:
            raise ProfileError(f"{where}: ring {cpl} (a CPL is 0 to 3)")
        if t_ns < header.start_ns:
            raise ProfileError(f"{where}: taken before the profile started")
        profile.samples.append(Sample(t_ns - header.start_ns, vcpu, rip, cpl))
    profile.samples.sort(key=lambda s: s.t_ns)     # vCPUs are drained in turns
    return profile


def read_regular_file(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most limit bytes (not a FIFO or /dev/zero,
    which would never end); ProfileError otherwise."""
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ProfileError(f"{path}: not a regular file")
            if info.st_size > limit:
                raise ProfileError(f"{path}: larger than {limit >> 20} MiB")
            # In chunks: read(limit) would allocate the whole limit (4 GiB) up front,
            # a MemoryError on a small machine whatever the file's size.
            chunks, size = [], 0
            while size <= limit and (chunk := f.read(READ_CHUNK)):
                chunks.append(chunk)
                size += len(chunk)
            if size > limit:
                raise ProfileError(f"{path}: larger than {limit >> 20} MiB")
            return b"".join(chunks)
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read it: {exc.strerror or exc}") from None


def load_profile(path: str | Path) -> Profile:
    """Read and check a profile file (ProfileError, one line, if it is not one)."""
    return parse_profile(read_regular_file(path, MAX_PROFILE_BYTES), str(path))


def write_records(out: BinaryIO, records: bytes) -> None:
    out.write(records)

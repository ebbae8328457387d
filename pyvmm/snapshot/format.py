"""The snapshot state file: a fixed header, a SHA-256, and one JSON document.

    offset  size  field
    0       8     magic, b"PYVMMSNP"
    8       4     format version (little-endian u32), FORMAT_VERSION
    12      4     flags, 0
    16      8     length of the JSON body in bytes (u64), at most MAX_BODY
    24      32    SHA-256 of the JSON body
    56      ...   the JSON body (UTF-8)

The body (written by pyvmm.snapshot.create, read by pyvmm.snapshot.load):

    {"snapshot_type": "Full" | "Diff", "created_unix_ns": ..., "pyvmm_version": ...,
     "host": {"kvm": "pvm" | "hardware", "cpu_vendor": "GenuineIntel", ...},
     "vm_spec": the configuration (the shape of GET /vm/config),
     "memory": {"regions": [[guest address, size], ...], "page_size": 4096,
                "dirty_pages": null | [[slot, base64 bitmap], ...] (Diff: which
                pages of each region the memory file holds)},
     "kvm": {"vm": pyvmm.kvm.state.save_vm(), "vcpus": [save_vcpu(), ...]},
     "devices": {"serial": ..., "i8042": ..., "virtio": {name: transport state}}}

The memory file is the regions' bytes one after the other (region i at the
sum of the sizes before it), and nothing else: a Full snapshot's holds every
page (zero pages may be holes), a Diff snapshot's only the dirty ones (the
rest are holes), which `pyvmm snapshot merge` copies onto its base.

Anything wrong with a state file (truncated, corrupt, another version, not a
snapshot at all) is a SnapshotError with one line; nothing is applied from a
file before all of it has been read and checked.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from pyvmm.errors import PyvmmError

MAGIC = b"PYVMMSNP"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQ32s")
MAX_BODY = 64 << 20            # a 64-vCPU VM's state is well under 2 MiB


class SnapshotError(PyvmmError):
    """A snapshot that cannot be taken or loaded; the message says why and what to do."""


def write_state_file(path: str | os.PathLike, body: dict[str, Any]) -> int:
    """Write the state file atomically (a temporary file renamed over path); its size."""
    data = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(data), hashlib.sha256(data).digest())
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return HEADER.size + len(data)


def read_state_file(path: str | os.PathLike) -> dict[str, Any]:
    """The body of a state file, checked: SnapshotError (one line) for anything else."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            header = f.read(HEADER.size)
            if len(header) < HEADER.size:
                raise SnapshotError(f"{name} is not a pyvmm snapshot: it is only "
                                    f"{len(header)} bytes long")
            magic, version, flags, length, digest = HEADER.unpack(header)
            if magic != MAGIC:
                raise SnapshotError(f"{name} is not a pyvmm snapshot state file (no "
                                    f"{MAGIC.decode()} header): pass the snapshot_path "
                                    "written by snapshot create, not the memory file")
            if version != FORMAT_VERSION:
                raise SnapshotError(f"{name} is a version {version} snapshot; this pyvmm "
                                    f"reads version {FORMAT_VERSION}: take the snapshot "
                                    "again with this pyvmm")
            if flags:
                raise SnapshotError(f"{name} has unknown header flags {flags:#x}")
            if length > MAX_BODY:
                raise SnapshotError(f"{name} claims a {length}-byte state, more than the "
                                    f"{MAX_BODY} a snapshot can hold: the file is corrupt")
            data = f.read(length + 1)
    except OSError as exc:
        raise SnapshotError(f"cannot read the snapshot {name}: {exc.strerror}") from None
    if len(data) != length:
        raise SnapshotError(f"{name} is truncated or has trailing bytes: its header "
                            f"says {length} bytes of state, the file holds {len(data)}")
    if hashlib.sha256(data).digest() != digest:
        raise SnapshotError(f"{name} is corrupt: its checksum does not match its contents")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        raise SnapshotError(f"{name} is corrupt: its state is not valid JSON") from None
    if not isinstance(body, dict):
        raise SnapshotError(f"{name} is corrupt: its state is not a JSON object")
    return body


def describe(path: str | os.PathLike) -> str:
    """What a state file holds, for `pyvmm snapshot info` (several lines)."""
    body = read_state_file(path)
    lines = [f"{os.fspath(path)}: pyvmm snapshot, format version {FORMAT_VERSION}"]
    get = body.get
    host = get("host") if isinstance(get("host"), dict) else {}
    lines.append(f"  type:        {get('snapshot_type')}")
    lines.append(f"  taken on:    {host.get('kvm')} KVM, {host.get('cpu_vendor')}, "
                 f"pyvmm {get('pyvmm_version')}")
    created = get("created_unix_ns")
    if isinstance(created, int):
        import datetime
        when = datetime.datetime.fromtimestamp(created / 1e9, datetime.timezone.utc)
        lines.append(f"  created:     {when.isoformat(timespec='seconds')}")
    memory = get("memory") if isinstance(get("memory"), dict) else {}
    regions = memory.get("regions") or []
    try:
        total = sum(size for _, size in regions)
        lines.append(f"  memory:      {total >> 20} MiB in {len(regions)} region(s): " +
                     ", ".join(f"{gpa:#x}+{size >> 20} MiB" for gpa, size in regions))
    except (TypeError, ValueError):
        lines.append("  memory:      (unreadable)")
    spec = get("vm_spec") if isinstance(get("vm_spec"), dict) else {}
    boot = spec.get("boot-source") or {}
    lines.append(f"  kernel:      {boot.get('kernel_image_path')}")
    kvm = get("kvm") if isinstance(get("kvm"), dict) else {}
    vcpus = kvm.get("vcpus") or []
    lines.append(f"  vCPUs:       {len(vcpus)}")
    for vcpu in vcpus:
        try:
            from pyvmm.kvm.state import VcpuState
            state = VcpuState(vcpu, f"vCPU {vcpu.get('index')}")
            lines.append(f"    vCPU {state.index}: rip={state.rip:#x}, {len(state.msrs)} MSRs, "
                         f"{len(state.cpuid)} CPUID entries, mp_state {state.mp_state}")
        except Exception as exc:  # noqa: BLE001 - info shows what it can
            lines.append(f"    (unreadable vCPU: {exc})")
    devices = get("devices") if isinstance(get("devices"), dict) else {}
    virtio = devices.get("virtio") if isinstance(devices.get("virtio"), dict) else {}
    lines.append(f"  devices:     serial, i8042" + "".join(f", {name}" for name in virtio))
    return "\n".join(lines)

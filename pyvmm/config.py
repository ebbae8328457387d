"""The VM's configuration, in the shape of Firecracker's API.

One model for every way of configuring a VM: the REST API (pyvmm.api), the
config file (`pyvmm run --config-file`, the shape of `GET /vm/config`), the
flags of `pyvmm run`, and the keyword arguments of pyvmm.microvm.MicroVM.

Each section parses a JSON object strictly: unknown fields, wrong types and
out-of-range values raise ConfigError with one sentence that names the field.
A JSON null counts as "absent" for optional fields, as in Firecracker.  Fields
that Firecracker has but pyvmm cannot honour yet (CPU templates, huge
pages, the serial console's rate limiter...) are accepted only at their default value; anything
else is refused with a message that says "not supported yet".

Imports run one way, as in Firecracker: the builder (pyvmm.builder) reads
this model; this module never imports the VM, and stays light because it is
imported before the API socket is up.  Command-line flag syntax (`--disk
PATH,ro`) is the CLI's business (pyvmm.cli), not the model's.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pyvmm.errors import PyvmmError
from pyvmm.mmds.config import MmdsConfig

MIN_MEM_MIB = 16
MAX_MEM_MIB = 1 << 20
MAX_VCPUS = 32
# Firecracker's defaults for an unconfigured machine.
DEFAULT_VCPUS = 1
DEFAULT_MEM_MIB = 128
# The command line Firecracker uses when boot_args is not given (minus its
# `8250.nr_uarts=0`, which would take our serial console away): console on
# COM1; reboot through the i8042 (no ACPI); reboot at once on panic; no PCI
# bus to probe; the i8042 has a keyboard and no mouse, and the keyboard is
# taken as it is instead of probed (each probe command costs emulated ring-0
# time on KVM PVM hosts).
DEFAULT_BOOT_ARGS = ("console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux "
                     "i8042.nopnp i8042.dumbkbd")
# A console file's size cap (SerialConfig.serial_out_max_bytes, --console-limit).
DEFAULT_SERIAL_OUT_MAX_BYTES = 64 << 20
MAX_SERIAL_OUT_MAX_BYTES = 1 << 50
ID_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
MAX_TAP_NAME = 15          # IFNAMSIZ - 1
NOT_SUPPORTED = "is not supported yet"


class ConfigError(PyvmmError):
    """A configuration value is invalid, unknown or not supported yet."""


# -- strict field checking ------------------------------------------------------

_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", dict: "an object",
               list: "an array"}


def _describe(value: Any) -> str:
    import json     # only for error messages: a VM that starts never needs it
    text = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _object(where: str, body: Any, spec: dict[str, tuple[type, bool]]) -> dict[str, Any]:
    """Check a JSON object against {field: (type, required)}; returns its fields
    with nulls dropped.  bool is never accepted as an int (JSON true is not 1)."""
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; the fields are "
                          f"{', '.join(spec)}")
    out = {}
    for name, (kind, required) in spec.items():
        value = body.get(name)
        if value is None:
            if required:
                raise ConfigError(f"{where}: missing field {name!r}")
            continue
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{where}: {name} must be {_TYPE_NAMES[kind]}, "
                              f"not {_describe(value)}")
        out[name] = value
    return out


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in _TYPE_NAMES.items():
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return name
    return "a number" if isinstance(value, float) else type(value).__name__


def _check_id(where: str, what: str, value: str) -> str:
    if not ID_RE.fullmatch(value):
        raise ConfigError(f"{where}: {what} {value!r} is invalid: use 1 to 64 letters, digits "
                          "or underscores")
    return value


def _unsupported(where: str, fields: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Fields pyvmm stores only at their default value."""
    for name, default in defaults.items():
        if name in fields and fields[name] != default:
            raise ConfigError(f"{where}: {name} {_describe(fields[name])} {NOT_SUPPORTED}"
                              + (f" (only {_describe(default)})" if default is not None else ""))


def _existing_file(where: str, what: str, path: str, writable: bool = False,
                   block_device_ok: bool = True) -> str:
    """A kernel or initrd (a regular file), or a drive (a regular file or block device)."""
    if not path:
        raise ConfigError(f"{where}: {what} is empty")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{where}: {what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{where}: {what} {path} cannot be used: {exc.strerror}") from None
    if not block_device_ok and not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where}: {what} {path} is not a regular file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ConfigError(f"{where}: {what} {path} is not a regular file or block device")
    if not os.access(path, os.R_OK | (os.W_OK if writable else 0)):
        raise ConfigError(f"{where}: {what} {path} is not "
                          f"{'readable and writable' if writable else 'readable'}")
    return path


def _output_path(where: str, what: str, path: str) -> str:
    """A log, metrics or serial output: a file (created if missing) or a FIFO, never
    reached through a symbolic link at the last component (pyvmm.host_files)."""
    if not path:
        raise ConfigError(f"{where}: {what} is empty")
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{where}: {what} {path} is a symbolic link: give the file itself")
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)
                               or stat.S_ISDIR(st.st_mode)):
        raise ConfigError(f"{where}: {what} {path} is neither a regular file nor a FIFO")
    parent = Path(path).parent
    if not Path(path).exists() and not parent.is_dir():
        raise ConfigError(f"{where}: {what} {path} cannot be created: {parent} is not a "
                          "directory")
    if Path(path).is_dir():
        raise ConfigError(f"{where}: {what} {path} is a directory")
    return path


# -- the sections ----------------------------------------------------------------------

U64_MAX = (1 << 64) - 1
NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class TokenBucketConfig:
    """One of a rate limiter's buckets (Firecracker's TokenBucket): at most `size`
    tokens (bytes or operations), refilled from empty in `refill_time` ms, plus a
    `one_time_burst` spent first that does not refill.  A size or refill_time of 0
    disables the bucket, as in Firecracker (the way a PATCH removes a limit)."""
    size: int
    refill_time: int
    one_time_burst: int | None = None

    FIELDS = {"size": (int, True), "one_time_burst": (int, False), "refill_time": (int, True)}

    @classmethod
    def from_json(cls, body: Any, where: str) -> "TokenBucketConfig":
        f = _object(where, body, cls.FIELDS)
        for name, value in f.items():
            if not 0 <= value <= U64_MAX:
                raise ConfigError(f"{where}: {name} {value} is out of range: use 0 to "
                                  f"{U64_MAX} (an unsigned 64-bit number)")
        if f["refill_time"] * NS_PER_MS > U64_MAX:
            # Firecracker silently disables such a bucket (its nanoseconds overflow):
            # refuse it instead of limiting nothing.
            raise ConfigError(f"{where}: refill_time {f['refill_time']} ms is too long: at "
                              f"most {U64_MAX // NS_PER_MS}")
        return cls(f["size"], f["refill_time"], f.get("one_time_burst"))

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self.refill_time > 0

    def to_json(self) -> dict:
        out: dict[str, Any] = {"size": self.size}
        if self.one_time_burst is not None:
            out["one_time_burst"] = self.one_time_burst
        out["refill_time"] = self.refill_time
        return out


@dataclass(frozen=True)
class RateLimiterConfig:
    """A device's rate limiter (Firecracker's RateLimiter): a bandwidth bucket
    (bytes) and an ops bucket (requests), each optional.  Served by
    pyvmm.devices.rate_limiter."""
    bandwidth: TokenBucketConfig | None = None
    ops: TokenBucketConfig | None = None

    FIELDS = {"bandwidth": (dict, False), "ops": (dict, False)}

    @classmethod
    def from_json(cls, body: Any, where: str) -> "RateLimiterConfig":
        f = _object(where, body, cls.FIELDS)
        return cls(*(TokenBucketConfig.from_json(f[name], f"{where}.{name}")
                     if name in f else None for name in ("bandwidth", "ops")))

    @classmethod
    def optional(cls, fields: dict[str, Any], name: str,
                 where: str) -> "RateLimiterConfig | None":
        """fields[name] parsed, or None when absent; a limiter whose buckets are all
        disabled is None too (what the VM runs with, and GET /vm/config shows)."""
        if name not in fields:
            return None
        return cls.from_json(fields[name], f"{where}: {name}").effective()

    def effective(self) -> "RateLimiterConfig | None":
        """Only the enabled buckets; None if there are none."""
        kept = [b if b is not None and b.enabled else None for b in (self.bandwidth, self.ops)]
        return None if kept == [None, None] else RateLimiterConfig(*kept)

    def patched(self, update: "RateLimiterConfig") -> "RateLimiterConfig | None":
        """This limiter after a PATCH: each bucket the update gives replaces ours
        (a zero one disables it); the ones it leaves out stay (Firecracker)."""
        return RateLimiterConfig(update.bandwidth or self.bandwidth,
                                 update.ops or self.ops).effective()

    def to_json(self) -> dict:
        return {name: bucket.to_json() for name, bucket in
                (("bandwidth", self.bandwidth), ("ops", self.ops)) if bucket is not None}


@dataclass
class BootSource:
    kernel_image_path: str
    boot_args: str | None = None          # None: DEFAULT_BOOT_ARGS
    initrd_path: str | None = None
    # pyvmm's own field: decompress a bzImage's kernel on the host (pyvmm.boot.payload);
    # False lets the kernel's own decompressor do it in the guest, as Firecracker and QEMU do.
    host_decompress: bool = True

    FIELDS = {"kernel_image_path": (str, True), "boot_args": (str, False),
              "initrd_path": (str, False), "host_decompress": (bool, False)}

    @classmethod
    def from_json(cls, body: Any, where: str = "boot-source") -> "BootSource":
        f = _object(where, body, cls.FIELDS)
        _existing_file(where, "kernel_image_path", f["kernel_image_path"],
                       block_device_ok=False)
        if "initrd_path" in f:
            _existing_file(where, "initrd_path", f["initrd_path"], block_device_ok=False)
        if "\0" in f.get("boot_args", ""):
            raise ConfigError(f"{where}: boot_args contains a NUL byte")
        return cls(**f)

    def to_json(self) -> dict:
        body = {"kernel_image_path": self.kernel_image_path, "initrd_path": self.initrd_path,
                "boot_args": self.boot_args}
        if not self.host_decompress:           # Firecracker's shape unless it was asked for
            body["host_decompress"] = False
        return body


@dataclass
class MachineConfig:
    vcpu_count: int = DEFAULT_VCPUS
    mem_size_mib: int = DEFAULT_MEM_MIB
    smt: bool = False
    track_dirty_pages: bool = False
    huge_pages: str = "None"
    # The gdb stub (pyvmm.gdb): a Unix socket path (Firecracker's name) or HOST:PORT,
    # and whether the vCPUs wait for gdb before their first instruction (Firecracker's
    # gdb always waits; `pyvmm run --gdb` without --gdb-wait does not).
    gdb_socket_path: str | None = None
    gdb_wait: bool = True

    FIELDS = {"vcpu_count": (int, True), "mem_size_mib": (int, True), "smt": (bool, False),
              "track_dirty_pages": (bool, False), "huge_pages": (str, False),
              "cpu_template": (str, False), "gdb_socket_path": (str, False),
              "gdb_wait": (bool, False)}
    # smt would need the CPUID topology of two threads per core (pyvmm.boot.cpu).
    UNSUPPORTED = {"huge_pages": "None", "cpu_template": "None", "smt": False}

    @classmethod
    def from_json(cls, body: Any, where: str = "machine-config",
                  base: "MachineConfig | None" = None) -> "MachineConfig":
        """PUT semantics without base (omitted optional fields take their defaults);
        PATCH semantics with base (omitted fields keep base's values)."""
        spec = cls.FIELDS if base is None else \
            {name: (kind, False) for name, (kind, _) in cls.FIELDS.items()}
        f = _object(where, body, spec)
        if f.get("huge_pages", "None") not in ("None", "Transparent", "2M"):
            raise ConfigError(f"{where}: huge_pages must be None, Transparent or 2M")
        _unsupported(where, f, cls.UNSUPPORTED)
        f.pop("cpu_template", None)
        merged = cls(**{**(vars(base) if base else {}), **f})
        merged.validate(where)
        return merged

    def validate(self, where: str = "machine-config") -> None:
        if not 1 <= self.vcpu_count <= MAX_VCPUS:
            raise ConfigError(f"{where}: vcpu_count {self.vcpu_count} is out of range: use 1 "
                              f"to {MAX_VCPUS}")
        if self.smt and self.vcpu_count != 1 and self.vcpu_count % 2:
            raise ConfigError(f"{where}: with smt, vcpu_count must be 1 or an even number, "
                              f"not {self.vcpu_count}")
        if not MIN_MEM_MIB <= self.mem_size_mib <= MAX_MEM_MIB:
            raise ConfigError(f"{where}: mem_size_mib {self.mem_size_mib} is out of range: use "
                              f"{MIN_MEM_MIB} to {MAX_MEM_MIB}")
        if self.gdb_socket_path is not None and not self.gdb_socket_path:
            raise ConfigError(f"{where}: gdb_socket_path must not be empty")

    def to_json(self) -> dict:
        body = {"vcpu_count": self.vcpu_count, "mem_size_mib": self.mem_size_mib,
                "smt": self.smt, "track_dirty_pages": self.track_dirty_pages,
                "huge_pages": self.huge_pages}
        if self.gdb_socket_path is not None:        # reported only when set
            body.update(gdb_socket_path=self.gdb_socket_path, gdb_wait=self.gdb_wait)
        return body


@dataclass
class Drive:
    drive_id: str
    path_on_host: str
    is_root_device: bool = False
    is_read_only: bool = False
    rate_limiter: RateLimiterConfig | None = None
    # The root partition's UUID: with is_root_device, `root=PARTUUID=...` instead of
    # `root=/dev/vda` on the command line (Firecracker's append_root_device_cmdline).
    partuuid: str | None = None
    # Unsafe: no flush (VIRTIO_BLK_F_FLUSH is not offered, so the guest never asks for
    # an fsync); Writeback: the flush is offered and each one fsyncs (Firecracker's).
    cache_type: str = "Unsafe"
    # Sync: preadv/pwritev on the I/O thread; Async: io_uring (pyvmm.devices.uring), as
    # Firecracker's, refused when the VM is built on a host without io_uring.
    io_engine: str = "Sync"

    FIELDS = {"drive_id": (str, True), "path_on_host": (str, True),
              "is_root_device": (bool, True), "is_read_only": (bool, False),
              "partuuid": (str, False), "cache_type": (str, False), "io_engine": (str, False),
              "rate_limiter": (dict, False), "socket": (str, False)}
    UNSUPPORTED = {"socket": None}
    PATCH_FIELDS = {"drive_id": (str, True), "path_on_host": (str, False),
                    "rate_limiter": (dict, False)}

    @classmethod
    def from_json(cls, body: Any, where: str = "drive", path_id: str | None = None) -> "Drive":
        if isinstance(body, dict) and "socket" in body and body.get("socket") is not None:
            raise ConfigError(f"{where}: vhost-user drives (socket) are {NOT_SUPPORTED[3:]}")
        f = _object(where, body, cls.FIELDS)
        _check_id(where, "drive_id", f["drive_id"])
        if path_id is not None and f["drive_id"] != path_id:
            raise ConfigError(f"{where}: the drive_id in the body ({f['drive_id']!r}) does not "
                              f"match the one in the path ({path_id!r})")
        for name, allowed in (("cache_type", ("Unsafe", "Writeback")),
                              ("io_engine", ("Sync", "Async"))):
            if name in f and f[name] not in allowed:
                raise ConfigError(f"{where}: {name} must be {' or '.join(allowed)}")
        _unsupported(where, f, cls.UNSUPPORTED)
        if "partuuid" in f and (not f["partuuid"] or
                                any(c.isspace() or not c.isprintable() for c in f["partuuid"])):
            raise ConfigError(f"{where}: partuuid {_describe(f['partuuid'])} is invalid: give "
                              "the partition's UUID as blkid prints it (no spaces)")
        drive = cls(f["drive_id"], f["path_on_host"], f["is_root_device"],
                    f.get("is_read_only", False),
                    RateLimiterConfig.optional(f, "rate_limiter", where),
                    partuuid=f.get("partuuid"), cache_type=f.get("cache_type", "Unsafe"),
                    io_engine=f.get("io_engine", "Sync"))
        _existing_file(where, "path_on_host", drive.path_on_host,
                       writable=not drive.is_read_only)
        return drive

    @classmethod
    def patch_from_json(cls, body: Any, where: str,
                        path_id: str) -> "tuple[str | None, RateLimiterConfig | None]":
        """PATCH /drives/{id}: the new path_on_host and the rate limiter update
        (None: nothing to change), as Firecracker's PartialDrive."""
        f = _object(where, body, cls.PATCH_FIELDS)
        _check_id(where, "drive_id", f["drive_id"])
        if f["drive_id"] != path_id:
            raise ConfigError(f"{where}: the drive_id in the body ({f['drive_id']!r}) does not "
                              f"match the one in the path ({path_id!r})")
        limiter = RateLimiterConfig.from_json(f["rate_limiter"], f"{where}: rate_limiter") \
            if "rate_limiter" in f else None
        if "path_on_host" in f:
            _existing_file(where, "path_on_host", f["path_on_host"])
        return f.get("path_on_host"), limiter

    def to_json(self) -> dict:
        return {"drive_id": self.drive_id, "path_on_host": self.path_on_host,
                "is_root_device": self.is_root_device, "is_read_only": self.is_read_only,
                "cache_type": self.cache_type, "io_engine": self.io_engine,
                **({"partuuid": self.partuuid} if self.partuuid is not None else {}),
                **({"rate_limiter": self.rate_limiter.to_json()} if self.rate_limiter else {})}


@dataclass
class NetworkInterface:
    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    rx_rate_limiter: RateLimiterConfig | None = None
    tx_rate_limiter: RateLimiterConfig | None = None

    FIELDS = {"iface_id": (str, True), "host_dev_name": (str, True), "guest_mac": (str, False),
              "mtu": (int, False), "rx_rate_limiter": (dict, False),
              "tx_rate_limiter": (dict, False)}
    UNSUPPORTED = {"mtu": None}
    PATCH_FIELDS = {"iface_id": (str, True), "rx_rate_limiter": (dict, False),
                    "tx_rate_limiter": (dict, False)}

    @classmethod
    def from_json(cls, body: Any, where: str = "network-interface",
                  path_id: str | None = None) -> "NetworkInterface":
        f = _object(where, body, cls.FIELDS)
        _check_id(where, "iface_id", f["iface_id"])
        if path_id is not None and f["iface_id"] != path_id:
            raise ConfigError(f"{where}: the iface_id in the body ({f['iface_id']!r}) does not "
                              f"match the one in the path ({path_id!r})")
        _unsupported(where, f, cls.UNSUPPORTED)
        tap = f["host_dev_name"]
        if not 1 <= len(tap.encode()) <= MAX_TAP_NAME or tap in (".", "..") or \
                any(c in tap for c in "/:\0") or any(c.isspace() for c in tap):
            raise ConfigError(f"{where}: host_dev_name {tap!r} is not a valid interface name "
                              f"(1 to {MAX_TAP_NAME} bytes, no '/', ':' or spaces)")
        mac = f.get("guest_mac")
        if mac is not None:
            if not MAC_RE.fullmatch(mac):
                raise ConfigError(f"{where}: guest_mac {mac!r} is not a MAC address like "
                                  "06:00:AC:10:00:02")
            if int(mac[:2], 16) & 1:
                raise ConfigError(f"{where}: guest_mac {mac} is a multicast address")
        return cls(f["iface_id"], tap, mac,
                   RateLimiterConfig.optional(f, "rx_rate_limiter", where),
                   RateLimiterConfig.optional(f, "tx_rate_limiter", where))

    @classmethod
    def patch_from_json(cls, body: Any, where: str, path_id: str) \
            -> "tuple[RateLimiterConfig | None, RateLimiterConfig | None]":
        """PATCH /network-interfaces/{id} (Firecracker's PartialNetworkInterface):
        the rx and tx rate limiter updates (None: leave that one as it is)."""
        f = _object(where, body, cls.PATCH_FIELDS)
        _check_id(where, "iface_id", f["iface_id"])
        if f["iface_id"] != path_id:
            raise ConfigError(f"{where}: the iface_id in the body ({f['iface_id']!r}) does not "
                              f"match the one in the path ({path_id!r})")
        rx, tx = (RateLimiterConfig.from_json(f[name], f"{where}: {name}") if name in f
                  else None for name in ("rx_rate_limiter", "tx_rate_limiter"))
        return rx, tx

    def to_json(self) -> dict:
        out: dict[str, Any] = {"iface_id": self.iface_id, "host_dev_name": self.host_dev_name}
        if self.guest_mac is not None:
            out["guest_mac"] = self.guest_mac
        for name in ("rx_rate_limiter", "tx_rate_limiter"):
            limiter = getattr(self, name)
            if limiter is not None:
                out[name] = limiter.to_json()
        return out


@dataclass
class Entropy:
    rate_limiter: RateLimiterConfig | None = None

    FIELDS = {"rate_limiter": (dict, False)}

    @classmethod
    def from_json(cls, body: Any, where: str = "entropy") -> "Entropy":
        f = _object(where, body, cls.FIELDS)
        return cls(RateLimiterConfig.optional(f, "rate_limiter", where))

    def to_json(self) -> dict:
        return {"rate_limiter": self.rate_limiter.to_json()} if self.rate_limiter else {}


@dataclass
class Vsock:
    """The virtio-vsock device (pyvmm.devices.virtio.vsock): the guest's CID and the
    Unix socket host programs connect to (Firecracker's docs/vsock.md)."""
    guest_cid: int
    uds_path: str
    vsock_id: str | None = None

    CLI_USAGE = "use cid=N,uds=PATH[,id=NAME]"

    @classmethod
    def from_cli(cls, text: str) -> "Vsock":
        """`--vsock cid=N,uds=PATH[,id=NAME]` (a PATH with a comma cannot be given here:
        use the API or a config file)."""
        where = f"--vsock {text}"
        keys = {"cid": "guest_cid", "uds": "uds_path", "id": "vsock_id"}
        body: dict[str, Any] = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or key not in keys:
                raise ConfigError(f"{where}: {item!r} is not one of cid=, uds=, id=: "
                                  f"{cls.CLI_USAGE}")
            if keys[key] in body:
                raise ConfigError(f"{where}: {key}= is given twice: {cls.CLI_USAGE}")
            body[keys[key]] = value
        for key in ("cid", "uds"):
            if keys[key] not in body:
                raise ConfigError(f"{where}: {key}= is required: {cls.CLI_USAGE}")
        cid = body["guest_cid"]
        if not cid.isascii() or not cid.isdigit():
            raise ConfigError(f"{where}: cid {cid!r} is not a number: {cls.CLI_USAGE}")
        body["guest_cid"] = int(cid)
        return cls.from_json(body, where)

    FIELDS = {"guest_cid": (int, True), "uds_path": (str, True), "vsock_id": (str, False)}

    @classmethod
    def from_json(cls, body: Any, where: str = "vsock") -> "Vsock":
        f = _object(where, body, cls.FIELDS)
        if not 3 <= f["guest_cid"] <= 0xFFFF_FFFE:
            raise ConfigError(f"{where}: guest_cid {f['guest_cid']} is out of range: use 3 to "
                              "4294967294")
        if not f["uds_path"]:
            raise ConfigError(f"{where}: uds_path is empty")
        if "vsock_id" in f:
            _check_id(where, "vsock_id", f["vsock_id"])
        return cls(**f)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"guest_cid": self.guest_cid, "uds_path": self.uds_path}
        if self.vsock_id is not None:
            out["vsock_id"] = self.vsock_id
        return out


LOG_LEVELS = ("Error", "Warning", "Info", "Debug", "Trace", "Off")


@dataclass
class Logger:
    log_path: str | None = None
    level: str = "Info"
    show_level: bool = False
    show_log_origin: bool = False
    module: str | None = None

    FIELDS = {"log_path": (str, False), "level": (str, False), "show_level": (bool, False),
              "show_log_origin": (bool, False), "module": (str, False)}

    @classmethod
    def from_json(cls, body: Any, where: str = "logger") -> "Logger":
        f = _object(where, body, cls.FIELDS)
        if "level" in f:
            level = next((lv for lv in LOG_LEVELS if lv.lower() == f["level"].lower()), None)
            if level is None:
                raise ConfigError(f"{where}: level {_describe(f['level'])} is not one of "
                                  f"{', '.join(LOG_LEVELS)}")
            f["level"] = level
        if "log_path" in f:
            _output_path(where, "log_path", f["log_path"])
        return cls(**f)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"level": self.level, "show_level": self.show_level,
                               "show_log_origin": self.show_log_origin}
        if self.log_path is not None:
            out["log_path"] = self.log_path
        if self.module is not None:
            out["module"] = self.module
        return out


@dataclass
class Metrics:
    metrics_path: str
    # Firecracker's: every metrics line gets a top-level "id" (the VM's id) and a
    # "properties" object of these operator-given strings.
    emit_id: bool = False
    properties: dict[str, str] | None = None

    FIELDS = {"metrics_path": (str, True), "emit_id": (bool, False), "properties": (dict, False)}

    @classmethod
    def from_json(cls, body: Any, where: str = "metrics") -> "Metrics":
        f = _object(where, body, cls.FIELDS)
        _output_path(where, "metrics_path", f["metrics_path"])
        for key, value in f.get("properties", {}).items():
            if not isinstance(value, str):
                raise ConfigError(f"{where}: properties[{_describe(key)}] must be a string, "
                                  f"not {_describe(value)}")
        return cls(**f)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"metrics_path": self.metrics_path}
        if self.emit_id:
            out["emit_id"] = True
        if self.properties is not None:
            out["properties"] = dict(self.properties)
        return out


@dataclass
class SerialConfig:
    serial_out_path: str | None = None      # None: the process's choice (stdout by default)
    # A pyvmm extension: a console file stops growing here (what follows is dropped
    # and counted), so that a guest cannot fill the host's disk through its console.
    serial_out_max_bytes: int = DEFAULT_SERIAL_OUT_MAX_BYTES
    # Firecracker's: one token bucket (bytes) for the output; what the guest writes
    # beyond it is dropped and counted (pyvmm.console.ConsoleSink).  None: unlimited.
    rate_limiter: TokenBucketConfig | None = None

    FIELDS = {"serial_out_path": (str, False), "rate_limiter": (dict, False),
              "serial_out_max_bytes": (int, False)}

    @classmethod
    def from_json(cls, body: Any, where: str = "serial") -> "SerialConfig":
        f = _object(where, body, cls.FIELDS)
        bucket = TokenBucketConfig.from_json(f["rate_limiter"], f"{where}: rate_limiter") \
            if "rate_limiter" in f else None
        if "serial_out_path" in f:
            _output_path(where, "serial_out_path", f["serial_out_path"])
        limit = f.get("serial_out_max_bytes", DEFAULT_SERIAL_OUT_MAX_BYTES)
        if not 0 <= limit <= MAX_SERIAL_OUT_MAX_BYTES:
            raise ConfigError(f"{where}: serial_out_max_bytes {limit} is out of range: use 0 "
                              f"to {MAX_SERIAL_OUT_MAX_BYTES}")
        return cls(f.get("serial_out_path"), limit,
                   bucket if bucket is not None and bucket.enabled else None)

    def to_json(self) -> dict:
        out: dict[str, Any] = {}
        if self.serial_out_path is not None:
            out["serial_out_path"] = self.serial_out_path
        if self.rate_limiter is not None:
            out["rate_limiter"] = self.rate_limiter.to_json()
        if self.serial_out_max_bytes != DEFAULT_SERIAL_OUT_MAX_BYTES:
            out["serial_out_max_bytes"] = self.serial_out_max_bytes
        return out


# -- the whole VM ---------------------------------------------------------------

# Firecracker config-file sections pyvmm does not implement: accepted only when null or empty.
UNSUPPORTED_SECTIONS = ("balloon", "cpu-config", "pmem", "memory-hotplug")


@dataclass
class VmSpec:
    """Everything `GET /vm/config` reports; a config file has the same shape."""
    boot_source: BootSource | None = None
    machine_config: MachineConfig = field(default_factory=MachineConfig)
    drives: dict[str, Drive] = field(default_factory=dict)
    network_interfaces: dict[str, NetworkInterface] = field(default_factory=dict)
    entropy: Entropy | None = None
    vsock: Vsock | None = None
    logger: Logger | None = None
    metrics: Metrics | None = None
    serial: SerialConfig | None = None
    # MMDS's configuration (pyvmm.mmds): which interfaces answer it, and how.  Its
    # data is not configuration: it lives in the MicroVM (and is not in a snapshot).
    mmds_config: MmdsConfig | None = None

    # -- updates (each checks the whole-VM rules) -----------------------------------

    def put_drive(self, drive: Drive) -> None:
        root = next((d for d in self.drives.values() if d.is_root_device), None)
        if drive.is_root_device and root is not None and root.drive_id != drive.drive_id:
            raise ConfigError(f"drive {drive.drive_id}: a root device already exists "
                              f"({root.drive_id})")
        self.drives[drive.drive_id] = drive

    def put_network_interface(self, iface: NetworkInterface) -> None:
        for other in self.network_interfaces.values():
            if other.iface_id == iface.iface_id:
                continue
            if other.host_dev_name == iface.host_dev_name:
                raise ConfigError(f"network interface {iface.iface_id}: host_dev_name "
                                  f"{iface.host_dev_name} is already used by {other.iface_id}")
            if iface.guest_mac and other.guest_mac and \
                    other.guest_mac.lower() == iface.guest_mac.lower():
                raise ConfigError(f"network interface {iface.iface_id}: guest_mac "
                                  f"{iface.guest_mac} is already used by {other.iface_id}")
        self.network_interfaces[iface.iface_id] = iface

    def put_mmds_config(self, config: MmdsConfig) -> None:
        """Firecracker's check: every interface named must exist already."""
        missing = [name for name in config.network_interfaces
                   if name not in self.network_interfaces]
        if missing:
            raise ConfigError(
                f"mmds-config: network interface {missing[0]!r} does not exist: the list of "
                "network interface IDs provided contains at least one ID that does not "
                "correspond to any existing network interface (add it first with "
                "PUT /network-interfaces)")
        self.mmds_config = config

    def ordered_drives(self) -> list[Drive]:
        """The root device first (it becomes /dev/vda, as in Firecracker), then in the
        order they were added."""
        drives = list(self.drives.values())
        return sorted(drives, key=lambda d: not d.is_root_device)

    # -- JSON -------------------------------------------------------------------

    SECTIONS = ("boot-source", "machine-config", "drives", "network-interfaces", "entropy",
                "vsock", "logger", "metrics", "serial", "mmds-config") + UNSUPPORTED_SECTIONS

    @classmethod
    def from_json(cls, body: Any, where: str = "config") -> "VmSpec":
        """A config file or the body of `GET /vm/config`."""
        if isinstance(body, (str, bytes)):
            try:
                import json
                body = json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise ConfigError(f"{where}: not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {_json_type(body)}")
        unknown = sorted(set(body) - set(cls.SECTIONS))
        if unknown:
            raise ConfigError(f"{where}: unknown section {unknown[0]!r}; the sections are "
                              f"{', '.join(cls.SECTIONS[:10])}")
        for name in UNSUPPORTED_SECTIONS:
            if body.get(name) not in (None, [], {}):
                raise ConfigError(f"{where}: {name} {NOT_SUPPORTED}")
        spec = cls()
        if body.get("boot-source") is None:
            raise ConfigError(f"{where}: missing section 'boot-source'")
        spec.boot_source = BootSource.from_json(body["boot-source"])
        if body.get("machine-config") is not None:
            spec.machine_config = MachineConfig.from_json(body["machine-config"])
        for name, kind, put in (("drives", Drive, spec.put_drive),
                                ("network-interfaces", NetworkInterface,
                                 spec.put_network_interface)):
            items = body.get(name)
            items = [] if items is None else items
            if not isinstance(items, list):
                raise ConfigError(f"{where}: {name} must be an array, not {_json_type(items)}")
            ids = set()
            for index, item in enumerate(items):
                obj = kind.from_json(item, f"{name}[{index}]")
                ident = obj.drive_id if kind is Drive else obj.iface_id
                if ident in ids:
                    raise ConfigError(f"{where}: {name}[{index}]: duplicate id {ident!r}")
                ids.add(ident)
                put(obj)
        for name, kind in (("entropy", Entropy), ("vsock", Vsock), ("logger", Logger),
                           ("metrics", Metrics), ("serial", SerialConfig)):
            if body.get(name) is not None:
                setattr(spec, name, kind.from_json(body[name]))
        if body.get("mmds-config") is not None:     # after the interfaces it names
            spec.put_mmds_config(MmdsConfig.from_json(body["mmds-config"], "mmds-config"))
        return spec

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "VmSpec":
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        return cls.from_json(text, f"config file {path}")

    def to_json(self) -> dict:
        """The body of `GET /vm/config`, in Firecracker's key order; sections that
        are not configured are null, as Firecracker reports them."""
        def opt(section):
            return section.to_json() if section is not None else None
        out = {
            "balloon": None,
            "drives": [d.to_json() for d in self.ordered_drives()],
            "boot-source": opt(self.boot_source),
            "cpu-config": None,
            "logger": opt(self.logger),
            "machine-config": self.machine_config.to_json(),
            "metrics": opt(self.metrics),
            "mmds-config": opt(self.mmds_config),
            "network-interfaces": [n.to_json() for n in self.network_interfaces.values()],
            "vsock": opt(self.vsock),
            "entropy": opt(self.entropy),
        }
        if self.serial is not None:         # a pyvmm extension: only when configured
            out["serial"] = self.serial.to_json()
        return out

    # -- building one from Python or CLI values ------------------------------------------

    @classmethod
    def build(cls, *, kernel: str | os.PathLike, initrd: str | os.PathLike | None = None,
              cmdline: str = "", boot_args: str | None = None, vcpus: int = DEFAULT_VCPUS,
              mem_mib: int = DEFAULT_MEM_MIB, drives: Iterable[Any] = (),
              nets: Iterable[Any] = (), rng: bool = False,
              serial_out_path: str | os.PathLike | None = None,
              host_decompress: bool = True) -> "VmSpec":
        """The model from keyword values (MicroVM(...) and `pyvmm run` flags).

        cmdline is appended to the default command line; boot_args replaces it, as in
        Firecracker.  A drive or net may be a Drive / NetworkInterface or its JSON dict.
        """
        if boot_args is not None and cmdline:
            raise ConfigError("give cmdline (appended to the defaults) or boot_args "
                              "(replaces them), not both")
        for name, value, kind in (("vcpus", vcpus, int), ("mem_mib", mem_mib, int),
                                  ("rng", rng, bool), ("cmdline", cmdline, str),
                                  ("host_decompress", host_decompress, bool)):
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"{name} must be {_TYPE_NAMES[kind]}, not {_describe(value)}")
        if boot_args is None:
            boot_args = " ".join(filter(None, (DEFAULT_BOOT_ARGS, cmdline)))
        boot: dict[str, Any] = {"kernel_image_path": os.fspath(kernel), "boot_args": boot_args,
                                "host_decompress": host_decompress}
        if initrd is not None:
            boot["initrd_path"] = os.fspath(initrd)
        spec = cls(boot_source=BootSource.from_json(boot))
        spec.machine_config = MachineConfig.from_json({"vcpu_count": vcpus,
                                                       "mem_size_mib": mem_mib})
        for index, item in enumerate(drives):
            spec.put_drive(_section(Drive, item, f"drives[{index}]", spec.drives))
        for index, item in enumerate(nets):
            spec.put_network_interface(_section(NetworkInterface, item,
                                                f"network-interfaces[{index}]",
                                                spec.network_interfaces))
        if rng:
            spec.entropy = Entropy()
        if serial_out_path is not None:
            spec.serial = SerialConfig.from_json({"serial_out_path": os.fspath(serial_out_path)})
        return spec

    # -- what the builder reads ---------------------------------------------------------

    def check_startable(self) -> None:
        """Raises ConfigError unless a VM can be built from this model."""
        if self.boot_source is None:
            raise ConfigError("cannot start the microVM without a boot source: "
                              "PUT /boot-source first")
        self.machine_config.validate()

    def virtio_devices(self) -> list[tuple[str, Drive | NetworkInterface | Entropy]]:
        """(name, section) of each virtio device, in the order they take the virtio-mmio
        windows of pyvmm.layout: the drives (the root device first: it is /dev/vda),
        then the network interfaces, then the entropy device."""
        devices: list[tuple[str, Drive | NetworkInterface | Entropy]] = \
            [(f"drive:{d.drive_id}", d) for d in self.ordered_drives()]
        devices += [(f"net:{n.iface_id}", n) for n in self.network_interfaces.values()]
        if self.entropy is not None:
            devices.append(("entropy", self.entropy))
        return devices

    @property
    def kernel_args(self) -> str:
        """boot_args, or the default command line when it is not given (Firecracker)."""
        assert self.boot_source is not None
        args = self.boot_source.boot_args
        return DEFAULT_BOOT_ARGS if args is None else args


def _section(kind: type, item: Any, where: str, existing: dict[str, Any]) -> Any:
    """A Drive or NetworkInterface given to VmSpec.build as itself or as its JSON."""
    if isinstance(item, dict):
        item = kind.from_json(item, where)
    elif not isinstance(item, kind):
        raise ConfigError(f"{where}: expected a {kind.__name__} or a dict, not "
                          f"{type(item).__name__} {item!r}"[:200])
    ident = item.drive_id if kind is Drive else item.iface_id
    if ident in existing:
        raise ConfigError(f"{where}: duplicate id {ident!r}")
    return item


__all__ = ["BootSource", "ConfigError", "Drive", "Entropy", "Logger", "MachineConfig",
           "Metrics", "NetworkInterface", "RateLimiterConfig", "SerialConfig",
           "TokenBucketConfig", "VmSpec", "Vsock"]

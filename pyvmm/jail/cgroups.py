"""Cgroup limits for a jail: Firecracker's `--cgroup <file>=<value>` on cgroup v1 or v2.

Users may write the cgroup v2 names (memory.max, pids.max, cpu.max, cpu.weight, io.max)
on either version: on v1 they become the v1 files (memory.limit_in_bytes,
cpu.cfs_quota_us/cpu.cfs_period_us, cpu.shares, blkio.throttle.*).  Any other
`<controller>.<file>` is written as given (Firecracker's behaviour: `cpuset.cpus=0`).

Everything up to the writes is data (`plan()`), so that it is tested without root.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.errors import PyvmmError

DEFAULT_PARENT = "pyvmm"
V1_CONTROLLER_OF = {"blkio": "blkio", "io": "blkio"}
# The v2 files that have a v1 translation.
V2_NAMES = ("memory.max", "pids.max", "cpu.max", "cpu.weight", "io.max")
IO_MAX_KEYS = {"rbps": "blkio.throttle.read_bps_device",
               "wbps": "blkio.throttle.write_bps_device",
               "riops": "blkio.throttle.read_iops_device",
               "wiops": "blkio.throttle.write_iops_device"}
CPU_PERIOD_DEFAULT = 100000


class CgroupError(PyvmmError):
    pass


@dataclass(frozen=True)
class Write:
    """Write `value` to `file` in the jail's cgroup of `controller` (v1) or the unified
    hierarchy (v2: controller is the file's prefix, for cgroup.subtree_control)."""
    controller: str
    file: str
    value: str


@dataclass
class CgroupPlan:
    version: int
    parent: str
    jail_id: str
    writes: list[Write] = field(default_factory=list)

    @property
    def controllers(self) -> list[str]:
        seen: list[str] = []
        for w in self.writes:
            if w.controller not in seen:
                seen.append(w.controller)
        return seen

    def relative_dir(self) -> str:
        return f"{self.parent}/{self.jail_id}"


def parse_assignment(text: str) -> tuple[str, str]:
    """'memory.max=512M' -> ('memory.max', '512M')."""
    name, eq, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not eq or not re.fullmatch(r"[a-z_]+\.[a-z_.]+", name) or not value \
            or "\n" in value or "/" in name:
        raise CgroupError(f"bad --cgroup {text!r}: use <controller>.<file>=<value>, e.g. "
                          "memory.max=512M or pids.max=64")
    return name, value


def validate_parent(parent: str) -> str:
    parts = parent.strip("/").split("/")
    if not parent.strip("/") or any(p in ("", ".", "..") for p in parts) \
            or not all(re.fullmatch(r"[A-Za-z0-9_.-]+", p) for p in parts):
        raise CgroupError(f"bad --parent-cgroup {parent!r}: a relative path of names made of "
                          "letters, digits, '_', '.' and '-'")
    return "/".join(parts)


def _v1_writes(name: str, value: str) -> list[Write]:
    """One v2-style assignment as the v1 file writes it stands for."""
    if name == "memory.max":
        return [Write("memory", "memory.limit_in_bytes", "-1" if value == "max" else value)]
    if name == "pids.max":
        return [Write("pids", "pids.max", value)]
    if name == "cpu.max":
        parts = value.split()
        if not 1 <= len(parts) <= 2 or not (parts[0] == "max" or parts[0].isdigit()) \
                or (len(parts) == 2 and not parts[1].isdigit()):
            raise CgroupError(f"bad cpu.max {value!r}: use '<quota_us>|max [<period_us>]'")
        period = parts[1] if len(parts) == 2 else str(CPU_PERIOD_DEFAULT)
        quota = "-1" if parts[0] == "max" else parts[0]
        return [Write("cpu", "cpu.cfs_period_us", period), Write("cpu", "cpu.cfs_quota_us", quota)]
    if name == "cpu.weight":
        if not value.isdigit() or not 1 <= int(value) <= 10000:
            raise CgroupError(f"bad cpu.weight {value!r}: 1 to 10000")
        return [Write("cpu", "cpu.shares", str(max(2, int(value) * 1024 // 100)))]
    if name == "io.max":
        # "MAJ:MIN rbps=N wbps=N riops=N wiops=N" (any subset; max = no limit).
        device, *limits = value.split()
        if not re.fullmatch(r"\d+:\d+", device) or not limits:
            raise CgroupError(f"bad io.max {value!r}: use 'MAJ:MIN rbps=N wbps=N riops=N "
                              "wiops=N' (any of them)")
        out = []
        for limit in limits:
            key, eq, amount = limit.partition("=")
            if key not in IO_MAX_KEYS or not eq or not (amount == "max" or amount.isdigit()):
                raise CgroupError(f"bad io.max limit {limit!r}: rbps, wbps, riops or wiops "
                                  "= a number or max")
            out.append(Write("blkio", IO_MAX_KEYS[key],
                             f"{device} {0 if amount == 'max' else amount}"))
        return out
    controller = name.split(".", 1)[0]
    return [Write(V1_CONTROLLER_OF.get(controller, controller), name, value)]


def plan(assignments: list[str], version: int, parent: str, jail_id: str) -> CgroupPlan:
    """The writes --cgroup asks for, in the names of cgroup `version`."""
    if version not in (1, 2):
        raise CgroupError(f"bad --cgroup-version {version}: 1 or 2")
    result = CgroupPlan(version, validate_parent(parent), jail_id)
    for text in assignments:
        name, value = parse_assignment(text)
        if version == 2:
            result.writes.append(Write(name.split(".", 1)[0], name, value))
        else:
            result.writes.extend(_v1_writes(name, value))
    return result


# -- the host's hierarchies -------------------------------------------------------------------

def mounts(text: str | None = None) -> tuple[dict[str, str], str | None]:
    """From /proc/mounts: {v1 controller: mount point} and the cgroup2 mount point."""
    if text is None:
        text = Path("/proc/mounts").read_text()
    v1: dict[str, str] = {}
    v2 = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        if fields[2] == "cgroup2" and v2 is None:
            v2 = point
        elif fields[2] == "cgroup":
            for option in fields[3].split(","):
                if option not in ("rw", "ro") and "=" not in option and option not in v1:
                    v1[option] = point
    return v1, v2


@dataclass
class Cgroups:
    """The jail's cgroup directories, made and filled by create(); the VMM joins them with
    enter() (in its own process, before exec) and remove() deletes them afterwards."""
    plan: CgroupPlan
    dirs: list[Path] = field(default_factory=list)

    def locate(self, proc_mounts: str | None = None) -> dict[str, Path]:
        """controller -> the jail's cgroup directory for it."""
        v1, v2 = mounts(proc_mounts)
        rel = self.plan.relative_dir()
        if self.plan.version == 2:
            if v2 is None:
                raise CgroupError("--cgroup-version 2: no cgroup2 file system is mounted")
            return {c: Path(v2) / rel for c in self.plan.controllers}
        out = {}
        for controller in self.plan.controllers:
            if controller not in v1:
                raise CgroupError(f"--cgroup: the {controller} controller is not mounted as "
                                  f"cgroup v1 here (mounted: {', '.join(sorted(v1)) or 'none'}"
                                  "; --cgroup-version 2?)")
            out[controller] = Path(v1[controller]) / rel
        return out

    def create(self) -> None:
        where = self.locate()
        if self.plan.version == 2 and where:
            self._enable_v2_controllers(next(iter(where.values())))
        for controller, directory in where.items():
            if directory not in self.dirs:
                directory.mkdir(parents=True, exist_ok=True)
                self.dirs.append(directory)
                if controller == "cpuset" and self.plan.version == 1:
                    _inherit_cpuset(directory)
        for w in self.plan.writes:
            target = where[w.controller] / w.file
            if not target.exists():
                hint = (" (a cgroup v2 name? use --cgroup-version 2)" if self.plan.version == 1
                        else " (a cgroup v1 name? use the v2 name or --cgroup-version 1)")
                raise CgroupError(f"--cgroup {w.file}: no such file in {target.parent}{hint}")
            try:
                target.write_text(w.value)
            except OSError as exc:
                raise CgroupError(f"--cgroup: cannot write {w.value!r} to {target}: "
                                  f"{exc.strerror}") from None

    def _enable_v2_controllers(self, jail_dir: Path) -> None:
        """Each ancestor of the jail's cgroup delegates the controllers to its children."""
        root = jail_dir
        for _ in self.plan.relative_dir().split("/"):
            root = root.parent
        wanted = [c for c in self.plan.controllers if c != "cgroup"]
        ancestors = [root]
        for part in self.plan.parent.split("/"):
            ancestors.append(ancestors[-1] / part)
        for directory in ancestors:
            directory.mkdir(exist_ok=True)
            available = (directory / "cgroup.controllers").read_text().split()
            missing = [c for c in wanted if c not in available]
            if missing:
                raise CgroupError(f"cgroup v2 controller(s) {', '.join(missing)} not available "
                                  f"in {directory} (bound to a v1 hierarchy? --cgroup-version 1)")
            enabled = (directory / "cgroup.subtree_control").read_text().split()
            todo = " ".join(f"+{c}" for c in wanted if c not in enabled)
            if todo:
                try:
                    (directory / "cgroup.subtree_control").write_text(todo)
                except OSError as exc:
                    raise CgroupError(f"cannot enable {todo} in {directory}: {exc.strerror} "
                                      "(processes in an inner cgroup?)") from None

    def enter(self) -> None:
        """Move the calling process into every jail cgroup ('0' is the writer itself, also
        from inside a new PID namespace)."""
        for directory in self.dirs:
            (directory / "cgroup.procs").write_text("0")

    def oom_kills(self) -> int:
        """How many processes the OOM killer took in the jail's memory cgroup."""
        for directory in self.dirs:
            name = "memory.events" if self.plan.version == 2 else "memory.oom_control"
            try:
                text = (directory / name).read_text()
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def remove(self) -> list[str]:
        """rmdir the jail's cgroups (they are empty once the VMM is gone); problems listed."""
        problems = []
        for directory in self.dirs:
            for attempt in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:          # EBUSY while the last task is being reaped
                    if attempt == 49:
                        problems.append(f"{directory}: {exc.strerror}")
                    else:
                        import time
                        time.sleep(0.02)
        self.dirs.clear()
        return problems


def _inherit_cpuset(directory: Path) -> None:
    """A new v1 cpuset is empty and takes no task: start from the parent's cpus and mems."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        mine = directory / name
        if not mine.read_text().strip():
            parent = directory.parent
            while not (parent / name).read_text().strip():
                parent = parent.parent
            _inherit_chain(directory, parent, name)


def _inherit_chain(directory: Path, source: Path, name: str) -> None:
    chain = []
    d = directory
    while d != source:
        chain.append(d)
        d = d.parent
    value = (source / name).read_text().strip()
    for d in reversed(chain):
        if not (d / name).read_text().strip():
            (d / name).write_text(value)


__all__ = ["CgroupError", "CgroupPlan", "Cgroups", "Write", "mounts", "parse_assignment",
           "plan", "DEFAULT_PARENT"]

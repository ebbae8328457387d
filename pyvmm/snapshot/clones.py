"""Clones: many microVMs started from one snapshot, each with its own disks and network.

    clones = start_clones("snap/vm.state", "snap/vm.mem", 10, "work/",
                          enter=lambda i: namespaces[i].entered())
    print(memory_usage(clones[0].vm))

Guest memory: every clone maps the one memory file MAP_PRIVATE, so the pages
none of them has written are the page cache's, shared by all; a clone pays
only for the pages it writes (copy-on-write) or touches first.

Disks: clones must never write one image.  Each writable drive is copied per
clone: a reflink (FICLONE: copy-on-write, instant, on btrfs/XFS/bcachefs) where
the file system can, a sparse full copy otherwise (`Clone.disk_copy` says
which).  Read-only drives are shared (their lock is shared).

Network: a snapshot's guest has one MAC and IP address, so each clone either
runs in its own network namespace that has a TAP of the same name
(Firecracker's "network for clones"; `enter` enters it while the clone opens
its TAP), or gets a TAP of its own through network overrides.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

from pyvmm.snapshot import LoadRequest, SnapshotError
from pyvmm.snapshot.format import read_state_file
from pyvmm.snapshot.memfile import file_data_extents

FICLONE = 0x40049409             # linux/fs.h: _IOW(0x94, 9, int)


@dataclass
class Clone:
    index: int
    vm: Any                      # pyvmm.microvm.MicroVM
    disks: dict[str, str] = field(default_factory=dict)
    disk_copy: str = "none"      # "reflink", "copy" or "none" (no writable drive)
    start_seconds: float = 0.0   # from the load request to a running VM


def copy_image(source: str, target: str) -> str:
    """Copy a disk image for a clone: "reflink" where the file system shares the
    blocks copy-on-write, else "copy" (sparse: holes stay holes)."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return "reflink"
        except OSError:
            pass
        size = os.fstat(src.fileno()).st_size
        for start, end in file_data_extents(src.fileno(), 0, size):
            src.seek(start)
            dst.seek(start)
            left = end - start
            while left:
                chunk = src.read(min(left, 1 << 20))
                if not chunk:
                    break
                dst.write(chunk)
                left -= len(chunk)
        dst.truncate(size)
    return "copy"


def start_clones(state_path: str | os.PathLike, mem_path: str | os.PathLike, count: int,
                 work_dir: str | os.PathLike, *,
                 network_overrides: Callable[[int], dict[str, str]] | None = None,
                 enter: Callable[[int], ContextManager] | None = None,
                 resume: bool = True, **options: Any) -> list[Clone]:
    """count MicroVMs from one snapshot, each with copies of the writable drives in
    work_dir/clone-N/; network_overrides(i) and enter(i) give clone i its network.
    If one fails, those already started are closed and the error raised."""
    from pyvmm.microvm import MicroVM
    if count < 1:
        raise SnapshotError(f"cannot start {count} clones: ask for at least one")
    spec = read_state_file(state_path).get("vm_spec") or {}
    drives = [d for d in spec.get("drives") or [] if isinstance(d, dict)]
    clones: list[Clone] = []
    try:
        for index in range(count):
            home = Path(work_dir) / f"clone-{index}"
            home.mkdir(parents=True, exist_ok=True)
            disks, how = {}, "none"
            for drive in drives:
                if drive.get("is_read_only"):
                    continue
                copy = home / Path(drive["path_on_host"]).name
                how = copy_image(drive["path_on_host"], str(copy))
                disks[drive["drive_id"]] = str(copy)
            request = LoadRequest(os.fspath(state_path), os.fspath(mem_path), resume_vm=resume,
                                  network_overrides=network_overrides(index)
                                  if network_overrides else {}, drive_overrides=disks)
            vm = MicroVM.unconfigured(vm_id=f"clone-{index}", **options)
            clones.append(Clone(index, vm, disks, how))
            started = time.monotonic()
            with enter(index) if enter else contextlib.nullcontext():
                vm.load_snapshot(request)
            clones[-1].start_seconds = time.monotonic() - started
    except BaseException:
        for clone in clones:
            clone.vm.close()
        raise
    return clones


def memory_usage(vm: Any) -> dict[str, int]:
    """Bytes of a running MicroVM's guest memory mappings, from /proc/self/smaps:
    rss (resident), pss (shared pages divided among their sharers), shared (pages
    others map too: the snapshot's page cache) and private (this VM's own)."""
    starts = {region.host_addr for region in vm._vm.machine.memory.regions}
    totals = {"rss": 0, "pss": 0, "shared": 0, "private": 0}
    keys = {"Rss:": "rss", "Pss:": "pss", "Shared_Clean:": "shared", "Shared_Dirty:": "shared",
            "Private_Clean:": "private", "Private_Dirty:": "private"}
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                inside = int(first.split("-")[0], 16) in starts
            elif inside and first in keys:
                totals[keys[first]] += int(line.split()[1]) * 1024
    return totals


def remove_clone_dirs(work_dir: str | os.PathLike) -> None:
    for path in Path(work_dir).glob("clone-*"):
        shutil.rmtree(path, ignore_errors=True)

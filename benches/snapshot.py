"""Snapshots: restore latency, create time and size, clones, and time to a usable shell.

One Linux boot per guest size (--snap-sizes, default 256 and 2048 MiB; the
built-in guest, --snap-cpus vCPUs, dirty pages tracked so that Diff snapshots
work), then everything is measured from snapshots of that one guest, taken in
this process with MicroVM.snapshot() and restored many times:

cold boot   MicroVM(...).start() -> the guest's /init marker -> the first shell
            command answered (run_in_shell "true").  The baseline of the shell
            table; the boot has dirty-page tracking on (Diff needs it).
create      --snap-create-reps Full snapshots of the idle guest (paused, saved,
            resumed), then as many Diff snapshots, each after a known change:
            `dd` of 64 pages (256 KiB) of /dev/urandom into a tmpfs file.  Wall
            time of MicroVM.snapshot(), memory bytes written (zero pages are
            holes), the memory file's allocated size, the state file's size;
            pause() time beside it.
ticker      a background job in the guest's shell, `while :; do echo -n @; done`:
            a busy ring-3 loop whose every write(2) puts one "@" on the serial
            console.  Its steady-state interval between "@"s (measured on the
            booted guest before the snapshot) is the guest's own output
            granularity: the floor under any "first output" figure.  Three Full
            snapshots are taken with it running, 0.5 s apart (`busy-0..2`, used
            in turn by the repetitions: where a snapshot caught the guest decides
            what it must fault in before its next "@"); the last Full of the idle
            guest is the `idle` snapshot.

Restore latency (the `busy` snapshots; --reps repetitions after one warm-up
round that is not counted, variants rotated):

file, uffd  in this process: MicroVM.unconfigured(), then, timed from the load
            request (LoadRequest.from_json of a PUT /snapshot/load body with
            resume_vm) to the first byte the guest's UART sends (the console
            capture's write, on the vCPU thread).  Backends: File (the memory file
            mapped MAP_PRIVATE) and Uffd (pyvmm's page-fault handler,
            `python -m pyvmm.snapshot.uffd_handler`, started and listening
            before the request: not timed).  Functions on the restore path are
            wrapped for the one load to time-stamp its phases (the breakdown
            table).  The goal's figure (< 10 ms) is "load -> vCPU in KVM_RUN": the
            vCPU thread's first call into VcpuFd.run(), the C loop whose next step
            is the KVM_RUN ioctl.  LinuxVm.start() returns a little later (Python's
            Thread.start() waits for the new thread), and load_snapshot() later
            still (the watcher thread, logging).
exec-file,  `pyvmm run --restore DIR` (and `--uffd SOCKET`) as a child process
exec-uffd   (tests.framework.process.Process): spawn -> the first "@" read on
            its stdout.  The difference to the in-process figure is the
            interpreter, imports and CLI (see the startup benchmark).

Firecracker's published restore latency (~3 ms p50) is printed beside ours
as a reference: their number, on their hardware, not measured here; their
performance test reads the VMM's `load_snapshot` latency metric, i.e. the load
request handled and the VM resumed, comparable to our "load ->
load_snapshot returned", not to "first output".

Time to a usable shell (the `idle` snapshot): in-process load request -> the
first shell command answered, and `pyvmm run --restore` spawn -> the same,
beside the cold boot.  The shell round trip of the running guest (the same
command, before the snapshot) is printed as the floor: on KVM PVM the guest's
tty and shell take ~0.5 s per command line whatever the VMM does.

Clones (the `idle` snapshot, File backend): for each of --snap-clones counts,
pyvmm.snapshot.clones.start_clones() starts that many in this process; clones
per second = count / its wall time.  After --snap-settle seconds,
clones.memory_usage() gives each clone's guest-memory RSS (pages mapped: what
the guest touched, plus the kernel's fault-around neighbours), PSS, shared and
private bytes; smaps' Anonymous field its copy-on-write pages (what it wrote);
/proc/self/smaps_rollup the process's PSS growth per clone (guest memory plus
the VMM's own objects, threads and buffers), and /proc/meminfo the host's
kernel memory growth (Slab, PageTables, SecPageTables; host-wide).  Then each
clone must answer a shell command (not timed).

The restores run seconds to a minute after their snapshot was taken.  That
matters on KVM PVM, where a restored guest's TSC (its clocksource) has run on
with the host's: the guest's catch-up work after a restore, and so its first
output, grows with the snapshot's age (benches/README.md, Snapshots).

Nothing is asserted; every figure is a median [min-max] over its samples.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benches import harness, vmms
from benches.harness import Stats

GOAL_RESTORE_MS = 10.0          # load request -> a running vCPU (issue)
GOAL_CLONE_MIB = 10.0           # a clone of an idle guest, beyond what it touches
FIRECRACKER_RESTORE_P50_MS = 3.0
TICK = b"@"
TICKER = "(while :; do echo -n @; done) &"
KNOWN_CHANGE_PAGES = 64         # the Diff's known change: 64 x 4 KiB into tmpfs
# Ticker snapshots per size, 0.5 s apart, used in turn by the repetitions: where a
# snapshot caught the guest decides what it must fault in before its next "@".
BUSY_SNAPSHOTS = 3
BOOT_TIMEOUT = 1200.0
SHELL_TIMEOUT = 120.0
OUTPUT_TIMEOUT = 60.0
VARIANTS = ("file", "uffd", "exec-file", "exec-uffd", "shell-file", "shell-exec")
MiB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("snapshot")
    group.add_argument("--snap-sizes", default="256,2048",
                       help="guest sizes in MiB, one Linux boot each (default 256,2048)")
    group.add_argument("--snap-cpus", type=int, default=1, help="vCPUs (default 1)")
    group.add_argument("--snap-create-reps", type=int, default=3,
                       help="Full and Diff snapshots taken per size (default 3)")
    group.add_argument("--snap-clones", default="1,5,10",
                       help="clone counts started from one snapshot (default 1,5,10)")
    group.add_argument("--snap-settle", type=float, default=2.0,
                       help="seconds between starting clones and reading their memory "
                            "(default 2)")
    group.add_argument("--snap-dir", type=Path, default=None,
                       help="where the snapshots go (default: a temporary directory, "
                            "removed afterwards)")


# -- time-stamping the restore path ---------------------------------------------------------

class Probe:
    """Wraps functions on pyvmm's restore path for one load: `marks` are the first
    time each point was passed (perf_counter), `spans` the summed seconds spent
    in wrapped calls.  A function that no longer exists is listed in `missing`
    and its time falls into the next phase."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.spans: dict[str, float] = {}
        self.missing: list[str] = []
        self._undo: list[tuple[Any, str, Any]] = []

    def _patch(self, owner: Any, attr: str, make: Callable[[Any], Any]) -> None:
        orig = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        if not callable(orig):
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
            return
        setattr(owner, attr, make(orig))
        self._undo.append((owner, attr, orig))

    def mark(self, owner: Any, attr: str, before: str | None = None,
             after: str | None = None) -> None:
        marks = self.marks

        def make(orig):
            def wrapper(*args, **kwargs):
                if before:
                    marks.setdefault(before, time.perf_counter())
                result = orig(*args, **kwargs)
                if after:
                    marks.setdefault(after, time.perf_counter())
                return result
            return wrapper
        self._patch(owner, attr, make)

    def span(self, owner: Any, attr: str, label: str) -> None:
        spans = self.spans

        def make(orig):
            def wrapper(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return orig(*args, **kwargs)
                finally:
                    spans[label] = spans.get(label, 0.0) + time.perf_counter() - t
            return wrapper
        self._patch(owner, attr, make)

    def undo(self) -> None:
        while self._undo:
            owner, attr, orig = self._undo.pop()
            setattr(owner, attr, orig)

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()


# The restore path's phases, in order: (mark ending the phase, what the phase is).
PHASES = [
    ("kvm", "open /dev/kvm"),
    ("read", "read + check the state file"),
    ("mapped", "check host, map guest memory (Uffd: + userfaultfd, handshake)"),
    ("machine", "create VM, irqchip, PIT, memory slots, vCPUs"),
    ("devices", "build devices (UART, i8042, virtio, PVM fix-ups)"),
    ("kvm_state", "restore KVM state (VM, vCPUs)"),
    ("built", "restore device state"),
    ("kvm_run", "start the I/O and vCPU threads, to the vCPU's first KVM_RUN"),
]
# Finer spans inside those phases (summed durations of the wrapped calls).
SPANS = [
    "host check (CPUID)", "userfaultfd + handshake", "KVM_CREATE_VM",
    "TSS, identity map, irqchip, PIT", "KVM_SET_USER_MEMORY_REGION", "vCPUs (create, mmap)",
    "VM state (PIT, clock, irqchips)", "vCPU state", "I/O thread start", "vCPU threads start",
]


def arm(probe: Probe) -> None:
    import pyvmm.builder as builder
    import pyvmm.kvm as kvm
    import pyvmm.snapshot as snapshot
    import pyvmm.snapshot.uffd as uffd
    from pyvmm.devices.iothread import IoThread
    from pyvmm.kvm.state import VcpuState, VmState
    from pyvmm.kvm.vcpu import VcpuFd
    from pyvmm.kvm.vm import VmFd
    from pyvmm.machine import Machine
    probe.mark(kvm.Kvm, "__init__", after="kvm")
    probe.mark(snapshot, "read_state_file", after="read")
    probe.mark(snapshot, "open_snapshot", after="mapped")
    probe.mark(Machine, "__init__", after="machine")
    probe.mark(Machine, "restore_state", before="devices", after="kvm_state")
    probe.mark(builder.LinuxVm, "__init__", after="built")
    probe.mark(builder.LinuxVm, "start", after="running")
    probe.mark(VcpuFd, "run", before="kvm_run")       # on the vCPU thread
    probe.span(snapshot, "host_identity", "host check (CPUID)")
    probe.span(uffd, "attach_uffd_backend", "userfaultfd + handshake")
    probe.span(kvm.Kvm, "create_vm", "KVM_CREATE_VM")
    for attr in ("set_tss_addr", "set_identity_map_addr", "create_irqchip", "create_pit2"):
        probe.span(VmFd, attr, "TSS, identity map, irqchip, PIT")
    probe.span(VmFd, "set_user_memory_region", "KVM_SET_USER_MEMORY_REGION")
    probe.span(VmFd, "create_vcpu", "vCPUs (create, mmap)")
    probe.span(VcpuFd, "__init__", "vCPUs (create, mmap)")
    probe.span(VmState, "restore", "VM state (PIT, clock, irqchips)")
    probe.span(VcpuState, "restore", "vCPU state")
    probe.span(IoThread, "start", "I/O thread start")
    probe.span(Machine, "start", "vCPU threads start")


# -- restoring ------------------------------------------------------------------------------

def restore_in_process(state: Path, backend: str, backend_type: str) -> dict[str, Any]:
    """Load the snapshot (resume_vm) into a fresh MicroVM here; ms from the load
    request to each phase's end, to load_snapshot's return and to the first byte
    of guest output."""
    from pyvmm.microvm import MicroVM
    from pyvmm.snapshot import LoadRequest
    vm = MicroVM.unconfigured(vm_id="bench-restore")
    first: list[float] = []
    capture_write = vm.capture.write

    def write(data: bytes) -> None:
        if not first:
            first.append(time.perf_counter())
        capture_write(data)
    vm.capture.write = write            # the UART is built with this, inside the load
    try:
        with Probe() as probe:
            arm(probe)
            t0 = time.perf_counter()
            request = LoadRequest.from_json(
                {"snapshot_path": str(state), "resume_vm": True,
                 "mem_backend": {"backend_type": backend_type, "backend_path": backend}})
            vm.load_snapshot(request)
            returned = time.perf_counter()
        vm.capture.wait_for_more(0, OUTPUT_TIMEOUT)
        sample: dict[str, Any] = {
            "marks_ms": {k: (v - t0) * 1e3 for k, v in probe.marks.items()},
            "spans_ms": {k: v * 1e3 for k, v in probe.spans.items()},
            "returned_ms": (returned - t0) * 1e3,
            "first_output_ms": (first[0] - t0) * 1e3 if first else None,
            "missing_probes": probe.missing}
        if not first:
            sample["error"] = f"no guest output within {OUTPUT_TIMEOUT:.0f} s"
        return sample
    finally:
        vm.close()


def start_handler(socket_path: Path, mem: Path) -> subprocess.Popen:
    """pyvmm's page-fault handler, listening on socket_path (waited for)."""
    if socket_path.exists():
        socket_path.unlink()
    handler = subprocess.Popen(
        [sys.executable, "-m", "pyvmm.snapshot.uffd_handler", "-q", str(socket_path), str(mem)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=vmms.child_env(), text=True)
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        if handler.poll() is not None or time.monotonic() > deadline:
            handler.kill()
            out, err = handler.communicate()
            raise RuntimeError(f"the uffd handler did not listen: {out} {err}")
        time.sleep(0.005)
    return handler


def handler_stats(handler: subprocess.Popen) -> dict[str, Any] | None:
    """The counters the handler prints when its VMM hangs up."""
    try:
        out, _ = handler.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        handler.kill()
        handler.communicate()
        return None
    for line in reversed(out.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def restore_variant(variant: str, snaps: dict[str, Any], work: Path, rep: int) -> dict[str, Any]:
    busy, idle = snaps["busy"][rep % len(snaps["busy"])], snaps["idle"]
    sock = work / "uffd.sock"
    if variant == "file":
        return restore_in_process(busy / "vm.state", str(busy / "vm.mem"), "File")
    if variant == "uffd":
        handler = start_handler(sock, busy / "vm.mem")
        try:
            sample = restore_in_process(busy / "vm.state", str(sock), "Uffd")
        finally:
            sample_handler = handler_stats(handler)
        sample["handler"] = sample_handler
        return sample
    if variant in ("exec-file", "exec-uffd"):
        argv = vmms.pyvmm_command() + ["run", "--restore", str(busy)]
        handler = None
        if variant == "exec-uffd":
            handler = start_handler(sock, busy / "vm.mem")
            argv += ["--uffd", str(sock)]
        try:
            with vmms.spawn(argv, [TICK]) as proc:
                got = proc.wait_marker(TICK, OUTPUT_TIMEOUT)
                sample = {"first_output_ms": None if got is None else got * 1e3}
                if got is None:
                    sample["error"] = (proc.out.decode(errors="replace") + proc.stderr())[-800:]
        finally:
            if handler is not None:
                sample_handler = handler_stats(handler)
        if handler is not None:
            sample["handler"] = sample_handler
        return sample
    from tests.framework.microvm import run_in_shell
    if variant == "shell-file":
        from pyvmm.microvm import MicroVM
        t0 = time.perf_counter()
        vm = MicroVM.restore(idle / "vm.state", idle / "vm.mem")
        try:
            run_in_shell(vm, "true", timeout=SHELL_TIMEOUT)
            return {"shell_ms": (time.perf_counter() - t0) * 1e3}
        finally:
            vm.close()
    assert variant == "shell-exec"
    with vmms.spawn(vmms.pyvmm_command() + ["run", "--restore", str(idle)]) as proc:
        run_in_shell(proc, "true", timeout=SHELL_TIMEOUT)
        return {"shell_ms": (time.perf_counter() - proc.t0) * 1e3}


# -- the one boot per size: cold boot, snapshots --------------------------------------------

def boot_and_snapshot(size: int, cpus: int, reps: int, where: Path) -> dict[str, Any]:
    """Boot, time the shell, take Full and Diff snapshots and the ticker snapshot."""
    from pyvmm.microvm import MicroVM
    from tests.framework.microvm import run_in_shell
    writes: list[tuple[float, bytes]] = []
    vm = MicroVM(mem_mib=size, vcpus=cpus, track_dirty_pages=True, vm_id=f"bench-{size}")
    capture_write = vm.capture.write

    def write(data: bytes) -> None:
        writes.append((time.perf_counter(), bytes(data)))
        capture_write(data)
    vm.capture.write = write
    out: dict[str, Any] = {"full": [], "diff": []}
    try:
        t0 = time.perf_counter()
        vm.start()
        vm.serial.expect(vmms.INIT_MARKER, timeout=BOOT_TIMEOUT)
        out["cold_init_s"] = time.perf_counter() - t0
        run_in_shell(vm, "true", timeout=SHELL_TIMEOUT)
        out["cold_shell_s"] = time.perf_counter() - t0
        print(f"  {size} MiB: cold boot start -> /init {out['cold_init_s']:.1f} s, -> shell "
              f"answers {out['cold_shell_s']:.1f} s", flush=True)
        run_in_shell(vm, "dmesg -n 1", timeout=SHELL_TIMEOUT)   # no kernel chatter on ttyS0
        floor = []
        for _ in range(3):
            t = time.perf_counter()
            run_in_shell(vm, "true", timeout=SHELL_TIMEOUT)
            floor.append((time.perf_counter() - t) * 1e3)
        out["shell_round_trip_ms"] = floor
        time.sleep(1.0)                                     # let the guest go idle
        for i in range(reps):
            out["full"].append(_take(vm, where / f"full-{i}", "Full"))
            vm.resume()
            time.sleep(0.5)
        for i in range(reps):
            run_in_shell(vm, f"dd if=/dev/urandom of=/tmp/blob{i} bs=4096 "
                             f"count={KNOWN_CHANGE_PAGES} 2>/dev/null", timeout=SHELL_TIMEOUT)
            out["diff"].append(_take(vm, where / f"diff-{i}", "Diff"))
            vm.resume()
        for s in out["full"] + out["diff"]:
            print(f"  {size} MiB: {s['type']:4s} snapshot {s['create_ms']:.1f} ms (pause "
                  f"{s['pause_ms']:.1f} ms), {s['memory_bytes_written'] / MiB:.2f} MiB "
                  f"written, state {s['state_bytes']} B", flush=True)
        # The ticker, and its interval between "@"s on the running guest.
        vm.serial.write(TICKER + "\n")
        vm.serial.expect(TICK * 4, timeout=OUTPUT_TIMEOUT)
        start = len(writes)
        time.sleep(2.0)
        ticks = [t for t, data in writes[start:] if TICK in data]
        out["tick_interval_ms"] = [(b - a) * 1e3 for a, b in zip(ticks, ticks[1:])]
        out["busy"] = []
        for i in range(BUSY_SNAPSHOTS):
            out["busy"].append(_take(vm, where / f"busy-{i}", "Full"))
            vm.resume()
            time.sleep(0.5)
        print(f"  {size} MiB: ticker running, median {_median(out['tick_interval_ms']):.2f} ms "
              f"between '@'s; {BUSY_SNAPSHOTS} ticker snapshots taken", flush=True)
    finally:
        vm.close()
    os.replace(where / f"full-{reps - 1}", where / "idle")
    return out


def _take(vm: Any, d: Path, kind: str) -> dict[str, Any]:
    d.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    vm.pause()
    paused = time.perf_counter()
    result = vm.snapshot(d / "vm.state", d / "vm.mem", kind)
    done = time.perf_counter()
    mem = (d / "vm.mem").stat()
    return {"type": kind, "pause_ms": (paused - t) * 1e3, "create_ms": (done - paused) * 1e3,
            "create_ms_internal": result.seconds * 1e3,
            "memory_bytes_written": result.memory_bytes_written,
            "memory_size": result.memory_size, "mem_file_allocated": mem.st_blocks * 512,
            "state_bytes": result.state_bytes}


def _median(values: list[float]) -> float:
    return Stats.of(values).median if values else float("nan")


# -- clones ---------------------------------------------------------------------------------

def _rollup() -> dict[str, int]:
    text = Path("/proc/self/smaps_rollup").read_text()
    return {k.lower(): int(v) * 1024 for k, v in re.findall(r"^(Rss|Pss):\s+(\d+) kB", text, re.M)}


def _anonymous(vm: Any) -> int:
    """Bytes of a MicroVM's guest memory mappings that are anonymous: in a MAP_PRIVATE
    file mapping, the copies the guest wrote (copy-on-write), i.e. its own pages.
    (memory_usage()'s `private` also counts clean page-cache pages that no other
    clone maps, so with one clone it is everything the clone touched.)"""
    starts = {region.host_addr for region in vm._vm.machine.memory.regions}
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                inside = int(first.split("-")[0], 16) in starts
            elif inside and first == "Anonymous:":
                total += int(line.split()[1]) * 1024
    return total


KERNEL_FIELDS = ("Slab", "PageTables", "SecPageTables")


def _kernel_kib() -> dict[str, int]:
    """Host-wide kernel memory that KVM guests grow: slab (KVM's per-VM and per-vCPU
    structures), page tables, and SecPageTables (KVM's shadow/TDP page tables)."""
    text = Path("/proc/meminfo").read_text()
    return {k: int(m.group(1)) for k in KERNEL_FIELDS
            if (m := re.search(rf"^{k}:\s+(\d+) kB", text, re.M))}


def measure_clones(idle: Path, count: int, work: Path, settle: float) -> dict[str, Any]:
    import gc
    from pyvmm.snapshot.clones import memory_usage, remove_clone_dirs, start_clones
    from tests.framework.microvm import run_in_shell
    gc.collect()
    before, kernel_before = _rollup(), _kernel_kib()
    clones = []
    try:
        t0 = time.perf_counter()
        clones = start_clones(idle / "vm.state", idle / "vm.mem", count, work)
        wall = time.perf_counter() - t0
        time.sleep(settle)
        usage = [dict(memory_usage(c.vm), anonymous=_anonymous(c.vm)) for c in clones]
        after, kernel_after = _rollup(), _kernel_kib()
        running = sum(1 for c in clones if c.vm.state == "Running")
        answered = 0
        for c in clones:
            try:
                if run_in_shell(c.vm, f"echo clone-{c.index}", timeout=SHELL_TIMEOUT).strip() \
                        == f"clone-{c.index}":
                    answered += 1
            except AssertionError:
                pass
    finally:
        for c in clones:
            c.vm.close()
        remove_clone_dirs(work)
    return {"count": count, "wall_s": wall, "clones_per_s": count / wall,
            "start_ms": [c.start_seconds * 1e3 for c in clones],
            "disk_copy": sorted({c.disk_copy for c in clones}),
            "usage": usage, "process_pss_delta": after["pss"] - before["pss"],
            "process_rss_delta": after["rss"] - before["rss"],
            "kernel_delta_kib": {k: kernel_after[k] - kernel_before[k] for k in kernel_after
                                 if k in kernel_before},
            "running": running, "answered": answered}


# -- the run --------------------------------------------------------------------------------

def run_size(size: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    where = root / f"{size}"
    where.mkdir(parents=True, exist_ok=True)
    booted = boot_and_snapshot(size, args.snap_cpus, args.snap_create_reps, where)
    snaps = {"busy": [where / f"busy-{i}" for i in range(BUSY_SNAPSHOTS)],
             "idle": where / "idle"}
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for rep in range(-1, args.reps):            # rep -1: a warm-up round, not counted
        for variant in harness.rotated(VARIANTS, rep):
            try:
                sample = restore_variant(variant, snaps, where, rep)
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                sample = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            sample["busy_snapshot"] = rep % BUSY_SNAPSHOTS
            if rep >= 0:
                samples[variant].append(sample)
            print(f"  {size} MiB {'warm-up' if rep < 0 else f'rep {rep + 1}'} {variant:10s} "
                  f"{_describe(sample)}", flush=True)
    clones = []
    for count in [int(c) for c in args.snap_clones.split(",") if c]:
        try:
            result = measure_clones(snaps["idle"], count, where / "clones", args.snap_settle)
        except Exception as exc:  # noqa: BLE001
            result = {"count": count, "error": f"{type(exc).__name__}: {exc}"[:800]}
        clones.append(result)
        if "error" in result:
            print(f"  {size} MiB {count} clones: {result['error']}", flush=True)
        else:
            pss = _median([u["pss"] / MiB for u in result["usage"]])
            print(f"  {size} MiB {count} clones: {result['clones_per_s']:.1f}/s, PSS/clone "
                  f"{pss:.2f} MiB, answered {result['answered']}/{count}", flush=True)
    return {"booted": booted, "restores": samples, "clones": clones}


def _describe(sample: dict[str, Any]) -> str:
    if "error" in sample and sample.get("first_output_ms") is None and "shell_ms" not in sample:
        return "FAILED " + sample["error"][-300:]
    if "shell_ms" in sample:
        return f"-> shell answers {sample['shell_ms']:.0f} ms"
    text = f"-> first output {sample['first_output_ms']:.1f} ms"
    if "marks_ms" in sample and "kvm_run" in sample["marks_ms"]:
        text = f"-> KVM_RUN {sample['marks_ms']['kvm_run']:.2f} ms " + text
    if sample.get("handler"):
        text += f" ({sample['handler'].get('pages_copied')} pages faulted in)"
    return text


def main(args: argparse.Namespace) -> dict[str, Any]:
    vmms.warm_bytecode()
    guest = vmms.builtin_guest()
    sizes = [int(s) for s in args.snap_sizes.split(",") if s]
    facts = harness.machine_facts()
    print(f"{harness.format_facts(facts)}\nbuilt-in guest {guest.vmlinux}; sizes {sizes} MiB, "
          f"{args.snap_cpus} vCPU(s); one boot per size; {args.reps} restores per variant; "
          f"{args.snap_create_reps} Full and Diff snapshots; clones {args.snap_clones}",
          flush=True)
    root = args.snap_dir or Path(tempfile.mkdtemp(prefix="pyvmm-snapshot-"))
    results: dict[int, Any] = {}
    try:
        for size in sizes:
            results[size] = run_size(size, args, root)
    finally:
        if args.snap_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    summary = {size: summarize(r) for size, r in results.items()}
    report(sizes, summary)
    data = {"benchmark": "snapshot", "machine": facts,
            "params": {"sizes_mib": sizes, "cpus": args.snap_cpus, "reps": args.reps,
                       "create_reps": args.snap_create_reps, "clones": args.snap_clones,
                       "settle_s": args.snap_settle, "kernel": str(guest.vmlinux),
                       "initrd": str(guest.initramfs), "ticker": TICKER,
                       "known_change_bytes": KNOWN_CHANGE_PAGES * 4096,
                       "pyvmm": vmms.pyvmm_command()},
            "goals": {"load_to_kvm_run_ms": f"< {GOAL_RESTORE_MS}",
                      "clone_mib_beyond_touched": f"< {GOAL_CLONE_MIB}"},
            "reference": {"firecracker_restore_p50_ms": FIRECRACKER_RESTORE_P50_MS,
                          "note": "Firecracker's published figure, on their hardware, not "
                                  "measured here (their load_snapshot latency metric)"},
            "summary": summary, "results": results}
    print(f"wrote {harness.write_json('snapshot', data)}")
    return data


# -- summaries and tables -------------------------------------------------------------------

def _stats(values: list[float | None]) -> Stats | None:
    got = [v for v in values if v is not None]
    return Stats.of(got) if got else None


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    restores, booted = r["restores"], r["booted"]
    out: dict[str, Any] = {}
    for variant in ("file", "uffd"):
        ok = [s for s in restores[variant] if s.get("first_output_ms") is not None]
        entry: dict[str, Any] = {
            "load_to_kvm_run_ms": _stats([s["marks_ms"].get("kvm_run") for s in ok]),
            "load_to_start_returned_ms": _stats([s["marks_ms"].get("running") for s in ok]),
            "load_to_returned_ms": _stats([s["returned_ms"] for s in ok]),
            "load_to_first_output_ms": _stats([s["first_output_ms"] for s in ok]),
            "kvm_run_to_first_output_ms": _stats(
                [s["first_output_ms"] - s["marks_ms"]["kvm_run"] for s in ok
                 if "kvm_run" in s["marks_ms"]]),
            "failures": len(restores[variant]) - len(ok)}
        phases = {}
        for i, (mark, label) in enumerate(PHASES):
            previous = PHASES[i - 1][0] if i else None
            phases[label] = _stats([s["marks_ms"][mark] - (s["marks_ms"][previous]
                                                            if previous else 0.0)
                                    for s in ok if mark in s["marks_ms"] and
                                    (previous is None or previous in s["marks_ms"])])
        entry["phases_ms"] = phases
        entry["spans_ms"] = {label: _stats([s["spans_ms"].get(label) for s in ok])
                             for label in SPANS}
        if variant == "uffd":
            entry["pages_faulted"] = _stats([(s.get("handler") or {}).get("pages_copied")
                                             for s in ok])
        out[variant] = entry
    for variant in ("exec-file", "exec-uffd"):
        ok = [s["first_output_ms"] for s in restores[variant]
              if s.get("first_output_ms") is not None]
        out[variant] = {"spawn_to_first_output_ms": _stats(ok),
                        "failures": len(restores[variant]) - len(ok)}
    for variant in ("shell-file", "shell-exec"):
        ok = [s["shell_ms"] for s in restores[variant] if "shell_ms" in s]
        out[variant] = {"to_shell_ms": _stats(ok), "failures": len(restores[variant]) - len(ok)}
    out["cold_boot"] = {"start_to_init_s": booted["cold_init_s"],
                        "start_to_shell_s": booted["cold_shell_s"],
                        "shell_round_trip_ms": _stats(booted["shell_round_trip_ms"]),
                        "tick_interval_ms": _stats(booted["tick_interval_ms"])}
    out["create"] = {}
    for kind in ("full", "diff"):
        taken = booted[kind]
        out["create"][kind] = {
            "create_ms": _stats([s["create_ms"] for s in taken]),
            "pause_ms": _stats([s["pause_ms"] for s in taken]),
            "memory_written_mib": _stats([s["memory_bytes_written"] / MiB for s in taken]),
            "mem_file_allocated_mib": _stats([s["mem_file_allocated"] / MiB for s in taken]),
            "state_bytes": _stats([s["state_bytes"] for s in taken]),
            "memory_size_mib": taken[0]["memory_size"] / MiB if taken else None}
    out["clones"] = []
    for c in r["clones"]:
        if "error" in c:
            out["clones"].append({"count": c["count"], "error": c["error"]})
            continue
        per = {k: _stats([u[k] / MiB for u in c["usage"]])
               for k in ("rss", "pss", "shared", "private", "anonymous")}
        guest_pss = sum(u["pss"] for u in c["usage"])
        out["clones"].append({
            "count": c["count"], "clones_per_s": c["clones_per_s"], "wall_s": c["wall_s"],
            "start_ms": _stats(c["start_ms"]), "per_clone_mib": per,
            "process_pss_per_clone_mib": c["process_pss_delta"] / c["count"] / MiB,
            "vmm_pss_per_clone_mib": (c["process_pss_delta"] - guest_pss) / c["count"] / MiB,
            "kernel_per_clone_mib": sum(c["kernel_delta_kib"].values()) / c["count"] / 1024,
            "answered": c["answered"], "running": c["running"]})
    return out


def _fmt(stats: Stats | None, fmt: str = ".1f") -> str:
    return stats.format(fmt) if stats else "-"


def report(sizes: list[int], summary: dict[int, Any]) -> None:
    cols = [f"{s} MiB" for s in sizes]
    rows = []
    for variant, name in (("file", "File"), ("uffd", "Uffd")):
        for key, what in (("load_to_kvm_run_ms", "load -> vCPU in KVM_RUN"),
                          ("load_to_start_returned_ms", "load -> LinuxVm.start() returned"),
                          ("load_to_returned_ms", "load -> load_snapshot returned"),
                          ("load_to_first_output_ms", "load -> first guest output"),
                          ("kvm_run_to_first_output_ms", "  of which KVM_RUN -> output (guest)")):
            rows.append([f"{name}, in process: {what}"] +
                        [_fmt(summary[s][variant][key], ".2f") for s in sizes])
    for variant, name in (("exec-file", "File"), ("exec-uffd", "Uffd")):
        rows.append([f"{name}, `pyvmm run --restore`: spawn -> first output"] +
                    [_fmt(summary[s][variant]["spawn_to_first_output_ms"]) for s in sizes])
    rows.append(["guest: interval between '@'s, running guest"] +
                [_fmt(summary[s]["cold_boot"]["tick_interval_ms"], ".2f") for s in sizes])
    rows.append(["Uffd: pages faulted in (until close)"] +
                [_fmt(summary[s]["uffd"].get("pages_faulted"), ".0f") for s in sizes])
    print()
    print(harness.format_table(["restore, ms, median [min-max]"] + cols, rows))
    print(f"goal: load -> vCPU in KVM_RUN < {GOAL_RESTORE_MS:.0f} ms.  Reference, not measured "
          f"here: Firecracker's published restore latency ~{FIRECRACKER_RESTORE_P50_MS:.0f} ms "
          "p50 (their load_snapshot metric, their hardware)")

    rows = []
    for variant in ("file", "uffd"):
        for label in [p[1] for p in PHASES]:
            rows.append([f"{variant}: {label}"] +
                        [_fmt(summary[s][variant]["phases_ms"].get(label), ".2f") for s in sizes])
    for label in SPANS:
        rows.append([f"file: . {label}"] +
                    [_fmt(summary[s]["file"]["spans_ms"].get(label), ".2f") for s in sizes])
    rows.append(["uffd: . userfaultfd + handshake"] +
                [_fmt(summary[s]["uffd"]["spans_ms"].get("userfaultfd + handshake"), ".2f")
                 for s in sizes])
    print()
    print(harness.format_table(["where the time goes, ms"] + cols, rows))

    rows = []
    for kind in ("full", "diff"):
        for key, what, fmt in (("create_ms", "create ms", ".1f"), ("pause_ms", "pause ms", ".1f"),
                               ("memory_written_mib", "memory written MiB", ".2f"),
                               ("mem_file_allocated_mib", "memory file on disk MiB", ".2f"),
                               ("state_bytes", "state file bytes", ".0f")):
            rows.append([f"{kind.capitalize()}: {what}"] +
                        [_fmt(summary[s]["create"][kind][key], fmt) for s in sizes])
    print()
    print(harness.format_table(["snapshot create, median [min-max]"] + cols, rows))
    print(f"Diff: after a known change of {KNOWN_CHANGE_PAGES * 4096 >> 10} KiB "
          "(dd into tmpfs) and the shell command that made it")

    rows = []
    for s in sizes:
        cold = summary[s]["cold_boot"]
        cold_ms = cold["start_to_shell_s"] * 1e3
        for name, stats in (("restore in process", summary[s]["shell-file"]["to_shell_ms"]),
                            ("`pyvmm run --restore`", summary[s]["shell-exec"]["to_shell_ms"])):
            rows.append([f"{s} MiB", name, _fmt(stats, ".0f"), f"{cold_ms:.0f}",
                         f"{stats.median / cold_ms:.4f}" if stats else "-",
                         _fmt(cold["shell_round_trip_ms"], ".0f")])
    print()
    print(harness.format_table(["guest", "to a usable shell", "restore ms", "cold boot ms",
                                "restore/cold", "shell round trip ms"], rows))

    rows = []
    for s in sizes:
        for c in summary[s]["clones"]:
            if "error" in c:
                rows.append([f"{s} MiB", c["count"], "failed"] + [""] * 9)
                continue
            per = c["per_clone_mib"]
            rows.append([f"{s} MiB", c["count"], f"{c['clones_per_s']:.1f}",
                         _fmt(c["start_ms"], ".0f"), _fmt(per["rss"], ".2f"),
                         _fmt(per["pss"], ".2f"), _fmt(per["private"], ".2f"),
                         _fmt(per["anonymous"], ".2f"),
                         f"{c['vmm_pss_per_clone_mib']:.2f}",
                         f"{c['kernel_per_clone_mib']:.2f}",
                         f"{c['process_pss_per_clone_mib']:.2f}",
                         f"{c['answered']}/{c['count']}"])
    print()
    print(harness.format_table(["guest", "clones", "clones/s", "start ms", "RSS MiB",
                                "PSS MiB", "private MiB", "written MiB", "VMM PSS MiB",
                                "kernel MiB", "process PSS MiB",
                                "answered"], rows))
    print("per clone, median over the clones: RSS/PSS/private from clones.memory_usage() (guest "
          "memory; private includes page-cache pages only this clone maps); written = its "
          "copy-on-write pages (smaps Anonymous); VMM PSS = process PSS growth per clone "
          "minus guest PSS (all clones share this process's interpreter); kernel = growth of "
          "the host's Slab + PageTables + SecPageTables per clone (host-wide: other users "
          "move it too)")
    print(f"goal: < {GOAL_CLONE_MIB:.0f} MiB per clone of an idle guest beyond what it touches "
          "(written pages + VMM PSS)")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7)
    add_arguments(p)
    main(p.parse_args())

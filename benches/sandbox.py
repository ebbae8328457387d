"""Sandboxes: time to a first result, cold boot against snapshot restore; exec round trip;
file and output throughput; memory per idle sandbox.

start       Sandbox() -> the result of `true` (sb.run("true") returned), in this process.
            `restore`: from the cached template (made first if missing, not timed):
            restore, agent HELLO, set_time + reseed, then `true`.  `cold`:
            Sandbox(cold=True) boots the same VM from scratch and waits for its agent.
            Baseline of the ratio: cold.  --sbx-cold-reps cold boots (about a minute
            each on KVM PVM), --reps restores.
exec        `true` in one running sandbox, --sbx-exec-reps times: a fresh vsock
            connection, HELLO, EXEC of `sh -c true`, EXIT, close (what sb.run costs);
            and HEALTH on a fresh connection, the same without a process: the
            difference is the guest's fork and exec.
upload,     put_file and get_file of --sbx-file-mib MiB of random bytes; MB/s.
download
output      `head -c N /dev/zero` with its stdout taken by the host; MB/s.
memory      --sbx-idle sandboxes started at once and left idle for --sbx-settle s: PSS
            of each one's guest memory (pages shared with the template's page cache
            divided among their sharers), RSS and private bytes.

E2B's and Firecracker's published figures are printed beside ours as references:
their numbers, on their hardware, not measured here.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from benches import harness

# Published figures (not measured here): E2B says a sandbox starts in ~150 ms
# (e2b.dev docs, "Sandbox lifecycle"); Firecracker's boot-time goal is < 125 ms to
# the guest's /init, its snapshot restore ~3 ms p50 (its performance tests).
E2B_START_MS = 150
FIRECRACKER_BOOT_MS = 125
FIRECRACKER_RESTORE_MS = 3
GOAL_RESTORE_S_PVM = 2.0         # issue 15's goal on KVM PVM hosts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sandbox")
    group.add_argument("--sbx-cold-reps", type=int, default=1,
                       help="cold boots timed (default 1; ~1 min each on KVM PVM)")
    group.add_argument("--sbx-exec-reps", type=int, default=20,
                       help="`exec true` round trips timed (default 20)")
    group.add_argument("--sbx-file-mib", type=int, default=8,
                       help="MiB uploaded, downloaded and printed (default 8: a guest's "
                            "kernel moves ~0.3 MB/s on KVM PVM)")
    group.add_argument("--sbx-idle", type=int, default=5,
                       help="idle sandboxes for the memory figure (default 5)")
    group.add_argument("--sbx-settle", type=float, default=2.0,
                       help="seconds the idle sandboxes settle before reading memory")


def _time_to_true(**options: Any) -> float:
    from pyvmm.sandbox import Sandbox
    started = time.monotonic()
    with Sandbox(**options) as sb:
        if sb.run("true").returncode != 0:
            raise RuntimeError("`true` failed in the sandbox")
        return time.monotonic() - started


def measure_start(args: argparse.Namespace) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"restore": [], "cold": []}
    _time_to_true()                                     # warm-up: page cache, imports
    for rep in range(max(args.reps, args.sbx_cold_reps)):
        variants = ["restore"] + (["cold"] if rep < args.sbx_cold_reps else [])
        for variant in harness.rotated(variants, rep):
            if variant == "restore" and rep >= args.reps:
                continue
            out[variant].append(_time_to_true(cold=variant == "cold"))
            print(f"  start {variant}: {out[variant][-1]:.2f} s", flush=True)
    return out


def measure_running(args: argparse.Namespace) -> dict[str, Any]:
    from pyvmm.sandbox import Sandbox
    size = args.sbx_file_mib << 20
    data = os.urandom(size)
    with Sandbox() as sb:
        rtt, health = [], []
        for _ in range(args.sbx_exec_reps):
            started = time.perf_counter()
            sb.run("true")
            rtt.append(time.perf_counter() - started)
            started = time.perf_counter()
            sb.agent.health()
            health.append(time.perf_counter() - started)
        started = time.perf_counter()
        sb.write_file("/tmp/bench.bin", data)
        upload = time.perf_counter() - started
        started = time.perf_counter()
        back = sb.read_file("/tmp/bench.bin")
        download = time.perf_counter() - started
        if back != data:
            raise RuntimeError("the downloaded file differs from the uploaded one")
        sb.run("rm /tmp/bench.bin")
        started = time.perf_counter()
        printed = sb.run(["head", "-c", str(size), "/dev/zero"])
        output = time.perf_counter() - started
        if len(printed.stdout) != size:
            raise RuntimeError(f"`head` printed {len(printed.stdout)} bytes, not {size}")
    mb = size / 1e6
    return {"exec_rtt_ms": [t * 1e3 for t in rtt], "health_rtt_ms": [t * 1e3 for t in health],
            "upload_mb_s": mb / upload,
            "download_mb_s": mb / download, "output_mb_s": mb / output}


def measure_memory(args: argparse.Namespace) -> list[dict[str, int]]:
    from pyvmm.sandbox import Sandbox
    from pyvmm.snapshot.clones import memory_usage
    boxes = []
    try:
        for _ in range(args.sbx_idle):
            boxes.append(Sandbox())
        time.sleep(args.sbx_settle)
        return [memory_usage(sb.vm) for sb in boxes]
    finally:
        for sb in boxes:
            sb.close()


def main(args: argparse.Namespace) -> dict[str, Any]:
    from pyvmm.sandbox import DEFAULT_MEM_MIB, ensure_template
    facts = harness.machine_facts()
    print(f"{harness.format_facts(facts)}\nsandbox {DEFAULT_MEM_MIB} MiB, 1 vCPU; {args.reps} "
          f"restores, {args.sbx_cold_reps} cold boot(s); exec x{args.sbx_exec_reps}; "
          f"{args.sbx_file_mib} MiB transfers; {args.sbx_idle} idle sandboxes", flush=True)
    made = time.monotonic()
    template = ensure_template(log=print)
    print(f"template: {template.directory} ({time.monotonic() - made:.1f} s, 0 if cached)",
          flush=True)
    start = measure_start(args)
    running = measure_running(args)
    memory = measure_memory(args)
    cold = harness.Stats.of(start["cold"])
    restore = harness.Stats.of(start["restore"])
    rtt = harness.Stats.of(running["exec_rtt_ms"])
    pss = [m["pss"] / 2**20 for m in memory]
    rows = [
        ["Sandbox() -> `true`, cold boot (s)", cold.format(".2f"), "1.00x", ""],
        ["Sandbox() -> `true`, from snapshot (s)", restore.format(".2f"),
         f"{cold.median / restore.median:.0f}x faster",
         f"E2B ~{E2B_START_MS} ms; goal on PVM < {GOAL_RESTORE_S_PVM:g} s"],
        ["`exec true` round trip (ms)", rtt.format(".1f"), "", ""],
        ["agent round trip, no process (HEALTH) (ms)",
         harness.Stats.of(running["health_rtt_ms"]).format(".1f"), "", ""],
        ["upload (MB/s)", f"{running['upload_mb_s']:.2f}", "", ""],
        ["download (MB/s)", f"{running['download_mb_s']:.2f}", "", ""],
        ["command output (MB/s)", f"{running['output_mb_s']:.2f}", "", ""],
        [f"PSS per idle sandbox, {len(pss)} at once (MiB)",
         f"{statistics.median(pss):.1f} [{min(pss):.1f}-{max(pss):.1f}]", "", ""],
    ]
    print(harness.format_table(["measure", "median [min-max]", "ratio", "reference"], rows))
    print(f"references (theirs, not measured here): E2B sandbox start ~{E2B_START_MS} ms; "
          f"Firecracker boot < {FIRECRACKER_BOOT_MS} ms, snapshot restore ~"
          f"{FIRECRACKER_RESTORE_MS} ms")
    data = {"benchmark": "sandbox", "machine": facts,
            "params": {"reps": args.reps, "cold_reps": args.sbx_cold_reps,
                       "exec_reps": args.sbx_exec_reps, "file_mib": args.sbx_file_mib,
                       "idle": args.sbx_idle, "mem_mib": DEFAULT_MEM_MIB},
            "start_s": start, "running": running, "memory": memory,
            "reference": {"e2b_start_ms": E2B_START_MS, "firecracker_boot_ms": FIRECRACKER_BOOT_MS,
                          "firecracker_restore_ms": FIRECRACKER_RESTORE_MS,
                          "note": "published figures, their hardware, not measured here"}}
    harness.write_json("sandbox", data)
    return data

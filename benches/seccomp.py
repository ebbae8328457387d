"""The cost of seccomp: the same work with pyvmm's filters on and off, in one run.

  syscall  one system call (getpid) in a thread under the vcpu, io and api filters
  exits  the exit round trip of benches/exits.py (a tiny 64-bit guest making N PIO or
         MMIO accesses, C and Python handlers), the vCPU thread filtered or not
  blk    benches/blk.py's guest (sequential write/read, 4 KiB random reads) under
         `pyvmm run` and `pyvmm run --no-seccomp`
  net    benches/net.py's guest (TCP each way through a TAP), likewise

Every number is printed with its ratio to the no-seccomp baseline of the same
repetition (1.00 = no cost; above 1 for time per exit means slower, below 1 for
throughput means slower).  blk and net boot Linux (minutes each on KVM PVM):
`--seccomp-parts syscall,exits` (or --quick) runs the parts without Linux.

    python -m benches seccomp [--exits N] [--reps N] [--io-reps N] [--seccomp-parts exits,blk,net]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from typing import Any

from benches import blk, exits, harness, net, vmms
from benches.harness import Stats
from pyvmm import seccomp
from pyvmm.devices.debug import SCRATCH_SIZE, Scratch
from pyvmm.kvm import OutcomeKind
from pyvmm.testbed import Mode, TinyVm

MODES = ("off", "on")
PARTS = ("syscall", "exits", "blk", "net")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    harness.add_options(parser, "seccomp", [
        ("--seccomp-parts", str, ",".join(PARTS),
         "which of exits, blk, net to measure (default all; blk and net boot Linux)")])


def exit_run(code: bytes, access: exits.Access, handler: str, n: int,
             policy: seccomp.Policy | None) -> float:
    """ns per exit of one vm.run(), the vCPU thread under policy (None: unfiltered)."""
    with TinyVm(Mode.LONG_RING0) as vm:
        vm.machine.seccomp = policy
        if handler == "c":
            Scratch(vm.machine, access.bus, access.base, name="dev")
        else:
            vm.machine.add_device(access.bus, access.base, SCRATCH_SIZE, exits.PyScratch(),
                                  name="dev")
        vm.load(code)
        start = time.perf_counter_ns()
        outcome = vm.run(timeout=60 + n * 1e-3)
        elapsed = time.perf_counter_ns() - start
        served = vm.machine.stats()["devices"]["dev"]
    if outcome.kind != OutcomeKind.DEVICE_STOP or served != n:
        raise RuntimeError(f"{access.name}/{handler}: {outcome.describe()}, {served} served")
    return elapsed / n


def measure_exits(n: int, reps: int) -> dict[str, Any]:
    policy = seccomp.resolve(True)
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    for access in exits.ACCESSES:
        code = exits.guest_code(access, n)
        warm = exits.guest_code(access, min(n, 1000))
        for handler in ("c", "python"):
            key = f"{access.name}/{handler}"
            samples[key] = {m: [] for m in MODES}
            for mode in MODES:
                exit_run(warm, access, handler, min(n, 1000), policy if mode == "on" else None)
            for rep in range(reps):
                for mode in harness.rotated(MODES, rep):
                    samples[key][mode].append(exit_run(code, access, handler, n,
                                                       policy if mode == "on" else None))
    summary = {key: {"off": Stats.of(s["off"]), "on": Stats.of(s["on"]),
                     "ratio": Stats.of([b / a for a, b in zip(s["off"], s["on"])])}
               for key, s in samples.items()}
    rows = [[key, s["off"].format(), s["on"].format(), s["ratio"].format(".3f")]
            for key, s in summary.items()]
    print(f"\nExit round trip, {n} exits per run, {reps} repetitions, ns/exit median [min-max]:")
    print(harness.format_table(["access/handler", "no seccomp", "seccomp", "seccomp / none"],
                               rows), flush=True)
    return {"summary": summary, "samples": samples}


def syscall_run(kind: str, policy: seccomp.Policy | None, n: int) -> float:
    """ns per getpid() (a system call every filter allows, with no work in the
    kernel) in a fresh thread under the filter of kind, or none."""
    import threading
    out: list[float] = []

    def body() -> None:
        seccomp.enter_thread(kind, policy, "bench")
        getpid = os.getpid
        start = time.perf_counter_ns()
        for _ in range(n):
            getpid()
        out.append((time.perf_counter_ns() - start) / n)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return out[0]


def measure_syscalls(n: int, reps: int) -> dict[str, Any]:
    """What the filter adds to one system call, per thread kind."""
    policy = seccomp.resolve(True)
    samples = {kind: {m: [] for m in MODES} for kind in ("vcpu", "io", "api")}
    for rep in range(reps):
        for kind in samples:
            for mode in harness.rotated(MODES, rep):
                samples[kind][mode].append(syscall_run(kind, policy if mode == "on" else None,
                                                       n))
    summary = {kind: {"off": Stats.of(s["off"]), "on": Stats.of(s["on"]),
                      "added_ns": Stats.of([b - a for a, b in zip(s["off"], s["on"])])}
               for kind, s in samples.items()}
    rows = [[kind, s["off"].format(".0f"), s["on"].format(".0f"), s["added_ns"].format(".0f")]
            for kind, s in summary.items()]
    print(f"\nOne system call (getpid from Python), {n} per run, {reps} repetitions, ns, "
          "median [min-max]:")
    print(harness.format_table(["filter", "no seccomp", "seccomp", "added"], rows), flush=True)
    return {"summary": summary, "samples": samples}


def no_seccomp(argv: list[str]) -> list[str]:
    return argv + ["--no-seccomp"]


def measure_linux(part: str, args: argparse.Namespace) -> dict[str, Any]:
    vmms.warm_bytecode()
    guest = vmms.builtin_guest()
    initrd = vmms.initramfs_with_tool(guest.initramfs)
    samples: dict[str, list[dict]] = {m: [] for m in MODES}
    ns = None
    try:
        if part == "blk":
            image = blk.disk_image(args.blk_disk_mib)
            cmd = (f'pyvmm.cmd="/bin/benchtool blk /dev/vda {args.blk_seq_mib} '
                   f'{args.blk_rand_seconds}"')
            metrics = blk.METRICS
        else:
            ns = vmms.bench_netns(f"pyvmm-bench-sc-{os.getpid()}")
            cmd = (f'pyvmm.cmd="/bin/benchtool net eth0 {ns.guest_ip} {ns.host_ip} '
                   f'{args.net_mib} {args.net_seconds}"')
            metrics = net.METRICS
        full = vmms.pyvmm_full_cmdline(guest.vmlinux, initrd, cmd, blk.MEM_MIB)
        for rep in range(args.io_reps):
            for mode in harness.rotated(MODES, rep):
                base_wrap = (lambda a: a) if ns is None else ns.wrap
                wrap = base_wrap if mode == "on" else (lambda a, w=base_wrap: w(no_seccomp(a)))
                if part == "blk":
                    blk.drop_cache(image)
                    sample = blk.run_io_guest("pyvmm", guest, initrd, cmd, full, disks=[image],
                                              wrap=wrap, last=b"BENCH randread",
                                              timeout=args.io_timeout)
                else:
                    peer = ns.python(net.PEER, ns.host_ip, str(args.net_mib),
                                     str(args.net_seconds), stdout=subprocess.PIPE, text=True)
                    assert peer.stdout.readline().strip() == "PEER-READY"
                    try:
                        sample = blk.run_io_guest("pyvmm", guest, initrd, cmd, full,
                                                  taps=[(ns.tap, net.MAC)], wrap=wrap,
                                                  last=b"BENCH tx", timeout=args.io_timeout)
                        if "tx" not in sample["results"]:
                            peer.kill()
                        out, _ = peer.communicate(timeout=60)
                    except BaseException:
                        peer.kill()
                        raise
                    for line in out.splitlines():
                        if line.startswith("PEER-RESULT "):
                            peer_result = json.loads(line.split(" ", 1)[1])
                            if "tx" in sample["results"] and peer_result.get("tx_MBps"):
                                sample["results"]["tx"]["MBps"] = peer_result["tx_MBps"]
                samples[mode].append(sample)
                print(f"  {part} rep {rep + 1} seccomp {mode:3s}: {sample['results'] or sample.get('console_tail', '')[-800:]}",
                      flush=True)
    finally:
        if ns is not None:
            ns.delete()
    summary: dict[str, Any] = {}
    rows = []
    for name, unit, label in metrics:
        vals = {m: [s["results"][name][unit] for s in samples[m] if name in s["results"]]
                for m in MODES}
        pairs = [(a["results"][name][unit], b["results"][name][unit])
                 for a, b in zip(samples["off"], samples["on"])
                 if name in a["results"] and name in b["results"] and a["results"][name][unit]]
        entry = {m: Stats.of(vals[m]) if vals[m] else None for m in MODES}
        entry["ratio"] = Stats.of([b / a for a, b in pairs]) if pairs else None
        summary[name] = entry
        rows.append([label] + [entry[m].format(".3f") if entry[m] else "failed" for m in MODES]
                    + [entry["ratio"].format(".3f") if entry["ratio"] else "-"])
    print(f"\n{part}: {args.io_reps} boot(s) each way, median [min-max]:")
    print(harness.format_table([part, "no seccomp", "seccomp", "seccomp / none"], rows),
          flush=True)
    return {"summary": summary, "samples": samples}


def main(args: argparse.Namespace) -> dict[str, Any]:
    parts = [p for p in args.seccomp_parts.split(",") if p]
    if getattr(args, "quick", False):
        parts = [p for p in parts if p in ("syscall", "exits")]    # --quick: no Linux boots
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--seccomp-parts: unknown {sorted(unknown)}; use {', '.join(PARTS)}")
    facts = harness.machine_facts()
    print(harness.format_facts(facts), flush=True)
    result: dict[str, Any] = {"benchmark": "seccomp", "facts": facts,
                              "params": {"exits": args.exits, "reps": args.reps,
                                         "io_reps": args.io_reps, "parts": parts}}
    if "syscall" in parts:
        result["syscall"] = measure_syscalls(200_000, args.reps)
    if "exits" in parts:
        result["exits"] = measure_exits(args.exits, args.reps)
    for part in ("blk", "net"):
        if part in parts:
            result[part] = measure_linux(part, args)
    print(f"wrote {harness.write_json('seccomp', result)}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    exits.add_arguments(parser)
    blk.add_arguments(parser)
    net.add_arguments(parser)
    add_arguments(parser)
    main(parser.parse_args())

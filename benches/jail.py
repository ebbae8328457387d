"""The jailer's cost on start-up: `pyvmm run` and `pyvmm api` started plain and under
`pyvmm jail`, back to back in each repetition.

first-output  the tiny PVH guest (startup.py's: writes "X" to COM1 at its entry), 128 MiB,
              1 vCPU: spawn -> "X" read on the VMM's stdout.  Jailed: `pyvmm jail --id ID
              --uid 4323 --gid 4323 --cgroup memory.max=1G --cgroup pids.max=64 -- run ...`
              (a new mount namespace, binds, cgroups, uid drop), the tiny guest bound in.
api           `pyvmm api --api-sock S`: spawn -> the first connect() to S that succeeds;
              jailed, S is <base>/pyvmm/<id>/root/api.sock.
jailer        the jailer's own share, as it reports it (PYVMM_JAIL_TIMING=1): from its
              main() to the VMM's exec (ldd of the interpreter's modules, the mount plan,
              cgroups, fork, mounts and pivot_root).

Every variant runs with benches.vmms.child_env() (bytecode cached in our own
PYTHONPYCACHEPREFIX, which the jailer binds read-only for the jailed interpreter), after
one warm-up round that is not counted.  Jails are made under a temporary base directory
and removed; each jailed VMM is ended with SIGTERM so that its jailer removes its cgroups.
Needs root.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from benches import harness, vmms
from benches.harness import Stats

MEM_MIB = 128
UID = GID = 4323
VARIANTS = ("run", "jail-run", "api", "jail-api")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("jail")
    group.add_argument("--jail-reps", type=int, default=11, help="runs per variant (default 11)")


def _stop(vmm) -> None:
    """SIGTERM first (a jailer forwards it and removes the jail's cgroups), then close."""
    if vmm.returncode is None:
        vmm.send_signal(signal.SIGTERM)
        try:
            vmm.wait(30)
        except Exception:  # noqa: BLE001 - close() kills it
            pass
    vmm.close()


def main(args: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() != 0:
        print("jail: needs root; skipped")
        return {}
    tiny = vmms.tiny_pvh_guest()
    os.chmod(tiny, 0o644)
    facts = harness.machine_facts()
    print(f"{harness.format_facts(facts)}\ntiny guest {tiny}, {MEM_MIB} MiB, 1 vCPU; "
          f"{args.jail_reps} runs per variant", flush=True)
    vmms.warm_bytecode()
    base = Path(tempfile.mkdtemp(prefix="pyvmm-jail-bench-"))
    os.chmod(base, 0o755)
    parent = f"pyvmm-bench-{os.getpid()}"
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    jailer_ms: list[float] = []
    errors: dict[str, str] = {}
    count = 0

    def jail_prefix() -> tuple[list[str], str]:
        nonlocal count
        count += 1
        jail_id = f"bench-{count}"
        return vmms.pyvmm_command() + [
            "jail", "--id", jail_id, "--uid", str(UID), "--gid", str(GID),
            "--chroot-base-dir", str(base), "--parent-cgroup", parent,
            "--cgroup", "memory.max=1G", "--cgroup", "pids.max=64", "--"], jail_id

    def one(variant: str) -> tuple[float | None, str, str]:
        run_args = ["run", "--mem", str(MEM_MIB), "--cpus", "1", "--console", "stdio",
                    "--kernel", str(tiny)]
        if variant == "run":
            argv, sock = vmms.pyvmm_command() + run_args, None
        elif variant == "jail-run":
            prefix, _ = jail_prefix()
            argv, sock = prefix + run_args, None
        elif variant == "api":
            sock = base / "plain-api.sock"
            if sock.exists():
                sock.unlink()
            argv = vmms.pyvmm_command() + ["api", "--api-sock", str(sock)]
        else:
            prefix, jail_id = jail_prefix()
            sock = base / "pyvmm" / jail_id / "root" / "api.sock"
            argv = prefix + ["api", "--api-sock", "api.sock"]
        env = vmms.child_env()
        env["PYVMM_JAIL_TIMING"] = "1"
        from tests.framework.process import Process
        vmm = Process(argv, env=env, markers=[b"X"])
        try:
            if sock is None:
                t = vmm.wait_marker(b"X", 30)
            else:
                t = vmm.wait_for_socket(sock, 30, interval=0.0005)
        finally:
            _stop(vmm)
        err = vmm.stderr()
        return t, err, (vmm.out.decode(errors="replace") + err)[-600:]

    try:
        for rep in range(-1, args.jail_reps):          # rep -1: a warm-up round, dropped
            for variant in harness.rotated(VARIANTS, rep):
                t, err, tail = one(variant)
                if t is None:
                    errors[variant] = tail
                    print(f"  {variant}: no answer: {tail}", flush=True)
                elif rep >= 0:
                    samples[variant].append(t * 1e3)
                    found = re.search(r"pyvmm jail: exec after ([\d.]+) ms", err)
                    if found:
                        jailer_ms.append(float(found.group(1)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
        for controller in ("memory", "pids"):
            try:
                os.rmdir(f"/sys/fs/cgroup/{controller}/{parent}")
            except OSError:
                pass

    summary: dict[str, Any] = {v: {"ms": Stats.of(samples[v]) if samples[v] else None}
                               for v in VARIANTS}
    summary["jailer_to_exec"] = {"ms": Stats.of(jailer_ms) if jailer_ms else None}
    ratios = {}
    for jailed, plain in (("jail-run", "run"), ("jail-api", "api")):
        pairs = list(zip(samples[jailed], samples[plain]))
        if pairs:
            ratios[jailed] = Stats.of([a / b for a, b in pairs])
            summary[jailed]["ratio_to_" + plain] = ratios[jailed]
            summary[jailed]["extra_ms"] = Stats.of([a - b for a, b in pairs])
    if all(samples.values()):
        rows = [["spawn -> first guest output", summary["run"]["ms"].format(".1f"),
                 summary["jail-run"]["ms"].format(".1f"), ratios["jail-run"].format(".2f")],
                ["spawn -> API socket accepts", summary["api"]["ms"].format(".1f"),
                 summary["jail-api"]["ms"].format(".1f"), ratios["jail-api"].format(".2f")],
                ["jailer main() -> VMM exec", "", summary["jailer_to_exec"]["ms"].format(".1f")
                 if jailer_ms else "-", ""]]
        print()
        print(harness.format_table(["ms, median [min-max]", "plain", "jailed", "jailed/plain"],
                                   rows))
    data = {"facts": facts, "params": {"reps": args.jail_reps, "mem_mib": MEM_MIB,
                                       "uid": UID, "tiny_guest": str(tiny)},
            "summary": summary, "samples_ms": samples, "jailer_ms": jailer_ms,
            "errors": errors}
    harness.write_json("jail", data)
    return data


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    main(p.parse_args())

"""Boot to /init: exec -> the `PYVMM-INIT-OK` marker the built-in guest's /init prints.

Variants, all with the built-in guest's kernel, initramfs, command line and
memory, one vCPU:

  pyvmm-pvh      pyvmm run --kernel vmlinux (PVH entry)
  pyvmm-bzimage  pyvmm run --kernel bzImage (64-bit boot protocol)
  qemu-pvh       qemu-system-x86_64 -M microvm -kernel vmlinux (qboot, PVH)
  qemu-bzimage   qemu-system-x86_64 -M microvm -kernel bzImage (qboot, boot protocol)

Measured the same way for every variant: wall clock from just before spawning
the VMM to the parent reading the marker on the VMM's stdout (the serial
console).  The command line is the whole one pyvmm boots with (its defaults and,
on KVM PVM, its PVM parameters), given to QEMU as -append verbatim, plus
`pyvmm.cmd=true` so that /init reboots at once and both VMMs exit.  pyvmm's own
boot timer (the serial device's time stamp of the marker write, from exec and
from VM start; `--stats`) is reported beside it.

On KVM PVM a boot takes 1.5-5 minutes (guest ring 0 is emulated), so the
default is one repetition: `--boot-reps N` for more.
"""
from __future__ import annotations

import argparse
from typing import Any

from benches import harness, vmms
from benches.harness import Stats

GOAL = 0.9                   # pyvmm <= 0.9x QEMU (issue 6)
TIMEOUT = 900.0
VARIANTS = ("pyvmm-pvh", "pyvmm-bzimage", "qemu-pvh", "qemu-bzimage")
BASELINE = {"pyvmm-pvh": "qemu-pvh", "pyvmm-bzimage": "qemu-bzimage"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("boot")
    group.add_argument("--boot-reps", type=int, default=1,
                       help="boots per variant (default 1: ~1.5-5 min each on KVM PVM)")
    group.add_argument("--boot-mem", type=int, default=256, help="guest MiB (default 256)")
    group.add_argument("--boot-variants", default=",".join(VARIANTS),
                       help=f"comma-separated subset of {','.join(VARIANTS)}")


def main(args: argparse.Namespace) -> dict[str, Any]:
    qemu = vmms.ensure_qemu()
    vmms.warm_bytecode()
    guest = vmms.builtin_guest()
    mem = args.boot_mem
    cmdline = vmms.pyvmm_full_cmdline(guest.vmlinux, guest.initramfs, "pyvmm.cmd=true", mem)
    kernels = {"pvh": guest.vmlinux, "bzimage": guest.bzimage}
    variants = [v for v in args.boot_variants.split(",") if v]
    facts = harness.machine_facts()
    print(f"{harness.format_facts(facts)}\n{qemu['version']}\n"
          f"{args.boot_reps} boot(s) per variant (Linux boots are slow on KVM PVM; "
          f"--boot-reps N for more); {mem} MiB, 1 vCPU\ncommand line: {cmdline}", flush=True)
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rep in range(args.boot_reps):
        for variant in harness.rotated(variants, rep):
            vmm, kind = variant.split("-")
            kernel = kernels[kind]
            if vmm == "pyvmm":
                # --cmdline is appended to pyvmm's defaults: the result is `cmdline`.
                argv = vmms.pyvmm_argv(kernel, guest.initramfs, "pyvmm.cmd=true", mem)
            else:
                argv = vmms.qemu_argv(kernel, guest.initramfs, cmdline, mem)
            run = vmms.run_to_exit(argv, [vmms.INIT_MARKER], TIMEOUT)
            sample: dict[str, Any] = {"to_marker_s": run.markers[vmms.INIT_MARKER.decode()],
                                      "to_exit_s": run.exited, "returncode": run.returncode}
            if vmm == "pyvmm":
                stats = vmms.pyvmm_stats(run.stderr) or {}
                sample["pyvmm_boot_timer"] = stats.get("boot")
                sample["pyvmm_stats"] = stats
            if sample["to_marker_s"] is None:
                sample["error"] = (run.text()[-1500:] + run.stderr.decode(errors="replace")
                                   [-1500:])
            samples[variant].append(sample)
            marker = sample["to_marker_s"]
            print(f"  rep {rep + 1} {variant:14s} exec->marker "
                  f"{'FAILED' if marker is None else f'{marker:.2f} s'}"
                  f"{'' if run.exited is None else f'  exit {run.exited:.2f} s'}"
                  f"{'  timer ' + repr(sample.get('pyvmm_boot_timer')) if vmm == 'pyvmm' else ''}",
                  flush=True)
            if marker is None:
                print(sample["error"][-800:], flush=True)

    summary: dict[str, Any] = {}
    rows = []
    for variant in variants:
        got = [s["to_marker_s"] for s in samples[variant] if s["to_marker_s"] is not None]
        timer_exec = [s["pyvmm_boot_timer"]["exec_to_init"] for s in samples[variant]
                      if (s.get("pyvmm_boot_timer") or {}).get("exec_to_init") is not None]
        timer_start = [s["pyvmm_boot_timer"]["start_to_init"] for s in samples[variant]
                       if (s.get("pyvmm_boot_timer") or {}).get("start_to_init") is not None]
        entry: dict[str, Any] = {"exec_to_marker_s": Stats.of(got) if got else None}
        if timer_exec:
            entry["timer_exec_to_init_s"] = Stats.of(timer_exec)
            entry["timer_start_to_init_s"] = Stats.of(timer_start)
        base = BASELINE.get(variant)
        ratio = None
        if base in samples:
            pairs = [(a["to_marker_s"], b["to_marker_s"])
                     for a, b in zip(samples[variant], samples[base])
                     if a["to_marker_s"] and b["to_marker_s"]]
            if pairs:
                ratio = Stats.of([a / b for a, b in pairs])
                entry["ratio_to_" + base] = ratio
        summary[variant] = entry
        rows.append([variant,
                     entry["exec_to_marker_s"].format(".1f") if got else "failed",
                     entry["timer_exec_to_init_s"].format(".1f") if timer_exec else "-",
                     entry["timer_start_to_init_s"].format(".1f") if timer_exec else "-",
                     f"{ratio.format('.3f')} vs {base}" if ratio else "-"])
    print()
    print(harness.format_table(["variant", "exec->marker s", "pyvmm timer exec->init s",
                                "pyvmm timer start->init s", "ratio pyvmm/QEMU"], rows))
    print(f"goal: pyvmm <= {GOAL}x QEMU exec->marker; the ratio is per repetition "
          "(pyvmm and QEMU boots of the same repetition run back to back)")
    return vmms.write_comparison(
        "boot", facts, qemu,
        params={"reps": args.boot_reps, "mem_mib": mem, "cpus": 1, "cmdline": cmdline,
                "kernel_pvh": str(guest.vmlinux), "kernel_bzimage": str(guest.bzimage),
                "initrd": str(guest.initramfs), "pyvmm": vmms.pyvmm_command(),
                "variants": variants},
        goal=f"pyvmm <= {GOAL}x QEMU", summary=summary, samples=samples)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    main(p.parse_args())

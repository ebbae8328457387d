"""Boot: exec -> /init marker (the built-in guest), exec -> first console line (Debian's kernel).

Variants.  The built-in guest's kernel and initramfs, to the `PYVMM-INIT-OK`
marker its /init prints (`pyvmm.cmd=true`: /init reboots at once, both VMMs exit):

  pyvmm-pvh        pyvmm run --kernel vmlinux (PVH entry)
  qemu-pvh         qemu-system-x86_64 -M microvm -kernel vmlinux (qboot, PVH)
  pyvmm-bz-host    pyvmm run --kernel bzImage, an empty kernel cache: the LZ4 payload
                   is decompressed on the host, the ELF loaded and entered at its
                   64-bit entry (issue 17); what a first boot of a kernel costs
  pyvmm-bz-cached  the same with the decompressed kernel already in the cache (filled
                   before the repetitions): every later boot of the same file
  pyvmm-bz-guest   pyvmm run --kernel bzImage --no-host-decompress: the bzImage's own
                   decompressor runs in the guest, as under QEMU
  qemu-bzimage     qemu-system-x86_64 -M microvm -kernel bzImage (qboot, boot protocol;
                   the in-guest decompressor)

Debian 12's generic kernel (linux-image-amd64's bzImage, XZ; firmware/
fetch-debian-kernel.sh), with the same initramfs, to its first console line
(`Linux version`, `earlyprintk=ttyS0`); the VMM is then killed (there is no root
file system for this kernel, so it would not get much further):

  pyvmm-debian-host    pyvmm run --kernel vmlinuz, an empty kernel cache
  pyvmm-debian-cached  the same from the cache
  qemu-debian          qemu-system-x86_64 -M microvm -kernel vmlinuz: the XZ
                       decompressor in the guest, many minutes on KVM PVM (its own
                       timeout, --boot-debian-timeout; a timeout is reported as one)

Measured the same way for every variant: wall clock from just before spawning
the VMM to the parent reading the marker on the VMM's stdout (the serial
console); `Linux version` is time-stamped in every variant, so the table also
shows when the kernel proper started.  The command line is the whole one pyvmm
boots with (its defaults and, on KVM PVM, its PVM parameters), given to QEMU as
-append verbatim.  pyvmm's own boot timer (`--stats`) is reported beside it, and
pyvmm's `pyvmm: kernel:` stderr line is recorded with every pyvmm sample (a
sample whose line says another path than its variant's is flagged).  Ratios are
pyvmm / QEMU within the same repetition.

On KVM PVM a boot takes about a minute (guest ring 0 is emulated), so the
default is one repetition: `--boot-reps N` for more.
"""
from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benches import harness, vmms
from benches.harness import Stats

GOALS = {
    "pyvmm-pvh": ("ratio", 0.9, "<= 0.9x QEMU (issue 6)"),
    "pyvmm-bz-host": ("ratio", 0.7, "<= 0.7x QEMU to /init (issue 17)"),
    "pyvmm-bz-cached": ("ratio", 0.7, "<= 0.7x QEMU to /init (issue 17)"),
    "pyvmm-debian-host": ("seconds", 60.0, "first console line < 60 s (issue 17)"),
    "pyvmm-debian-cached": ("seconds", 60.0, "first console line < 60 s (issue 17)"),
}
TIMEOUT = 900.0
DEBIAN_TIMEOUT = 1200.0
FIRST_LINE = b"Linux version"
DEBIAN_EXTRA = "earlyprintk=ttyS0"
VARIANTS = ("pyvmm-pvh", "qemu-pvh", "pyvmm-bz-host", "pyvmm-bz-cached", "pyvmm-bz-guest",
            "qemu-bzimage", "pyvmm-debian-host", "pyvmm-debian-cached", "qemu-debian")
# Former names of variants (before issue 17, pyvmm-bzimage was the in-guest path).
ALIASES = {"pyvmm-bzimage": "pyvmm-bz-guest"}
BASELINE = {"pyvmm-pvh": "qemu-pvh", "pyvmm-bz-host": "qemu-bzimage",
            "pyvmm-bz-cached": "qemu-bzimage", "pyvmm-bz-guest": "qemu-bzimage",
            "pyvmm-debian-host": "qemu-debian", "pyvmm-debian-cached": "qemu-debian"}
# The path each pyvmm variant must have taken, by its `pyvmm: kernel:` line.
EXPECTED_PATH = {"pyvmm-bz-host": re.compile(r"decompressed on the host", re.I),
                 "pyvmm-bz-cached": re.compile(r"from the cache", re.I),
                 "pyvmm-bz-guest": re.compile(r"in the guest", re.I),
                 "pyvmm-debian-host": re.compile(r"decompressed on the host", re.I),
                 "pyvmm-debian-cached": re.compile(r"from the cache", re.I)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("boot")
    group.add_argument("--boot-reps", type=int, default=1,
                       help="boots per variant (default 1: about a minute each on KVM PVM)")
    group.add_argument("--boot-mem", type=int, default=256, help="guest MiB (default 256)")
    group.add_argument("--boot-variants", default=",".join(VARIANTS),
                       help=f"comma-separated subset of {','.join(VARIANTS)}")
    group.add_argument("--boot-debian-timeout", type=float, default=DEBIAN_TIMEOUT,
                       help="seconds a Debian-kernel boot may take to its first console line "
                            f"(default {DEBIAN_TIMEOUT:.0f}: QEMU's in-guest XZ decompression "
                            "takes many minutes on KVM PVM)")


def _kind(variant: str) -> str:
    """pvh, bz or debian."""
    return variant.split("-")[1].replace("bzimage", "bz")


def _prime_cache(kernel: Path, initrd: Path, cache: Path, mem: int) -> str | None:
    """Fill the kernel cache `cache` with `kernel`: boot it until its first console
    line (pyvmm has decompressed, cached and loaded it by then), then stop."""
    argv = vmms.pyvmm_argv(kernel, initrd, DEBIAN_EXTRA, mem, stats=False)
    run = vmms.run_watched(argv, [FIRST_LINE], 300, stop=FIRST_LINE,
                           env_extra={"PYVMM_KERNEL_CACHE": str(cache)})
    return vmms.pyvmm_kernel_line(run.stderr)


def main(args: argparse.Namespace) -> dict[str, Any]:
    qemu = vmms.ensure_qemu()
    vmms.warm_bytecode()
    guest = vmms.builtin_guest()
    mem = args.boot_mem
    variants = [ALIASES.get(v, v) for v in args.boot_variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown boot variant(s) {', '.join(bad)}; have {', '.join(VARIANTS)}")
    debian = vmms.debian_kernel() if any(_kind(v) == "debian" for v in variants) else None
    kernels = {"pvh": guest.vmlinux, "bz": guest.bzimage,
               "debian": debian.path if debian else None}
    extra = {"pvh": "pyvmm.cmd=true", "bz": "pyvmm.cmd=true", "debian": DEBIAN_EXTRA}
    cmdlines = {kind: vmms.pyvmm_full_cmdline(guest.vmlinux, guest.initramfs, extra[kind], mem)
                for kind in extra}
    facts = harness.machine_facts()
    print(f"{harness.format_facts(facts)}\n{qemu['version']}\n"
          f"{args.boot_reps} boot(s) per variant (Linux boots are slow on KVM PVM; "
          f"--boot-reps N for more); {mem} MiB, 1 vCPU\n"
          f"built-in guest command line: {cmdlines['pvh']}", flush=True)
    if debian:
        print(f"{debian.describe()}, {debian.path}\n"
              f"Debian kernel command line: {cmdlines['debian']}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="boot-", dir=vmms.cache_dir()))
    primed: dict[str, str | None] = {}
    for kind in ("bz", "debian"):
        if f"pyvmm-{kind}-cached" in variants:
            primed[kind] = _prime_cache(kernels[kind], guest.initramfs, work / f"cached-{kind}",
                                        mem)
            print(f"  kernel cache for pyvmm-{kind}-cached filled: {primed[kind]}", flush=True)

    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    try:
        for rep in range(args.boot_reps):
            for variant in harness.rotated(variants, rep):
                samples[variant].append(_boot(variant, rep, args, guest, kernels, cmdlines,
                                              work, mem))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary, rows = _summarize(variants, samples, args)
    print()
    print(harness.format_table(["variant", "exec->marker s", "exec->'Linux version' s",
                                "pyvmm timer exec->init s", "ratio pyvmm/QEMU", "goal"], rows))
    print("marker: PYVMM-INIT-OK (built-in guest), `Linux version` (Debian's kernel); the "
          "ratio is per repetition (the pyvmm and QEMU boots of one repetition run back "
          "to back)")
    return vmms.write_comparison(
        "boot", facts, qemu,
        params={"reps": args.boot_reps, "mem_mib": mem, "cpus": 1, "cmdlines": cmdlines,
                "kernel_pvh": str(guest.vmlinux), "kernel_bzimage": str(guest.bzimage),
                "kernel_debian": debian.info if debian else None,
                "initrd": str(guest.initramfs), "pyvmm": vmms.pyvmm_command(),
                "variants": variants, "debian_timeout_s": args.boot_debian_timeout,
                "cache_primed": primed},
        goal="; ".join(f"{v}: {g[2]}" for v, g in GOALS.items() if v in variants),
        summary=summary, samples=samples)


def _boot(variant: str, rep: int, args: argparse.Namespace, guest, kernels: dict,
          cmdlines: dict, work: Path, mem: int) -> dict[str, Any]:
    vmm, kind = variant.split("-")[0], _kind(variant)
    kernel = kernels[kind]
    debian = kind == "debian"
    marker = FIRST_LINE if debian else vmms.INIT_MARKER
    markers = [FIRST_LINE] if debian else [FIRST_LINE, vmms.INIT_MARKER]
    timeout = args.boot_debian_timeout if debian else TIMEOUT
    env: dict[str, str] = {}
    if vmm == "pyvmm":
        # --cmdline is appended to pyvmm's defaults: the result is cmdlines[kind].
        argv = vmms.pyvmm_argv(kernel, guest.initramfs, DEBIAN_EXTRA if debian
                               else "pyvmm.cmd=true", mem, stats=not debian)
        if variant.endswith("-guest"):
            argv.append("--no-host-decompress")
        if variant.endswith("-cached"):
            env["PYVMM_KERNEL_CACHE"] = str(work / f"cached-{kind}")
        else:                                # an empty cache of this boot's own
            env["PYVMM_KERNEL_CACHE"] = str(work / f"empty-{variant}-{rep}")
    else:
        argv = vmms.qemu_argv(kernel, guest.initramfs, cmdlines[kind], mem)
    run = vmms.run_watched(argv, markers, timeout, stop=marker if debian else None,
                           env_extra=env)
    got = run.markers[marker.decode()]
    sample: dict[str, Any] = {"to_marker_s": got,
                              "to_first_line_s": run.markers[FIRST_LINE.decode()],
                              "to_exit_s": run.exited, "returncode": run.returncode,
                              "timed_out": got is None and run.extra["killed"],
                              "timeout_s": timeout}
    if vmm == "pyvmm":
        line = vmms.pyvmm_kernel_line(run.stderr)
        sample["kernel_line"] = line
        want = EXPECTED_PATH.get(variant)
        if variant.endswith("-guest"):       # with the flag, pyvmm may say nothing at all
            sample["path_ok"] = line is None or bool(want.search(line))
        else:
            sample["path_ok"] = bool(line and want and want.search(line)) if want else None
        if not debian:
            stats = vmms.pyvmm_stats(run.stderr) or {}
            sample["pyvmm_boot_timer"] = stats.get("boot")
            sample["pyvmm_stats"] = stats
    if got is None:
        sample["error"] = run.text()[-1500:] + run.stderr.decode(errors="replace")[-1500:]
    first = sample["to_first_line_s"]
    print(f"  rep {rep + 1} {variant:19s} exec->marker "
          f"{('TIMEOUT (> %.0f s)' % timeout) if sample['timed_out'] else 'FAILED' if got is None else f'{got:.2f} s'}"
          f"{'' if first is None else f'  Linux version {first:.2f} s'}"
          f"{'' if run.exited is None else f'  exit {run.exited:.2f} s'}"
          f"{'  timer ' + repr(sample.get('pyvmm_boot_timer')) if sample.get('pyvmm_boot_timer') else ''}"
          f"{'' if vmm != 'pyvmm' else '  [' + str(sample['kernel_line']) + ']'}"
          f"{'  WRONG PATH' if sample.get('path_ok') is False else ''}", flush=True)
    if got is None:
        print(sample["error"][-800:], flush=True)
    return sample


def _summarize(variants: list[str], samples: dict, args) -> tuple[dict, list]:
    summary: dict[str, Any] = {}
    rows = []
    for variant in variants:
        mine = samples[variant]
        got = [s["to_marker_s"] for s in mine if s["to_marker_s"] is not None]
        first = [s["to_first_line_s"] for s in mine if s["to_first_line_s"] is not None]
        timer = [s["pyvmm_boot_timer"]["exec_to_init"] for s in mine
                 if (s.get("pyvmm_boot_timer") or {}).get("exec_to_init") is not None]
        entry: dict[str, Any] = {"exec_to_marker_s": Stats.of(got) if got else None,
                                 "exec_to_first_line_s": Stats.of(first) if first else None,
                                 "timeouts": sum(1 for s in mine if s["timed_out"]),
                                 "wrong_path": sum(1 for s in mine if s.get("path_ok") is False),
                                 "kernel_lines": sorted({s.get("kernel_line") or "-"
                                                         for s in mine}) if
                                 variant.startswith("pyvmm") else None}
        if timer:
            entry["timer_exec_to_init_s"] = Stats.of(timer)
        ratio_text = "-"
        base = BASELINE.get(variant)
        if base in samples:
            pairs = [(a["to_marker_s"], b["to_marker_s"])
                     for a, b in zip(mine, samples[base]) if a["to_marker_s"]]
            done = [(a, b) for a, b in pairs if b]
            if done:
                ratio = Stats.of([a / b for a, b in done])
                entry["ratio_to_" + base] = ratio
                ratio_text = f"{ratio.format('.3f')} vs {base}"
            elif pairs:                      # QEMU timed out: the ratio is below a bound
                bound = max(a / s["timeout_s"] for (a, _), s in zip(pairs, samples[base]))
                entry["ratio_to_" + base + "_below"] = bound
                ratio_text = f"< {bound:.3f} ({base} timed out)"
        goal_text = "-"
        goal = GOALS.get(variant)
        if goal and got:
            kind, limit, text = goal
            value = (entry.get("ratio_to_" + (base or ""))
                     or entry.get("ratio_to_" + (base or "") + "_below"))
            if kind == "ratio":
                ok = value is not None and (value.median if isinstance(value, Stats) else value) <= limit
            else:
                ok = entry["exec_to_marker_s"].median < limit
            entry["goal"] = {"goal": text, "met": ok}
            goal_text = f"{'met' if ok else 'MISSED'}: {text}"
        summary[variant] = entry
        if got:
            marker_text = entry["exec_to_marker_s"].format(".1f")
        elif entry["timeouts"]:
            marker_text = f"timeout (> {mine[0]['timeout_s']:.0f})"
        else:
            marker_text = "failed"
        if entry["wrong_path"]:
            marker_text += f" ({entry['wrong_path']} wrong path)"
        rows.append([variant, marker_text,
                     entry["exec_to_first_line_s"].format(".1f") if first else "-",
                     entry["timer_exec_to_init_s"].format(".1f") if timer else "-",
                     ratio_text, goal_text])
    return summary, rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    main(p.parse_args())

"""virtio-blk in a Linux guest: pyvmm against QEMU -M microvm, same guest, same image.

The built-in guest (PVH vmlinux, 256 MiB, 1 vCPU) boots with /bin/benchtool
(benches/guest_tool.c, static) added to its initramfs and one raw disk image,
and /init runs `benchtool blk /dev/vda SEQ_MIB RAND_S`:

  seqwrite  SEQ_MIB MiB of 1 MiB O_DIRECT writes, then fsync   -> MB/s
  seqread   the same range, 1 MiB O_DIRECT reads               -> MB/s
  randread  4 KiB O_DIRECT reads at random offsets, queue depth 1, for RAND_S s -> IOPS
  randwrite 4 KiB O_DIRECT writes at random offsets, queue depth 1, for RAND_S s -> IOPS
  randread_qd8  randread from 8 guest processes at once (queue depth 8) -> IOPS

timed in the guest (CLOCK_MONOTONIC).  The image (filled with random bytes
once) is the same file for both VMMs; before each boot it is dropped from the
host's page cache (posix_fadvise DONTNEED).  QEMU opens it with
cache=none,aio=threads (O_DIRECT on the host); pyvmm uses buffered
preadv/pwritev, so its reads after the first can come from the host's page
cache: that is each VMM's own design, and it is recorded, not corrected.

pyvmm runs twice in the same repetitions, with io_engine Sync (preadv/pwritev on
the I/O thread) and Async (io_uring, `--disk IMG,io_engine=async`): the table
has Async/Sync beside pyvmm/QEMU (Sync's).

One boot per VMM per repetition (1.5-5 minutes each on KVM PVM, where every
instruction of the guest's block layer is emulated): `--io-reps N` for more.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from benches import harness, vmms
from benches.harness import Stats

GOAL = 1.0                      # issue 4: at least 1.0x QEMU on each
MEM_MIB = 256
TIMEOUT = 1500.0
METRICS = (("seqwrite", "MBps", "seq write MB/s"), ("seqread", "MBps", "seq read MB/s"),
           ("randread", "IOPS", "4K rand read IOPS"),
           ("randwrite", "IOPS", "4K rand write IOPS"),
           ("randread_qd8", "IOPS", "4K rand read IOPS, QD8"))
VMMS = ("pyvmm", "qemu")                # net's; blk adds pyvmm with io_engine Async
BLK_VMMS = ("pyvmm", "pyvmm-async", "qemu")
ASYNC_DISK = ",io_engine=async"         # what pyvmm-async adds to --disk


def add_arguments(parser: argparse.ArgumentParser) -> None:
    harness.add_options(parser, "blk and net (Linux guests)", [
        ("--io-reps", int, 1, "boots per VMM for blk and net (default 1: minutes each on KVM PVM)"),
        ("--blk-seq-mib", int, 8, "MiB written then read sequentially (default 8)"),
        ("--blk-rand-seconds", float, 10.0, "seconds of 4 KiB random reads (default 10)"),
        ("--blk-disk-mib", int, 64, "image size (default 64)"),
        ("--io-timeout", float, TIMEOUT,
         f"seconds before a blk/net VM is killed (default {TIMEOUT:.0f})")])


def disk_image(mib: int) -> Path:
    path = vmms.cache_dir() / f"blk-bench-{mib}M.img"
    if not path.exists() or path.stat().st_size != mib << 20:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        tmp.replace(path)
    return path


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_io_guest(vmm: str, guest, initrd: Path, cmd: str, full_cmdline: str,
                 disks=(), taps=(), wrap=lambda argv: argv, last: bytes = b"",
                 timeout: float = TIMEOUT) -> dict[str, Any]:
    """Boot the built-in guest running `cmd` under one VMM; parse its BENCH lines."""
    if vmm.startswith("pyvmm"):
        if vmm == "pyvmm-async":
            disks = [f"{disk}{ASYNC_DISK}" for disk in disks]
        argv = vmms.pyvmm_argv(guest.vmlinux, initrd, cmd, MEM_MIB, disks=disks, taps=taps)
    else:
        argv = vmms.qemu_argv(guest.vmlinux, initrd, full_cmdline, MEM_MIB, disks=disks,
                              taps=taps)
    run = vmms.run_to_exit(wrap(argv), [vmms.INIT_MARKER, last], timeout)
    console = run.text()
    result: dict[str, Any] = {"results": vmms.parse_results(console),
                              "boot_s": run.markers[vmms.INIT_MARKER.decode()],
                              "exit_s": run.exited, "returncode": run.returncode,
                              "argv": run.argv}
    cmdline = [line for line in console.splitlines() if "Command line:" in line]
    result["guest_cmdline"] = cmdline[0].split("Command line:", 1)[1].strip() if cmdline else None
    if vmm.startswith("pyvmm"):
        stats = vmms.pyvmm_stats(run.stderr) or {}
        result["pyvmm_stats"] = stats
    if "BENCHTOOL-ERROR" in console or not result["results"]:
        result["console_tail"] = console[-3000:]
        result["stderr_tail"] = run.stderr.decode(errors="replace")[-2000:]
    return result


def summarize(samples: dict[str, list[dict]], metrics,
              fmt: str = ".1f") -> tuple[dict, list[list[str]]]:
    summary: dict[str, Any] = {}
    rows = []
    names = list(samples)

    def ratio(name: str, unit: str, over: str, under: str) -> Stats | None:
        """Per repetition (the same run's baseline), then summarised."""
        pairs = [(a["results"][name][unit], b["results"][name][unit])
                 for a, b in zip(samples[over], samples[under])
                 if name in a["results"] and name in b["results"] and b["results"][name][unit]]
        return Stats.of([a / b for a, b in pairs]) if pairs else None
    for name, unit, label in metrics:
        vals = {v: [s["results"][name][unit] for s in samples[v] if name in s["results"]]
                for v in names}
        entry = {v: Stats.of(vals[v]) if vals[v] else None for v in names}
        entry["ratio"] = ratio(name, unit, "pyvmm", "qemu")
        columns = [entry[v].format(fmt) if entry[v] else "failed" for v in names]
        columns.append(entry["ratio"].format(".2f") if entry["ratio"] else "-")
        if "pyvmm-async" in samples:
            entry["async_over_sync"] = ratio(name, unit, "pyvmm-async", "pyvmm")
            columns.append(entry["async_over_sync"].format(".2f")
                           if entry["async_over_sync"] else "-")
        summary[name] = entry
        rows.append([label] + columns + [f">= {GOAL}"])
    return summary, rows


def report(name: str, label: str, samples: dict[str, list[dict]], metrics, facts: dict,
           qemu: dict, args: argparse.Namespace, guest, initrd: Path, full_cmdline: str,
           params: dict, goal: str, qemu_setting: tuple[str, str],
           fmt: str = ".1f") -> dict[str, Any]:
    """The table and the JSON record of a Linux I/O benchmark (blk, net): params are
    the benchmark's own, between the repetitions and memory and the guest."""
    summary, rows = summarize(samples, metrics, fmt=fmt)
    titles = {"pyvmm": "pyvmm", "pyvmm-async": "pyvmm Async", "qemu": "QEMU"}
    header = [label] + [titles[v] for v in samples] + ["pyvmm/QEMU"] + \
        (["Async/Sync"] if "pyvmm-async" in samples else []) + ["goal"]
    print()
    print(harness.format_table(header, rows))
    return vmms.write_comparison(
        name, facts, qemu,
        params={"reps": args.io_reps, "mem_mib": MEM_MIB, **params, "initrd": str(initrd),
                "kernel": str(guest.vmlinux), "pyvmm_cmdline": full_cmdline},
        goal=goal, summary=summary, extra_qemu_settings=[qemu_setting], samples=samples)


def main(args: argparse.Namespace) -> dict[str, Any]:
    qemu = vmms.ensure_qemu()
    vmms.warm_bytecode()
    guest = vmms.builtin_guest()
    initrd = vmms.initramfs_with_tool(guest.initramfs)
    image = disk_image(args.blk_disk_mib)
    cmd = f'pyvmm.cmd="/bin/benchtool blk /dev/vda {args.blk_seq_mib} {args.blk_rand_seconds}"'
    full = vmms.pyvmm_full_cmdline(guest.vmlinux, initrd, cmd, MEM_MIB)
    facts = harness.machine_facts()
    print(f"{harness.format_facts(facts)}\n{qemu['version']}\n"
          f"{args.io_reps} boot(s) per VMM (Linux boots are slow on KVM PVM; --io-reps N); "
          f"{MEM_MIB} MiB, 1 vCPU, image {image} ({args.blk_disk_mib} MiB); "
          f"{args.blk_seq_mib} MiB sequential, {args.blk_rand_seconds} s random each; "
          f"pyvmm with io_engine Sync and Async", flush=True)
    samples: dict[str, list[dict]] = {v: [] for v in BLK_VMMS}
    for rep in range(args.io_reps):
        for vmm in harness.rotated(BLK_VMMS, rep):
            drop_cache(image)
            sample = run_io_guest(vmm, guest, initrd, cmd, full, disks=[image],
                                  last=b"BENCH randread_qd8", timeout=args.io_timeout)
            samples[vmm].append(sample)
            print(f"  rep {rep + 1} {vmm:11s} boot {sample['boot_s']} s  "
                  f"{sample['results'] or sample.get('console_tail', '')[-1500:]}", flush=True)
    return report("blk", "virtio-blk", samples, METRICS, facts, qemu, args, guest, initrd, full,
                  {"image": str(image), "image_mib": args.blk_disk_mib,
                   "seq_mib": args.blk_seq_mib, "rand_seconds": args.blk_rand_seconds},
                  goal=f"pyvmm >= {GOAL}x QEMU on each",
                  qemu_setting=("-drive file=IMG,format=raw,if=none,cache=none,aio=threads "
                                "-device virtio-blk-device",
                                "the disk; cache=none is O_DIRECT on the host"))

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    main(p.parse_args())

"""Count KVM PVM's "stale TLS" segfaults of freshly exec'd busybox programs in the guest.

usage: python3 -m scripts.pvm_tls_repro [--kernel-dir DIR] [--execs N] [--rounds R]
           [--restore [--prefault]] [--vcpus V] [--cmdline ARGS] [--background CMD]
           [--run CMD]...

Boots the guest (the built-in one, or vmlinux + initramfs.cpio from
--kernel-dir), optionally snapshots it and measures in a restored copy, and runs
N pipelines `echo x | busybox cat | busybox tr x y` per round, counting the
shell's "Segmentation fault" reports.  What reproduces it (numbers from a
2-vCPU restored guest on the PVM host, Nov 2026): other processes running at
the same time -- --background with a loop like the snapshot tests' counter --
and busybox started by busybox (same binary, same addresses): 2-4 of 20
pipelines.  A lone `busybox true` loop: 0 of 200; a static glibc program
other than busybox: 0 of 40.  The guest's own reports (dmesg: ip, fault
address) are printed at the end.  One VM at a time: the restored one replaces
the booted one.

What the crash is (issue 15, TLS helper's report): glibc's __ctype_init reads a
TLS word copied from busybox's .tdata image and finds 0 or another process's
bytes.  The FS base is right (MSR, thread.fsbase, selector 0 and the TCB self
pointer agree), the .tdata source is right, and the kernel reads the same wrong
bytes in the TLS block: memcpy stored wrong register contents.  On KVM PVM guest
ring 3 runs natively with the host's CPUID and XCR0, so glibc picks its AVX2 /
EVEX (ymm16-31) string functions, but the guest kernel runs with noxsave and
context-switches only the FXSAVE state (x87, xmm0-15): a task switched out in
the middle of memcpy -- e.g. at the page fault of its first store into a fresh
brk page -- comes back with another process's ymm/zmm bits.  --no-avx (glibc
tunables that turn AVX off) takes it to 0 (0 of 25 pipelines vs 1-4 of 20).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pyvmm.microvm import MicroVM
from tests.framework.microvm import MicrovmFactory, run_in_shell

# One shell loop of pipelines: two busybox processes exec'd by ash (busybox) at
# once.  The shell reports every process killed by SIGSEGV on its own line.
LOOP = ("i=0; while [ $i -lt {n} ]; do echo x | busybox cat | busybox tr x y >/dev/null; "
        "i=$((i+1)); done; echo LOOP-DONE")
SEGFAULT_REPORT = "Segmentation fault"
# glibc (2.36) tunables that keep its string functions off the AVX/AVX-512 registers.
NO_AVX_TUNABLES = ("glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,"
                   "-AVX512CD,-FMA,-FMA4,-AVX_Fast_Unaligned_Load")
# The snapshot tests' counter, minus the disk: keeps the scheduler switching.
COUNTER = ("i=0; while :; do i=$((i+1)); echo $i > /tmp/count; if [ $((i % 5)) = 0 ]; "
           "then echo C$i | dd of=/dev/null bs=512 conv=sync,fsync 2>/dev/null; fi; "
           "sleep 0.3; done")


def measure(vm: MicroVM, execs: int, rounds: int) -> list[int]:
    """Pipelines with a segfaulted process, per round of `execs` pipelines."""
    counts = []
    for _ in range(rounds):
        started = time.monotonic()
        out = run_in_shell(vm, LOOP.format(n=execs), timeout=600 + 5 * execs)
        bad = out.count(SEGFAULT_REPORT)
        counts.append(bad)
        print(f"  {bad}/{execs} died ({time.monotonic() - started:.1f} s)", flush=True)
    return counts


def touch_every_page(vm: MicroVM) -> None:
    """Write each page of guest RAM with its own first byte (breaks every MAP_PRIVATE
    copy-on-write now, before the guest runs)."""
    for region in vm._vm.machine.memory.regions:
        mm = region.mm
        for offset in range(0, region.size, 4096):
            mm[offset] = mm[offset]


def segfault_reports(vm: MicroVM) -> str:
    """The guest's "segfault at" lines (dmesg is a builtin-free busybox applet: one
    more exec, retried if it dies itself)."""
    for _ in range(3):
        out = run_in_shell(vm, "dmesg -c")
        if "Segmentation fault" not in out:
            break
    return "\n".join(line for line in out.splitlines()
                     if "segfault" in line or "general protection" in line or "trap" in line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-dir", type=Path,
                        help="a build-kernel.sh OUTDIR with vmlinux (initramfs.cpio from it "
                             "or the built-in guest)")
    parser.add_argument("--execs", type=int, default=20, help="pipelines per round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--restore", action="store_true",
                        help="measure in a VM restored from a snapshot of the booted one")
    parser.add_argument("--prefault", action="store_true",
                        help="with --restore: write every page of guest RAM from the host "
                             "before the guest resumes, so no copy-on-write of the private "
                             "memory-file mapping happens while it runs")
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--cmdline", default="", help="extra kernel parameters")
    parser.add_argument("--initrd", type=Path, help="initramfs (default: the kernel dir's)")
    parser.add_argument("--background", default=COUNTER,
                        help="a shell command started in the background first (default: "
                             "a counting loop that keeps the scheduler busy; '' for none)")
    parser.add_argument("--no-avx", action="store_true",
                        help=f"export GLIBC_TUNABLES={NO_AVX_TUNABLES} in the guest shell "
                             "and the background loop first")
    parser.add_argument("--run", action="append", default=[],
                        help="a shell command to run (and print) after the exec loop")
    args = parser.parse_args(argv)

    config: dict = {"vcpus": args.vcpus, "mem_mib": 256, "cmdline": args.cmdline}
    if args.kernel_dir is not None:
        from pyvmm.builtin_guest import find_guest
        initrd = args.kernel_dir / "initramfs.cpio"
        config["kernel"] = args.kernel_dir / "vmlinux"
        config["initrd"] = initrd if initrd.exists() else find_guest().initramfs
    if args.initrd is not None:
        config["initrd"] = args.initrd
    factory = MicrovmFactory()
    try:
        started = time.monotonic()
        vm = factory.boot(**config)
        print(f"booted in {time.monotonic() - started:.0f} s", flush=True)
        run_in_shell(vm, "dmesg -n 1")
        if args.restore:
            tmp = Path(tempfile.mkdtemp(prefix="pvm-tls-"))
            vm.pause()
            vm.snapshot(tmp / "vm.state", tmp / "vm.mem")
            factory.close()
            vm = factory.restore(tmp / "vm.state", tmp / "vm.mem", resume=not args.prefault)
            if args.prefault:
                started = time.monotonic()
                touch_every_page(vm)
                vm.resume()
                run_in_shell(vm, "true")
                print(f"every page written before resuming ({time.monotonic() - started:.1f} s)")
            print("restored", flush=True)
        if args.no_avx:
            run_in_shell(vm, f"export GLIBC_TUNABLES={NO_AVX_TUNABLES}")
        if args.background:
            vm.serial.write(f"({args.background}) >/dev/null 2>&1 &\n")
        counts = measure(vm, args.execs, args.rounds) if args.execs else []
        for command in args.run:
            started = time.monotonic()
            print(f"$ {command}\n{run_in_shell(vm, command, timeout=1800).rstrip()}\n"
                  f"  ({time.monotonic() - started:.1f} s)", flush=True)
        print(segfault_reports(vm))
        total = args.execs * args.rounds
        print(f"RESULT {'restored' if args.restore else 'cold'}: {sum(counts)} segfaults in "
              f"{total} pipelines ({counts})")
    finally:
        factory.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

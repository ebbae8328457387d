"""VMM start-up: exec -> first guest output, and exec -> API socket accepting.

guest      a ~200-byte PVH ELF (tests/framework/images.py: TINY_CODE) whose first instructions
           write "X" to COM1.  `pyvmm run --kernel tiny.elf --console stdio`
           against `qemu-system-x86_64 -M microvm -kernel tiny.elf` (qboot's PVH
           path), 128 MiB, 1 vCPU.  Wall clock from just before spawning the VMM
           to the parent reading "X" on its stdout; measured the same way for
           both, so the pipe's latency is in both.
api        `pyvmm api --api-sock S`: spawn -> the first connect() to S that
           succeeds (polled every 0.5 ms).  Beside it, QEMU's nearest
           equivalent: `qemu ... -S -qmp unix:S,server=on,wait=off` (a QMP
           socket, the VM not started) -> connect() succeeds.

pyvmm is started as `python -m pyvmm` with this interpreter, not through a
pyenv shim (which adds tens of ms of bash), with its bytecode cached (see
vmms.child_env()), after one warm-up round that is not counted.
`python-floor` is this interpreter printing "X" with nothing imported: what
any Python VMM pays on this machine before its first line of code.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from benches import harness, vmms
from benches.harness import Stats

GOAL = 0.8                      # pyvmm <= 0.8x QEMU exec -> first output (issue 6)
QEMU_REFERENCE_MS = 46.0        # issue 6: QEMU 7.2 microvm on "our machines"
MEM_MIB = 128
VARIANTS = ("pyvmm", "qemu", "pyvmm-api", "qemu-qmp", "python-floor")
# The floor under any Python VMM on this machine: the interpreter starting
# (site, .pth files) and writing "X" to stdout, nothing imported.
FLOOR = "import sys; sys.stdout.write('X'); sys.stdout.flush(); sys.stdin.read()"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("startup")
    group.add_argument("--startup-reps", type=int, default=11,
                       help="runs per variant (default 11)")


def first_output(argv: list[str], timeout: float = 30.0) -> tuple[float | None, str]:
    with vmms.spawn(argv, [b"X"]) as vmm:
        t = vmm.wait_marker(b"X", timeout)
    return t, "" if t is not None else _tail(vmm)


def socket_ready(argv: list[str], sock: Path, timeout: float = 30.0) -> tuple[float | None, str]:
    with vmms.spawn(argv) as vmm:
        got = vmm.wait_for_socket(sock, timeout, interval=0.0005)
    return got, "" if got is not None else _tail(vmm)


def _tail(vmm) -> str:
    return (vmm.out.decode(errors="replace") + vmm.stderr())[-600:]


def main(args: argparse.Namespace) -> dict[str, Any]:
    qemu = vmms.ensure_qemu()
    tiny = vmms.tiny_pvh_guest()
    facts = harness.machine_facts()
    print(f"{harness.format_facts(facts)}\n{qemu['version']}\n"
          f"tiny guest {tiny} ({tiny.stat().st_size} bytes), {MEM_MIB} MiB, 1 vCPU; "
          f"{args.startup_reps} runs per variant", flush=True)
    vmms.warm_bytecode()
    tmp = Path(tempfile.mkdtemp(prefix="pyvmm-startup-"))
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    errors: dict[str, str] = {}

    def argv_of(variant: str) -> tuple[list[str], Path | None]:
        sock = tmp / f"{variant}.sock"
        if sock.exists():
            sock.unlink()
        if variant == "pyvmm":
            return vmms.pyvmm_argv(tiny, None, None, MEM_MIB, stats=False), None
        if variant == "qemu":
            return vmms.qemu_argv(tiny, None, None, MEM_MIB), None
        if variant == "python-floor":
            return [vmms.pyvmm_command()[0], "-c", FLOOR], None
        if variant == "pyvmm-api":
            return vmms.pyvmm_command() + ["api", "--api-sock", str(sock)], sock
        return vmms.qemu_argv(tiny, None, None, MEM_MIB) + [
            "-S", "-qmp", f"unix:{sock},server=on,wait=off"], sock

    for rep in range(-1, args.startup_reps):          # rep -1: a warm-up round, dropped
        for variant in harness.rotated(VARIANTS, rep):
            argv, sock = argv_of(variant)
            t, err = first_output(argv) if sock is None else socket_ready(argv, sock)
            if t is None:
                errors[variant] = err
                print(f"  {variant}: no answer: {err}", flush=True)
            elif rep >= 0:
                samples[variant].append(t * 1e3)
    for f in tmp.iterdir():
        f.unlink()
    os.rmdir(tmp)

    summary: dict[str, Any] = {}
    for v in VARIANTS:
        summary[v] = {"ms": Stats.of(samples[v]) if samples[v] else None}
    ratios = {}
    for mine, base in (("pyvmm", "qemu"), ("pyvmm-api", "qemu-qmp")):
        pairs = list(zip(samples[mine], samples[base]))
        if pairs:
            ratios[mine] = Stats.of([a / b for a, b in pairs])
            summary[mine]["ratio_to_" + base] = ratios[mine]
    rows = [
        ["exec -> first guest output", summary["pyvmm"]["ms"].format(".1f"),
         summary["qemu"]["ms"].format(".1f"), ratios["pyvmm"].format(".3f"), f"<= {GOAL}"],
        ["exec -> API socket accepts", summary["pyvmm-api"]["ms"].format(".1f"),
         summary["qemu-qmp"]["ms"].format(".1f") + " (QMP)", ratios["pyvmm-api"].format(".3f"),
         "-"],
        ["python -c: interpreter floor", summary["python-floor"]["ms"].format(".1f"), "", "",
         ""],
    ] if all(samples.values()) else []
    print()
    print(harness.format_table(["ms, median [min-max]", "pyvmm", "QEMU", "pyvmm/QEMU", "goal"],
                               rows))
    print(f"ratios are per repetition (the variants of a repetition run back to back); "
          f"issue 6 quotes QEMU at {QEMU_REFERENCE_MS} ms on its machines")
    return vmms.write_comparison(
        "startup", facts, qemu,
        params={"reps": args.startup_reps, "mem_mib": MEM_MIB, "tiny_guest": str(tiny),
                "tiny_guest_bytes": tiny.stat().st_size, "pyvmm": vmms.pyvmm_command()},
        goal=f"pyvmm <= {GOAL}x QEMU, exec -> first guest output", summary=summary,
        samples_ms=samples, errors=errors)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    main(p.parse_args())

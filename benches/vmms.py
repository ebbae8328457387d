"""Running pyvmm and QEMU side by side: command lines, timing, guests, netns.

Both VMMs are child processes started the same way, by the tests' one process
spawner (tests/framework/process.py: stdin a pipe left open, stdout a pipe),
and every "exec -> X" figure is the same measurement for both:
time.perf_counter() just before the spawn, to the moment the parent reads X on
the child's stdout (the guest's serial console).  The guests (the tiny PVH ELF,
the initramfs archive) come from tests/framework/images.py and the network
namespace from tests/framework/netns.py, as in the tests.

QEMU is Debian's qemu-system-x86 (installed with apt-get when missing), run as
`-M microvm` with the settings in qemu_settings(); each one is recorded in the
results because some exist only to get QEMU through KVM PVM.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from benches import harness
from pyvmm.pvm import is_pvm_host
from tests.framework import images
from tests.framework.netns import NetNamespace
from tests.framework.process import Process, pyvmm_command

QEMU = "qemu-system-x86_64"
INIT_MARKER = b"PYVMM-INIT-OK"
BENCHES = harness.BENCHES_DIR


def cache_dir() -> Path:
    root = os.environ.get("PYVMM_CACHE", str(Path.home() / ".cache" / "pyvmm"))
    path = Path(root) / "benches"
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- QEMU ------------------------------------------------------------------------

def ensure_qemu() -> dict[str, str]:
    """qemu-system-x86_64, installed from Debian with apt-get if missing."""
    if shutil.which(QEMU) is None:
        print(f"{QEMU} not found: apt-get install qemu-system-x86", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                        "qemu-system-x86"], check=True, env=env)
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True,
                             check=True).stdout.splitlines()[0]
    return {"binary": shutil.which(QEMU) or QEMU, "version": version}


# (argument, why): every QEMU setting, recorded with the results.
QEMU_SETTINGS_COMMON: list[tuple[str, str]] = [
    ("-enable-kvm", "KVM, like pyvmm"),
    ("-M microvm,x-option-roms=off,rtc=off,acpi=off",
     "QEMU's microVM machine; no option ROMs (qboot loads the kernel), no RTC; no ACPI "
     "(the guest kernel has none, so QEMU puts virtio_mmio.device= on the command line "
     "itself, auto-kernel-cmdline)"),
    ("-nodefaults -no-user-config -nographic", "no default devices or config files, no display"),
    ("-serial stdio", "the guest's ttyS0 on QEMU's stdout, where the marker is read"),
    ("-device i8042", "so that the guest's reboot=k ends QEMU (with -no-reboot)"),
    ("-no-reboot", "a guest reboot exits QEMU, as it exits pyvmm"),
]
QEMU_SETTINGS_PVM: list[tuple[str, str]] = [
    ("-cpu host,-arch-capabilities,-cx16",
     "KVM PVM: without ARCH_CAPABILITIES and CX16 offered, as QEMU needs on PVM (issue 6)"),
]


def write_comparison(name: str, facts: dict, qemu: str, params: dict, goal: str, summary: dict,
                     extra_qemu_settings: Sequence[tuple[str, str]] = (), **fields) -> dict:
    """The JSON record of a pyvmm-against-QEMU benchmark: machine facts, QEMU's
    version and every setting with its reason, then the benchmark's own
    fields (samples...); written to benches/results/<name>.json and returned."""
    data = {"benchmark": name, "machine": facts, "qemu": qemu,
            "qemu_settings": qemu_settings(facts["pvm"]) + list(extra_qemu_settings),
            "params": params, "goal": goal, "summary": summary, **fields}
    print(f"wrote {harness.write_json(name, data)}")
    return data


def qemu_settings(pvm: bool | None = None) -> list[tuple[str, str]]:
    pvm = is_pvm_host() if pvm is None else pvm
    cpu = QEMU_SETTINGS_PVM if pvm else [("-cpu host", "the host's CPU, like pyvmm")]
    return QEMU_SETTINGS_COMMON[:1] + cpu + QEMU_SETTINGS_COMMON[1:]


def qemu_argv(kernel: Path, initrd: Path | None, cmdline: str | None, mem_mib: int,
              cpus: int = 1, disks: Sequence[Path] = (), taps: Sequence[tuple[str, str]] = (),
              pvm: bool | None = None) -> list[str]:
    argv = [QEMU]
    for setting, _ in qemu_settings(pvm):
        argv += setting.split()
    argv += ["-m", str(mem_mib), "-smp", str(cpus), "-kernel", str(kernel)]
    if initrd is not None:
        argv += ["-initrd", str(initrd)]
    if cmdline is not None:
        argv += ["-append", cmdline]
    for i, disk in enumerate(disks):
        argv += ["-drive", f"id=d{i},file={disk},format=raw,if=none,cache=none,aio=threads",
                 "-device", f"virtio-blk-device,drive=d{i}"]
    for i, (tap, mac) in enumerate(taps):
        argv += ["-netdev", f"tap,id=n{i},ifname={tap},script=no,downscript=no",
                 "-device", f"virtio-net-device,netdev=n{i},mac={mac}"]
    return argv


# -- pyvmm -----------------------------------------------------------------------

def child_env() -> dict[str, str]:
    """The environment VMM children run with: this one, except that Python may
    cache bytecode, in our own directory (PYTHONPYCACHEPREFIX) rather than in the
    source tree.  Without it (PYTHONDONTWRITEBYTECODE=1 is set on some of our
    machines) every pyvmm start compiles ~35 modules from source, ~100 ms that a
    real installation never pays.  QEMU ignores these variables."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(cache_dir() / "pycache")
    return env


def warm_bytecode() -> None:
    """Compile pyvmm (and what it imports) into the bytecode cache once."""
    import pyvmm
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(pyvmm.__file__).parent)],
                   env=child_env(), check=False, capture_output=True)
    subprocess.run(pyvmm_command() + ["--help"], env=child_env(), capture_output=True)


def pyvmm_argv(kernel: Path | None, initrd: Path | None, cmdline: str | None, mem_mib: int,
               cpus: int = 1, disks: Sequence[Path] = (), taps: Sequence[tuple[str, str]] = (),
               stats: bool = True, console: str = "stdio") -> list[str]:
    argv = pyvmm_command() + ["run", "--mem", str(mem_mib), "--cpus", str(cpus),
                              "--console", console]
    if kernel is not None:
        argv += ["--kernel", str(kernel)]
    if initrd is not None:
        argv += ["--initrd", str(initrd)]
    if cmdline:
        argv += ["--cmdline", cmdline]
    for disk in disks:
        argv += ["--disk", str(disk)]
    for tap, mac in taps:
        argv += ["--net", f"tap={tap},mac={mac}"]
    if stats:
        argv.append("--stats")
    return argv


def pyvmm_full_cmdline(kernel: Path, initrd: Path | None, extra: str, mem_mib: int) -> str:
    """The whole kernel command line `pyvmm run --cmdline extra` boots with (no
    virtio devices): pyvmm's defaults, its PVM parameters on KVM PVM, and `extra`,
    from the same pure function the VM builder calls."""
    from pyvmm.boot.cmdline import build_cmdline
    from pyvmm.config import VmSpec
    spec = VmSpec.build(kernel=kernel, initrd=initrd, cmdline=extra, mem_mib=mem_mib)
    return build_cmdline(spec, is_pvm_host())


def builtin_guest():
    from pyvmm import builtin_guest
    guest = builtin_guest.find_guest()
    if guest is None:
        print("building the built-in guest (pyvmm guest build; minutes)...", flush=True)
        guest = builtin_guest.ensure_guest(progress=True)
    return guest


# -- running a VMM and watching its console ----------------------------------------

@dataclass
class Run:
    argv: list[str]
    markers: dict[str, float | None]        # marker -> seconds from spawn, or None
    exited: float | None = None             # seconds from spawn to exit, if it exited
    returncode: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    pid: int = 0
    extra: dict = field(default_factory=dict)

    def text(self) -> str:
        return self.stdout.decode(errors="replace")


def spawn(argv: list[str], markers: Sequence[bytes] = ()) -> Process:
    """A VMM child (tests/framework/process.py) in child_env(), its stdout's markers
    time-stamped from just before the spawn."""
    return Process(argv, env=child_env(), markers=markers)


def run_to_exit(argv: list[str], markers: Sequence[bytes], timeout: float) -> Run:
    """Spawn, time the markers, wait for the VMM to exit by itself (or kill it at timeout)."""
    with spawn(argv, markers) as vmm:
        exited = vmm.wait_exit(timeout)
    return Run(argv, {m.decode(): vmm.seen.get(m) for m in markers}, exited=exited,
               returncode=vmm.returncode, stdout=bytes(vmm.out), stderr=vmm.stderr_data(),
               pid=vmm.pid)


def run_watched(argv: list[str], markers: Sequence[bytes], timeout: float,
                stop: bytes | None = None, env_extra: dict[str, str] | None = None) -> Run:
    """run_to_exit(), with two more things: the child's environment is child_env()
    plus env_extra, and with `stop` (one of markers) the VMM is killed as soon as that
    marker is read (a kernel that would go on to fail without a root file system, say),
    or at timeout; `exited` is then None and the marker's time the figure."""
    env = child_env()
    env.update(env_extra or {})
    with Process(argv, env=env, markers=markers) as vmm:
        exited = None
        if stop is None:
            exited = vmm.wait_exit(timeout)
        else:
            vmm.wait_marker(stop, timeout)
        running = vmm.returncode is None       # still running: stopped (or timed out) here
    return Run(argv, {m.decode(): vmm.seen.get(m) for m in markers}, exited=exited,
               returncode=vmm.returncode, stdout=bytes(vmm.out), stderr=vmm.stderr_data(),
               pid=vmm.pid, extra={"killed": running})


KERNEL_LINE = re.compile(r"^pyvmm: kernel: (.*)$", re.M)


def pyvmm_kernel_line(stderr: bytes) -> str | None:
    """The line `pyvmm run` prints on stderr about how it loaded a bzImage (issue 17:
    decompressed on the host, from the cache, or in the guest and why), without its
    `pyvmm: kernel: ` prefix."""
    found = KERNEL_LINE.search(stderr.decode(errors="replace"))
    return found.group(1) if found else None


def pyvmm_stats(stderr: bytes) -> dict | None:
    """The --stats JSON pyvmm prints on stderr at exit."""
    import json
    text = stderr.decode(errors="replace")
    start = text.find("{\n")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            try:
                return json.loads(text[start:i + 1])
            except ValueError:
                return None
    return None


# -- guests ------------------------------------------------------------------------

def tiny_pvh_guest() -> Path:
    """The tiny guest (tests/framework/images.py: TINY_CODE), a ~200-byte PVH ELF: at
    its 32-bit entry it writes 'X\\n' to COM1 and halts with interrupts off."""
    data = images.tiny_guest()
    out = cache_dir() / f"tiny-pvh-{hashlib.sha256(data).hexdigest()[:16]}.elf"
    if not out.exists():
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(out)
    return out


def guest_tool() -> Path:
    """benches/guest_tool.c, static, for the built-in guest."""
    return harness.compile_c(BENCHES / "guest_tool.c", ["-static"])


def initramfs_with_tool(base: Path) -> Path:
    """The built-in initramfs with a second newc archive appended holding
    /bin/benchtool (Linux unpacks concatenated archives in order)."""
    tool = guest_tool()
    out = cache_dir() / f"initramfs-bench-{os.stat(base).st_mtime_ns:x}-{tool.name}.cpio"
    if not out.exists():
        blob = base.read_bytes()
        blob += b"\0" * (-len(blob) % 4)
        blob += images.cpio_newc([("bin/benchtool", 0o100755, tool.read_bytes())])
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        tmp.replace(out)
    return out


def parse_results(console: str) -> dict[str, dict[str, float]]:
    """Lines `BENCH name key=value ...` printed by the guest tool."""
    results: dict[str, dict[str, float]] = {}
    for match in re.finditer(r"^BENCH (\S+)((?: \S+=\S+)+)\s*$", console, re.M):
        fields = dict(kv.split("=", 1) for kv in match.group(2).split())
        results[match.group(1)] = {k: float(v) for k, v in fields.items()}
    return results


def debian_kernel():
    """Debian 12's generic kernel, XZ-compressed (tests/framework/debian_kernel.py:
    firmware/fetch-debian-kernel.sh's cache, fetched when missing)."""
    from tests.framework import debian_kernel as debian
    return debian.find() or debian.ensure()


# -- network namespace ------------------------------------------------------------

def bench_netns(name: str) -> NetNamespace:
    """A namespace of our own with a TAP device (tests/framework/netns.py), on
    addresses of its own, so that a benchmark and the tests can run at once."""
    return NetNamespace(name, tap="tapb0", host_ip="172.31.250.1", guest_ip="172.31.250.2")

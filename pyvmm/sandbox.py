r"""Sandboxes: disposable microVMs for untrusted code, started from a snapshot.

    from pyvmm.sandbox import Sandbox

    with Sandbox() as sb:                                   # ~1 s on KVM PVM hosts
        r = sb.run("python3 -c 'print(sum(range(10)))'")
        print(r.stdout, r.returncode)                       # b'45\n' 0
        sb.write_file("/work/data.csv", b"a,b\n1,2\n")
        print(sb.read_file("/work/data.csv"))

A sandbox is the built-in guest kernel booted on the project's Debian root file
system (read-only and shared by every sandbox, with an overlay on a tmpfs in the
guest's own memory as its writable layer), with virtio-vsock and the guest agent
(pyvmm-agent, PID 1) to run commands and move files.  It is never booted from
scratch: the first sandbox of a given guest, memory size and vCPU count boots
one VM until its agent answers, snapshots it, and caches the snapshot (the
"template") under $PYVMM_CACHE/sandbox/ by a hash of what it was made from;
every sandbox after that restores the template.  Each restored sandbox maps the
template's memory file MAP_PRIVATE, so it pays only for the pages it writes,
and nothing one sandbox writes (files included: they are in its tmpfs) is seen
by another.  After a restore the host sends the agent the present time and fresh
entropy before the first command: the guest's clock and RNG state are copies.

What a sandbox isolates: the guest kernel is the boundary.  The guest has no
network unless one is asked for (tap=), no host files but the shared read-only
root image, and reaches nothing on the host but the vsock ports the host
listens on (none, for a sandbox: a guest connection anywhere gets a reset).
What it does not isolate yet: the VMM process itself runs with the caller's
privileges and no seccomp filter (the confinement issue adds a jailer and
seccomp), and a sandbox's CPU time and host memory are bounded only by its
vCPU count, its memory size and its wall-clock limit.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from pyvmm.closing import Closeable
from pyvmm.errors import PyvmmError

AGENT_PORT = 1024                # the guest agent's vsock port (Kata's agent uses it too)
GUEST_CID = 3                    # the first CID a guest may have (2 is the host)
DEFAULT_MEM_MIB = 512
DEFAULT_VCPUS = 1
ROOTFS_DRIVE = "rootfs"
ROOTFS_CMDLINE = "pyvmm.rootfs=/dev/vda"
# Bumped when what a template holds changes in a way its key cannot see.
TEMPLATE_VERSION = 2
# KVM PVM: ~45-90 s for the guest to boot and start its agent, minutes on a loaded
# machine; hardware KVM: well under a second.
TEMPLATE_BOOT_TIMEOUT = float(os.environ.get("PYVMM_BOOT_TIMEOUT", 1200))
# How long a restored sandbox's agent has to answer (it was answering when snapshotted).
RESTORE_AGENT_TIMEOUT = 30.0
RESEED_BYTES = 64
# Run in the template before it is snapshotted, so that what nearly every sandbox runs
# first (the shell, the C library, python3 and its start-up modules) is in the guest's
# page cache in the snapshot, read from its disk once instead of once per sandbox.
# On KVM PVM hosts this halves a sandbox's first `sh -c` and `python3` (7.5 -> 3.7 s,
# 34 -> 19 s measured).
WARM_UP = (["/bin/sh", "-c", "true"], ["python3", "-c", "import json, os, subprocess"])


class SandboxError(PyvmmError):
    """A sandbox could not be made, or its VM is gone."""


@dataclass(frozen=True)
class Template:
    """A cached snapshot of the sandbox guest, booted with its agent answering."""
    directory: Path

    @property
    def state_path(self) -> Path:
        return self.directory / "vm.state"

    @property
    def mem_path(self) -> Path:
        return self.directory / "vm.mem"

    def exists(self) -> bool:
        return self.state_path.is_file() and self.mem_path.is_file()


def _guest():
    from pyvmm import builtin_guest
    guest = builtin_guest.find_guest()
    if guest is None or not getattr(guest, "rootfs", None) or not Path(guest.rootfs).is_file():
        raise SandboxError("the sandbox guest (kernel, initramfs with the agent, root file "
                           "system) is not built yet: run `pyvmm guest build`")
    return guest


def template_key(mem_mib: int, vcpus: int, network: bool) -> str:
    """What a template depends on: the guest's parts (their cache directories are named
    by the hashes of their inputs, and their sizes), the VM's shape, and the host kind
    (a snapshot made on KVM PVM does not load on hardware KVM)."""
    from pyvmm.kvm import Kvm
    from pyvmm.snapshot import host_identity
    guest = _guest()
    with Kvm() as kvm:
        host = host_identity(kvm)
    parts = {"version": TEMPLATE_VERSION, "mem_mib": mem_mib, "vcpus": vcpus,
             "network": network, "host": host,
             "guest": {name: [str(path), Path(path).stat().st_size]
                       for name, path in (("vmlinux", guest.vmlinux),
                                          ("initramfs", guest.initramfs),
                                          ("rootfs", guest.rootfs))}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def template_dir(mem_mib: int, vcpus: int, network: bool) -> Path:
    from pyvmm.builtin_guest import cache_root
    return cache_root() / "sandbox" / f"{mem_mib}m-{vcpus}c{'-net' if network else ''}-" \
        f"{template_key(mem_mib, vcpus, network)}"


def sandbox_spec(mem_mib: int, vcpus: int, uds_path: str, tap: str | None):
    """The VM a sandbox is: the built-in kernel and initramfs, the root image read-only,
    vsock for the agent, virtio-rng, and a TAP only if asked."""
    from pyvmm.config import VmSpec, Vsock
    guest = _guest()
    spec = VmSpec.build(kernel=guest.vmlinux, initrd=guest.initramfs, cmdline=ROOTFS_CMDLINE,
                        vcpus=vcpus, mem_mib=mem_mib, rng=True,
                        drives=[{"drive_id": ROOTFS_DRIVE, "path_on_host": str(guest.rootfs),
                                 "is_root_device": False, "is_read_only": True}],
                        nets=[{"iface_id": "eth0", "host_dev_name": tap}] if tap else [])
    spec.vsock = Vsock(guest_cid=GUEST_CID, uds_path=uds_path)
    return spec


def ensure_template(mem_mib: int = DEFAULT_MEM_MIB, vcpus: int = DEFAULT_VCPUS,
                    tap: str | None = None, log=None) -> Template:
    """The cached template for this shape, made first if needed (one cold boot).
    With tap, the template has a network interface, booted on that TAP device (the
    sandboxes restored from it each override it with their own).  Processes that want
    the same template at once wait for the one making it."""
    network = tap is not None
    template = Template(template_dir(mem_mib, vcpus, network))
    if template.exists():
        return template
    template.directory.parent.mkdir(parents=True, exist_ok=True)
    lock_path = template.directory.parent / f".{template.directory.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not template.exists():
            _make_template(template, mem_mib, vcpus, tap, log)
    return template


def _make_template(template: Template, mem_mib: int, vcpus: int, tap: str | None,
                   log) -> None:
    from pyvmm.microvm import MicroVM
    tmp = Path(tempfile.mkdtemp(prefix=f".{template.directory.name}.",
                                dir=template.directory.parent))
    try:
        spec = sandbox_spec(mem_mib, vcpus, str(tmp / "vsock.sock"), tap)
        if log:
            log(f"making the sandbox template ({mem_mib} MiB, {vcpus} vCPU): one cold "
                "boot, cached for every sandbox after it")
        started = time.monotonic()
        with MicroVM(spec=spec) as vm:
            vm.start()
            agent = _agent(spec.vsock.uds_path, TEMPLATE_BOOT_TIMEOUT, vm)
            for command in WARM_UP:
                agent.exec(command, timeout=TEMPLATE_BOOT_TIMEOUT)
            vm.pause()
            vm.snapshot(tmp / "vm.state", tmp / "vm.mem")
        if log:
            log(f"sandbox template ready in {time.monotonic() - started:.1f} s: "
                f"{template.directory}")
        tmp.rename(template.directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _agent(uds_path: str, timeout: float, vm=None):
    """An agent client through the VM's vsock socket, once the agent answers."""
    from pyvmm.agent.client import Agent
    return Agent.over_vsock(uds_path, AGENT_PORT, connect_timeout=timeout,
                                  alive=(lambda: vm.state != "Exited") if vm else None)


class Sandbox(Closeable):
    """A disposable microVM with a guest agent, restored from the cached template.

    mem_mib, vcpus: its shape (one template per shape); tap: a host TAP device for
    its network (none by default); lifetime: wall-clock seconds after which the VM is
    killed (None: until close()); cold: boot it from scratch instead (for comparison).
    """

    def __init__(self, *, mem_mib: int = DEFAULT_MEM_MIB, vcpus: int = DEFAULT_VCPUS,
                 tap: str | None = None, lifetime: float | None = None, cold: bool = False,
                 start: bool = True, log=None) -> None:
        if lifetime is not None and lifetime <= 0:
            raise SandboxError(f"a sandbox lifetime of {lifetime} s is not positive")
        self.mem_mib, self.vcpus, self.tap = mem_mib, vcpus, tap
        self.lifetime, self.cold, self._log = lifetime, cold, log
        self.vm = None                     # pyvmm.microvm.MicroVM once started
        self.start_seconds: float | None = None   # Sandbox start to an agent that answers
        self._dir: Path | None = None
        self._agent = None
        self._timer: threading.Timer | None = None
        self._expired = False
        self._closed = False
        if start:
            self.start()

    @property
    def uds_path(self) -> str:
        """The host side of the sandbox's vsock (Firecracker's CONNECT protocol)."""
        if self._dir is None:
            raise SandboxError("the sandbox is not started")
        return str(self._dir / "vsock.sock")

    def start(self) -> None:
        from pyvmm.microvm import MicroVM
        if self.vm is not None or self._closed:
            raise SandboxError("a sandbox starts once")
        started = time.monotonic()
        self._dir = Path(tempfile.mkdtemp(prefix="pyvmm-sandbox-"))
        try:
            if self.cold:
                self.vm = MicroVM(spec=sandbox_spec(self.mem_mib, self.vcpus, self.uds_path,
                                                    self.tap))
                self.vm.start()
                self._agent = _agent(self.uds_path, TEMPLATE_BOOT_TIMEOUT, self.vm)
            else:
                template = ensure_template(self.mem_mib, self.vcpus, self.tap, self._log)
                self.vm = MicroVM.restore(
                    template.state_path, template.mem_path, vsock_override=self.uds_path,
                    network_overrides={"eth0": self.tap} if self.tap else None,
                    clock_realtime=True)
                # The agent was answering when the template was taken: the first
                # connection (retried while the restored guest settles) sends it the
                # time and entropy, as the guest's clock and RNG are the template's copies.
                from pyvmm.agent.client import Agent, connect_vsock_uds
                uds = self.uds_path
                self._agent = Agent(lambda: connect_vsock_uds(uds, AGENT_PORT, RESTORE_AGENT_TIMEOUT))
                with self._agent.client() as client:
                    client.set_time()
                    client.reseed(RESEED_BYTES)
            if self.lifetime is not None:
                self._timer = threading.Timer(self.lifetime, self._expire)
                self._timer.daemon = True
                self._timer.start()
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - started

    def _expire(self) -> None:
        self._expired = True
        if self.vm is not None:
            self.vm.stop()

    @property
    def agent(self):
        """The pyvmm.agent.client.AgentClient of this sandbox."""
        if self._expired:
            raise SandboxError(f"the sandbox's wall-clock limit of {self.lifetime:g} s passed: "
                               "its VM was killed")
        if self._agent is None or self.vm is None or self.vm.state == "Exited":
            raise SandboxError("the sandbox is not running")
        return self._agent

    # -- what runs inside -------------------------------------------------------------

    def run(self, command: str | Sequence[str], *, env: dict[str, str] | None = None,
            cwd: str | None = None, stdin: bytes | BinaryIO | None = None,
            timeout: float | None = None, pty: bool = False):
        """Run a command to its end: a string goes to /bin/sh -c, a list is the argv.
        Returns an ExecResult (stdout, stderr, exit_code, signal, timed_out, returncode)."""
        return self.agent.exec(_argv(command), env=env, cwd=cwd, stdin=stdin,
                               timeout=timeout, pty=pty)

    def start_process(self, command: str | Sequence[str], **options: Any):
        """Start a command and stream it: the agent client's Process (events as they
        come, write_stdin, close_stdin, signal, wait)."""
        return self.agent.start(_argv(command), **options)

    def write_file(self, path: str, data: bytes | BinaryIO, mode: int = 0o644) -> None:
        self.agent.put_file(path, data, mode=mode, mkdirs=True)

    def read_file(self, path: str, out: BinaryIO | None = None) -> bytes | None:
        return self.agent.get_file(path, out)

    # -- the end -------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self.vm is not None:
            self.vm.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __repr__(self) -> str:
        state = self.vm.state if self.vm is not None else "Not started"
        return f"<Sandbox {self.mem_mib} MiB {self.vcpus} vCPU {state}>"


def _argv(command: str | Sequence[str]) -> list[str]:
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    argv = list(command)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise SandboxError("a command is a non-empty list of strings, or a string for sh -c")
    return argv


__all__ = ["Sandbox", "SandboxError", "Template", "ensure_template", "AGENT_PORT"]

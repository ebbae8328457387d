"""Helpers of tests/test_snapshot.py: tiny counting guests to snapshot, synthetic
state files, a stand-in VM that can be snapshotted, and the restoring child.

The child (`python3 -m tests.framework.snapshots STATE MEM`) is a fresh process
that restores a tiny guest's snapshot: it maps the memory file, builds a
2-vCPU Machine with an in-kernel irqchip, restores the saved KVM state, saves
it again at once (for the round-trip check), starts paused, resumes, and
prints what it saw as one JSON line on stdout.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tests.framework.api import FakeLinuxVm

COUNTERS = 0x200000          # vCPU n counts at COUNTERS + 8 * n
VCPUS = 2
MEM_SIZE = 4 << 20
# Each vCPU increments its own counter in guest RAM, forever (rdi = its index, set
# by TinyVm).  No in/out: on KVM PVM ring 3 cannot use them.
COUNTING_GUEST = f"""
    mov ${COUNTERS}, %rbx
    lea (%rbx,%rdi,8), %rbx
1:  incq (%rbx)
    mov $100, %ecx
2:  dec %ecx
    jnz 2b
    jmp 1b
"""
KVM_MP_STATE_RUNNABLE = 0


def make_runnable(vcpu) -> None:
    """With the in-kernel irqchip, vCPUs other than 0 start waiting for a SIPI
    (KVM_MP_STATE_UNINITIALIZED); a tiny guest has no BSP to send one."""
    from pyvmm.kvm import ffi, lib
    from pyvmm.kvm.ioctl import ioctl_struct
    mp = ffi.new("struct kvm_mp_state *", {"mp_state": KVM_MP_STATE_RUNNABLE})
    ioctl_struct(vcpu.fd, lib.KVM_SET_MP_STATE, mp, "KVM_SET_MP_STATE")


def counters(memory, vcpus: int = VCPUS) -> list[int]:
    return [memory.read_int(COUNTERS + 8 * i, 8) for i in range(vcpus)]


def wait_for(condition, timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def counting_tinyvm(mode):
    """A TinyVm (irqchip, 2 vCPUs) loaded with COUNTING_GUEST, every vCPU runnable."""
    from pyvmm.testbed import TinyVm, assemble
    vm = TinyVm(mode, mem_size=MEM_SIZE, vcpus=VCPUS, irqchip=True)
    try:
        vm.load(assemble(COUNTING_GUEST, mode))
        for vcpu in vm.machine.vcpus:
            make_runnable(vcpu)
    except BaseException:
        vm.close()
        raise
    return vm


# -- synthetic state files ------------------------------------------------------------------

def synthetic_body(kvm, kernel: str | os.PathLike, *, mem_mib: int = 16, vcpus: int = 1,
                   drives: list | None = None, nets: list | None = None,
                   snapshot_type: str = "Full") -> dict[str, Any]:
    """A state body that open_snapshot() accepts on this host: its host identity, a
    configuration (the kernel is never loaded) and the memory regions of mem_mib;
    its KVM and device state are empty (nothing restores it)."""
    from pyvmm import __version__
    from pyvmm.config import VmSpec
    from pyvmm.memory import x86_layout
    from pyvmm.snapshot import host_identity
    spec = VmSpec.build(kernel=kernel, mem_mib=mem_mib, vcpus=vcpus, drives=drives or [],
                        nets=nets or [])
    return {"snapshot_type": snapshot_type, "created_unix_ns": time.time_ns(),
            "pyvmm_version": __version__,
            "host": host_identity(kvm) if kvm is not None else
            {"kvm": "pvm", "cpu_vendor": "AuthenticAMD"},
            "vm_spec": spec.to_json(),
            "memory": {"regions": [list(r) for r in x86_layout(mem_mib << 20)],
                       "page_size": 4096, "dirty_pages": None},
            "kvm": {"vm": None, "vcpus": []},
            "devices": {"serial": {}, "i8042": {}, "virtio": {}}}


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# -- a stand-in VM that can be snapshotted ------------------------------------------------

class SnapshottingFakeVm(FakeLinuxVm):
    """FakeLinuxVm with LinuxVm.snapshot: records the call, writes nothing."""

    def snapshot(self, snapshot_path, mem_file_path, snapshot_type="Full"):
        self.calls.append(("snapshot", snapshot_path, mem_file_path, snapshot_type))


# -- the restoring child ------------------------------------------------------------------------

def restore_child(state_path: str, mem_path: str) -> dict[str, Any]:
    from pyvmm.machine import Machine
    from pyvmm.memory import GuestMemory
    from pyvmm.snapshot.format import read_state_file

    body = read_state_file(state_path)
    layout = [tuple(r) for r in body["memory"]["regions"]]
    fd = os.open(mem_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        memory = GuestMemory.from_file(layout, fd)
    finally:
        os.close(fd)
    report: dict[str, Any] = {}
    machine = Machine(memory=memory, vcpus=VCPUS, irqchip=True)
    try:
        machine.restore_state(body["kvm"])
        report["resaved"] = machine.save_state()
        report["at_restore"] = counters(memory)
        machine.start(paused=True)
        time.sleep(0.2)
        report["paused_flag"] = machine.paused
        report["while_paused"] = counters(memory)
        machine.resume()
        time.sleep(0.3)
        # Slow hosts: give the vCPUs more time before calling them stuck.
        wait_for(lambda: all(c > s for c, s in zip(counters(memory), body["counters"])), 10)
        report["after_resume"] = counters(memory)
        machine.pause()
        report["final"] = machine.save_state()
        report["outcome"] = None if machine.outcome is None else machine.outcome.describe()
    finally:
        machine.close()
    return report


if __name__ == "__main__":
    print(json.dumps(restore_child(sys.argv[1], sys.argv[2])))

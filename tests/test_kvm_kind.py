"""pyvmm sets a Linux VM up for the KVM it runs on: KVM PVM or hardware (VT-x/AMD-V).

CI runs these on both kinds (scripts/test-hwkvm runs the KVM tests again under
nested SVM, with PYVMM_EXPECT_HWKVM=1), so the paths PVM never takes are run
and checked, not only reasoned about.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvmm import pvm
from pyvmm.builder import LinuxVm
from pyvmm.config import VmSpec
from pyvmm.console import ConsoleCapture

pytestmark = pytest.mark.kvm

HYPERCALL_FEATURES = (pvm.KVM_FEATURE_PV_SEND_IPI | pvm.KVM_FEATURE_PV_UNHALT
                      | pvm.KVM_FEATURE_PV_SCHED_YIELD)


def _leaves(entries: list[dict[str, int]], function: int) -> dict[int, dict[str, int]]:
    return {e["index"]: e for e in entries if e["function"] == function}


def test_the_host_is_the_kind_of_kvm_the_run_expects():
    # The hardware-KVM run must not pass by quietly running on PVM again.
    if os.environ.get("PYVMM_EXPECT_HWKVM") == "1":
        assert not pvm.is_pvm_host()
        assert Path("/sys/module/kvm_amd").exists() or Path("/sys/module/kvm_intel").exists()


def test_a_linux_vm_is_set_up_for_the_kvm_it_runs_on(guest):
    spec = VmSpec.build(kernel=guest.vmlinux, initrd=guest.initramfs, vcpus=2, mem_mib=64)
    with LinuxVm(spec, ConsoleCapture()) as vm:
        on_pvm = pvm.is_pvm_host()
        assert vm.pvm == on_pvm
        # PVM: its kernel parameters and its exit fix-ups; hardware: neither.
        assert (pvm.KERNEL_PARAMS in vm.cmdline) == on_pvm
        assert vm.machine.exit_hooks == ([vm.fixups] if on_pvm else [])
        supported = vm.machine.kvm.supported_cpuid()
        offered = _leaves(supported, pvm.KVM_CPUID_FEATURES)[0]["eax"] & HYPERCALL_FEATURES
        if not on_pvm:
            assert offered, "hardware KVM offers the hypercall-based PV features"
        for vcpu in vm.machine.vcpus:
            cpuid = vcpu.get_cpuid()
            seen = _leaves(cpuid, pvm.KVM_CPUID_FEATURES)[0]["eax"] & HYPERCALL_FEATURES
            # PV IPIs, PV unhalt and PV yield: hidden on PVM (a VMCALL never returns
            # there), offered as KVM offers them elsewhere.
            assert seen == (0 if on_pvm else offered)
            if not on_pvm:
                _check_xsave_leaf(_leaves(cpuid, 0xD), _leaves(supported, 0xD))


# XCR0 at reset (x87 | SSE) needs the 512-byte legacy area and the 64-byte header.
XSAVE_SIZE_AT_RESET = 576


def _check_xsave_leaf(seen: dict, supported: dict) -> None:
    """Leaf 0xD as the guest sees it is KVM's: the feature masks and each
    component's size and offset exactly as supported, and in EBX of subleaves 0
    and 1 the save-area size for the XCR0/XSS in force, which KVM keeps in step
    (it updates them on XSETBV).  A guest whose XSETBV never reaches KVM (the
    nested-SVM rig under TCG has no XSETBV intercept) sees 576 after enabling
    AVX and turns XSAVE off: that is the rig, not pyvmm."""
    assert seen.keys() == supported.keys()
    for index, entry in seen.items():
        maintained = ("ebx",) if index in (0, 1) else ()
        assert {k: v for k, v in entry.items() if k not in maintained} == \
            {k: v for k, v in supported[index].items() if k not in maintained}, index
    assert seen[0]["ebx"] == XSAVE_SIZE_AT_RESET


def test_pyvmm_passes_the_xsave_leaf_as_kvm_supports_it():
    from pyvmm.boot.cpu import build_cpuid
    from pyvmm.kvm import Kvm
    with Kvm() as kvm:
        supported = kvm.supported_cpuid()
    for hide in (False, True):
        assert _leaves(build_cpuid(supported, 0, 1, hide), 0xD) == _leaves(supported, 0xD)

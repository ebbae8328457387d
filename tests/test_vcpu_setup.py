"""vCPU state for Linux (MSRs, CPUID, LAPIC) and the KVM PVM fix-ups, with tiny guests."""
from __future__ import annotations

import pytest

from pyvmm.boot.cpu import BOOT_MSRS, build_cpuid, setup_vcpus
from pyvmm.boot.cpu import EntryState
from pyvmm.pvm import PvmFixups, translate
from pyvmm.kvm import OutcomeKind
from pyvmm.pvm import is_pvm_host
from pyvmm.machine import Machine
from pyvmm.testbed import PML4_ADDR, Mode, TinyVm, assemble

pytestmark = pytest.mark.kvm

# Installs `handler` as the #BP (vector 3) gate of a fresh IDT, then runs BODY.
# The handler reports the RIP the CPU pushed, through the debug-exit port.
WITH_BP_HANDLER = """
    lea handler(%rip), %rax
    mov $0x3000, %rbx
    mov %ax, 0x30(%rbx)          # gate 3: offset 15..0
    movw $0x08, 0x32(%rbx)       # kernel code selector
    movw $0x8e00, 0x34(%rbx)     # present, DPL 0, 64-bit interrupt gate
    shr $16, %rax
    mov %ax, 0x36(%rbx)          # offset 31..16
    shr $16, %rax
    mov %eax, 0x38(%rbx)         # offset 63..32
    movl $0, 0x3c(%rbx)
    lidt idtr(%rip)
    BODY
    hlt
handler:
    mov (%rsp), %rax
    mov $0xf4, %dx
    out %eax, %dx
idtr: .word 0xfff
      .quad 0x3000
"""


def _run_with_fixups(body: str):
    vm = TinyVm(Mode.LONG_RING0)
    fixups = PvmFixups(vm.machine.memory)
    vm.machine.exit_hooks.append(fixups)
    code = assemble(WITH_BP_HANDLER.replace("BODY", body), Mode.LONG_RING0)
    vm.load(code)
    return vm, vm.run(), fixups, code


def test_int3_in_ring0_reaches_the_guest_handler_after_the_instruction():
    vm, outcome, fixups, code = _run_with_fixups("int3")
    with vm:
        assert outcome.kind == OutcomeKind.DEVICE_STOP, outcome.describe()
        int3_at = vm.entry + code.index(b"\x0f\x01\x1d") + 7    # lidt rip-relative is 7 bytes
        assert code[int3_at - vm.entry] == 0xCC
        assert outcome.data == int3_at + 1                     # #BP is a trap
        # On KVM PVM the emulator fails on int3 and the fix-up injects #BP.
        assert fixups.counts["int3"] == (1 if is_pvm_host() else 0)


def test_fwait_in_ring0_runs_on():
    vm, outcome, fixups, _ = _run_with_fixups("fwait\n    int3")
    with vm:
        assert outcome.kind == OutcomeKind.DEVICE_STOP, outcome.describe()
        if is_pvm_host():
            assert fixups.counts == {"fwait": 1, "int3": 1}


def test_page_walk_matches_the_identity_map():
    with TinyVm(Mode.LONG_RING0) as vm:
        mem = vm.machine.memory
        cr0, cr4, efer = 0x80000011, 0x20, 0x500
        for vaddr in (0x10000, 0x1234567, 0x3FFFFFFF):
            assert translate(mem, cr0, PML4_ADDR, cr4, efer, vaddr) == vaddr
        assert translate(mem, 0x11, 0, 0, 0, 0x1234) == 0x1234          # paging off


def test_boot_msrs_read_back_as_set():
    with Machine(64 << 20, 1) as machine:
        setup_vcpus(machine.kvm, machine.vcpus, machine.memory,
                    EntryState(0x100200, pvh=False), hide_pvm_features=machine.kvm.pvm)
        values = machine.vcpus[0].get_msrs(list(BOOT_MSRS))
        # The TSC has moved on since we zeroed it; every other MSR holds its value.
        expected = {k: v for k, v in BOOT_MSRS.items() if k != 0x10}
        assert {k: values[k] for k in expected} == expected


def test_cpuid_gives_each_vcpu_its_apic_id_and_the_cpu_count():
    with Machine(64 << 20, 2) as machine:
        supported = machine.kvm.supported_cpuid()
        for index in range(2):
            leaf1 = next(e for e in build_cpuid(supported, index, 2, False) if e["function"] == 1)
            assert leaf1["ebx"] >> 24 == index
            assert (leaf1["ebx"] >> 16) & 0xFF == 2
            assert leaf1["ecx"] & (1 << 31)                  # hypervisor present
        hidden = next(e for e in build_cpuid(supported, 0, 1, True) if e["function"] == 1)
        assert not hidden["ecx"] & ((1 << 13) | (1 << 23) | (1 << 26))   # CX16 POPCNT XSAVE


def test_hypercall_features_are_hidden_from_the_guest_where_hypercalls_hang():
    # On KVM PVM a VMCALL/VMMCALL never returns, so the guest must not be
    # offered the paravirt features that depend on one (PV IPIs hung SMP
    # Linux at AP bring-up).  Checked where it counts: the CPUID the guest's
    # ring 0 actually sees.
    from pyvmm import pvm
    hypercall_features = (pvm.KVM_FEATURE_PV_SEND_IPI | pvm.KVM_FEATURE_PV_UNHALT
                          | pvm.KVM_FEATURE_PV_SCHED_YIELD)
    code = assemble(f"""
        mov ${pvm.KVM_CPUID_FEATURES}, %eax
        xor %ecx, %ecx
        cpuid
        mov %eax, %r12d
        mov $0xf4, %dx
        out %al, %dx
    """, Mode.LONG_RING0)
    seen = {}
    for hide in (False, True):
        with TinyVm(Mode.LONG_RING0) as vm:
            supported = vm.machine.kvm.supported_cpuid()
            vm.machine.vcpus[0].set_cpuid(build_cpuid(supported, 0, 1, hide))
            vm.load(code)
            outcome = vm.run()
            assert outcome.kind == OutcomeKind.DEVICE_STOP, outcome.describe()
            seen[hide] = outcome.regs["r12"]
    offered = next(e["eax"] for e in supported if e["function"] == pvm.KVM_CPUID_FEATURES)
    assert seen[False] & hypercall_features == offered & hypercall_features
    assert seen[True] & hypercall_features == 0

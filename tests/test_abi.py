"""The cffi view of the KVM ABI matches the C compiler's view of <linux/kvm.h>.

The build already fails when a declared field has the wrong offset; this test
also pins the total sizes, which the ioctl numbers encode, by asking gcc.
"""
from __future__ import annotations

import subprocess

import pytest

from pyvmm.kvm import ffi, lib

STRUCTS = ["kvm_userspace_memory_region", "kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs",
           "kvm_fpu", "kvm_msr_entry", "kvm_msrs", "kvm_cpuid_entry2", "kvm_cpuid2",
           "kvm_lapic_state", "kvm_pit_config", "kvm_irq_level", "kvm_irqfd", "kvm_ioeventfd",
           "kvm_mp_state", "kvm_vcpu_events"]


@pytest.fixture(scope="module")
def c_sizes(tmp_path_factory) -> dict[str, int]:
    src = tmp_path_factory.mktemp("abi") / "sizes.c"
    body = "".join(f'printf("{s} %zu\\n", sizeof(struct {s}));\n' for s in STRUCTS)
    src.write_text(f"#include <stdio.h>\n#include <linux/kvm.h>\nint main(void){{\n{body}}}\n")
    exe = src.with_suffix("")
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {name: int(size) for name, size in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_size_matches_the_kernel_header(c_sizes, name):
    assert ffi.sizeof(f"struct {name}") == c_sizes[name]


def test_known_abi_sizes():
    # Fixed by the kernel ABI for x86-64; a change here would be a kernel bug.
    assert ffi.sizeof("struct kvm_regs") == 144
    assert ffi.sizeof("struct kvm_sregs") == 312
    assert ffi.sizeof("struct kvm_fpu") == 416
    assert ffi.sizeof("struct kvm_vcpu_events") == 64


def test_ioctl_numbers_encode_the_struct_sizes():
    # _IOC_SIZE is bits 16..29 of the request number.
    assert (lib.KVM_GET_REGS >> 16) & 0x3FFF == ffi.sizeof("struct kvm_regs")
    assert (lib.KVM_SET_SREGS >> 16) & 0x3FFF == ffi.sizeof("struct kvm_sregs")

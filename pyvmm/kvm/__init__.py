"""The KVM layer: /dev/kvm, the VM fd and the vCPU fds, as thin typed wrappers.

Structures come from pyvmm._native (cffi, checked against <linux/kvm.h>);
ioctls go through fcntl.ioctl on cffi buffers, except KVM_RUN, which the C
run loop issues with the GIL released.
"""
from pyvmm.kvm.ioctl import KvmError, ffi, lib
from pyvmm.kvm.system import Kvm, KvmUnavailable, MissingCapability
from pyvmm.kvm.vcpu import ExitReason, Outcome, OutcomeKind, VcpuFd
from pyvmm.kvm.vm import VmFd

__all__ = [
    "ExitReason", "Kvm", "KvmError", "KvmUnavailable", "MissingCapability", "Outcome",
    "OutcomeKind", "VcpuFd", "VmFd", "ffi", "lib",
]

"""/dev/kvm: open it, check the API version and the capabilities pyvmm uses."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from pyvmm.closing import Closeable
from pyvmm.errors import PyvmmError
from pyvmm.pvm import is_pvm_host
from pyvmm.kvm.ioctl import KvmError, ffi, ioctl_int, ioctl_struct, lib

KVM_PATH = "/dev/kvm"
# KVM_GET_API_VERSION has answered 12 since Linux 2.6.22 (api.rst 4.1).
EXPECTED_API_VERSION = 12
# Enough for every leaf of any current CPU; KVM answers E2BIG if it is not.
CPUID_ENTRIES = 256
MSR_LIST_ENTRIES = 1024


class KvmUnavailable(PyvmmError):
    """/dev/kvm is missing, not accessible or not a KVM we can use."""


class MissingCapability(KvmUnavailable):
    """The host KVM lacks a capability pyvmm needs."""


@dataclass(frozen=True)
class Capability:
    name: str
    why: str


# Every capability the VMM relies on, with what it is for (api.rst section 8).
REQUIRED_CAPABILITIES: tuple[Capability, ...] = (
    Capability("USER_MEMORY", "guest RAM is mapped from our own memfd"),
    Capability("IRQCHIP", "the in-kernel PIC/IOAPIC/LAPIC"),
    Capability("PIT2", "the in-kernel i8254 timer"),
    Capability("HLT", "halted vCPUs sleep in the kernel"),
    Capability("SET_TSS_ADDR", "the TSS region Intel VMX needs below 4 GiB"),
    Capability("SET_IDENTITY_MAP_ADDR", "the identity page table for real mode on VMX"),
    Capability("EXT_CPUID", "KVM_GET_SUPPORTED_CPUID and KVM_SET_CPUID2"),
    Capability("IOEVENTFD", "virtqueue kicks handled off the vCPU thread"),
    Capability("IRQFD", "device interrupts raised from I/O threads"),
    Capability("IMMEDIATE_EXIT", "stopping a vCPU from another thread"),
    Capability("VCPU_EVENTS", "injecting exceptions (PVM int3 fix-up, snapshots)"),
    Capability("MP_STATE", "vCPU run states"),
    Capability("SYNC_MMU", "guest memory that the host may page"),
)


class Kvm(Closeable):
    """The /dev/kvm system fd."""

    def __init__(self, path: str = KVM_PATH) -> None:
        self.path = path
        self.fd = self._open(path)
        try:
            self._check_api_version()
            self.check_capabilities(REQUIRED_CAPABILITIES)
            self.vcpu_mmap_size = ioctl_int(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0,
                                            "KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            os.close(self.fd)
            raise
        self.pvm = is_pvm_host()

    @staticmethod
    def _open(path: str) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: enable virtualization (VT-x/AMD-V) and load the kvm "
                "module (`modprobe kvm_intel` or `modprobe kvm_amd`)") from None
        except PermissionError:
            raise KvmUnavailable(
                f"permission denied opening {path}: add your user to the kvm group "
                "(`sudo usermod -aG kvm $USER`, then log in again) or run as root") from None
        except OSError as exc:
            raise KvmUnavailable(f"cannot open {path}: {exc.strerror}") from None

    def _check_api_version(self) -> None:
        version = ioctl_int(self.fd, lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != EXPECTED_API_VERSION:
            raise KvmUnavailable(
                f"{self.path} speaks KVM API version {version}, pyvmm needs "
                f"{EXPECTED_API_VERSION}: use a Linux kernel from the last 15 years")

    def check_extension(self, name: str) -> int:
        """The value of KVM_CAP_<name> (0 when absent)."""
        return ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, getattr(lib, f"KVM_CAP_{name}"),
                         f"KVM_CHECK_EXTENSION({name})")

    def check_capabilities(self, caps: tuple[Capability, ...]) -> None:
        for cap in caps:
            if self.check_extension(cap.name) <= 0:
                raise MissingCapability(
                    f"the host KVM lacks KVM_CAP_{cap.name}, needed for {cap.why}: "
                    "upgrade the host kernel (Linux 5.10 or later)")

    @property
    def max_vcpus(self) -> int:
        return self.check_extension("MAX_VCPUS") or self.check_extension("NR_VCPUS")

    def supported_cpuid(self) -> list[dict[str, int]]:
        """KVM_GET_SUPPORTED_CPUID, as a list of dicts (function, index, flags, eax..edx)."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": CPUID_ENTRIES, "entries": CPUID_ENTRIES})
        ioctl_struct(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID")
        return [cpuid_entry_to_dict(cpuid.entries[i]) for i in range(cpuid.nent)]

    def msr_index_list(self) -> list[int]:
        msrs = ffi.new("struct kvm_msr_list *", {"nmsrs": MSR_LIST_ENTRIES,
                                                 "indices": MSR_LIST_ENTRIES})
        try:
            ioctl_struct(self.fd, lib.KVM_GET_MSR_INDEX_LIST, msrs, "KVM_GET_MSR_INDEX_LIST")
        except KvmError as exc:
            if exc.errno != errno.E2BIG:
                raise
        return [msrs.indices[i] for i in range(min(msrs.nmsrs, MSR_LIST_ENTRIES))]

    def create_vm(self) -> int:
        """KVM_CREATE_VM; returns the VM fd (wrap it in VmFd)."""
        return ioctl_int(self.fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def cpuid_entry_to_dict(entry) -> dict[str, int]:
    return {name: getattr(entry, name) for name in CPUID_FIELDS}

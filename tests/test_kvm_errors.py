"""Every way KVM can be unusable gives one clear sentence."""
from __future__ import annotations

import os

import pytest

from pyvmm.kvm import Kvm, KvmUnavailable, MissingCapability
from pyvmm.pvm import is_pvm_host


def test_missing_device_says_what_to_do(tmp_path):
    with pytest.raises(KvmUnavailable, match="does not exist: enable virtualization"):
        Kvm(str(tmp_path / "kvm"))


def test_permission_denied_points_to_the_kvm_group(monkeypatch):
    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(KvmUnavailable, match="kvm group"):
        Kvm()


def test_not_a_kvm_device(tmp_path):
    path = tmp_path / "notkvm"
    path.write_text("")
    with pytest.raises(Exception, match="KVM_GET_API_VERSION failed"):
        Kvm(str(path))


@pytest.mark.kvm
def test_missing_capability_names_it_and_what_for(monkeypatch):
    real = Kvm.check_extension

    def without_irqfd(self, name):
        return 0 if name == "IRQFD" else real(self, name)
    monkeypatch.setattr(Kvm, "check_extension", without_irqfd)
    with pytest.raises(MissingCapability, match="KVM_CAP_IRQFD, needed for device interrupts"):
        Kvm()


@pytest.mark.kvm
def test_kvm_opens_and_reports_the_host():
    with Kvm() as kvm:
        assert kvm.vcpu_mmap_size >= 4096
        assert kvm.max_vcpus >= 1
        assert kvm.pvm == is_pvm_host()
        leaves = {entry["function"] for entry in kvm.supported_cpuid()}
        assert 0 in leaves and 1 in leaves
        assert kvm.msr_index_list()

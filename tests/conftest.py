"""Shared fixtures.

Tests marked `kvm` need a usable /dev/kvm.  Without one they skip, unless
PYVMM_REQUIRE_KVM=1 (as in CI), where they fail: a CI run must never go green
by skipping the tests that matter.
"""
from __future__ import annotations

import os

import pytest


def _kvm_problem() -> str | None:
    try:
        from pyvmm.kvm import Kvm
        Kvm().close()
    except Exception as exc:  # noqa: BLE001 - any reason KVM is unusable
        return str(exc)
    return None


@pytest.fixture(scope="session")
def kvm_problem() -> str | None:
    return _kvm_problem()


@pytest.fixture(autouse=True)
def _require_kvm(request: pytest.FixtureRequest, kvm_problem: str | None) -> None:
    if request.node.get_closest_marker("kvm") is None or kvm_problem is None:
        return
    if os.environ.get("PYVMM_REQUIRE_KVM") == "1":
        pytest.fail(f"KVM is required (PYVMM_REQUIRE_KVM=1) but unusable: {kvm_problem}")
    pytest.skip(f"no usable KVM: {kvm_problem}")


@pytest.fixture(scope="session")
def guest():
    """The built-in guest's kernel and initramfs (built by `pyvmm guest build`)."""
    from pyvmm import builtin_guest
    found = builtin_guest.find_guest()
    if found is None:
        pytest.fail("the built-in guest is not built: run `pyvmm guest build` (.ci/run does)")
    return found

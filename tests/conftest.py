"""Shared fixtures; the helpers behind them are in tests/framework.

Tests marked `kvm` need a usable /dev/kvm.  Without one they skip, unless
PYVMM_REQUIRE_KVM=1 (as in CI), where they fail: a CI run must never go green
by skipping the tests that matter.
"""
from __future__ import annotations

import os

import pytest

from tests.framework.api import CheckedClient, serve, write_api_files
from tests.framework.images import write_echo_guest
from tests.framework.microvm import MicrovmFactory
from tests.framework.netns import NetNamespace
from tests.framework.process import Process, pyvmm_command


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


# -- microVMs ---------------------------------------------------------------------------------

@pytest.fixture
def microvm_factory():
    """framework.microvm.MicrovmFactory: boot(**MicroVM kwargs) gives a VM at the guest's
    init; every VM it gave is closed after the test."""
    factory = MicrovmFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_microvm_factory():
    """The same, for VMs that the tests of a module share (a Linux boot takes about a
    minute on KVM PVM hosts): closed after the module."""
    factory = MicrovmFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def shared_vm(request, guest, module_microvm_factory):
    """One built-in guest booted for the whole module, at its shell, configured by the
    module's SHARED_VM (MicroVM keyword arguments; default: MicroVM's own)."""
    return module_microvm_factory.boot(**getattr(request.module, "SHARED_VM", {}))


@pytest.fixture(scope="module")
def netns():
    """A network namespace of the module's own with a TAP device (framework.netns)."""
    ns = NetNamespace(f"pyvmm-test-{os.getpid()}")
    yield ns
    ns.delete()


@pytest.fixture
def echo_kernel(tmp_path) -> str:
    """The echo guest (framework.images.ECHO_CODE), a PVH ELF: echoes COM1, resets on '!'."""
    return write_echo_guest(tmp_path / "echo.elf")


# -- processes ---------------------------------------------------------------------------------

@pytest.fixture
def spawn_pyvmm():
    """spawn_pyvmm(*args) starts `python -m pyvmm ARGS` (framework.process.Process);
    every process it started is killed after the test."""
    started: list[Process] = []

    def spawn(*args: str, stdin: bool = True) -> Process:
        started.append(Process(pyvmm_command() + list(args), stdin=stdin))
        return started[-1]
    yield spawn
    for proc in started:
        proc.close()


# -- the API over a stand-in VM -------------------------------------------------------------

@pytest.fixture
def api_files(tmp_path):
    """A kernel, an initrd and two disk images for the route tests (never loaded)."""
    return write_api_files(tmp_path)


@pytest.fixture
def api(api_files):
    """A CheckedClient of an API server over a MicroVM with a FakeLinuxVm behind it."""
    vm, server = serve(api_files, request_timeout=1.0, idle_timeout=5.0)
    client = CheckedClient(server.path)
    yield client
    client.close()
    server.close()
    vm.close()


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory):
    """One server for all of a module's hypothesis examples: a server that survives
    them all.  (client, vm)."""
    vm, server = serve(tmp_path_factory.mktemp("hyp"), request_timeout=2.0)
    client = CheckedClient(server.path)
    yield client, vm
    client.close()
    server.close()
    vm.close()

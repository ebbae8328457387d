"""MicroVM, the Python API: building it (kwargs or config JSON, one model),
refusing what its state does not allow, and its lifecycle on a real VM with a
tiny guest that echoes its serial console (no Linux: a second per test)."""
from __future__ import annotations

import json
import threading
import time

import pytest

from pyvmm.config import ConfigError, VmSpec
from pyvmm.microvm import BEFORE_START, MicroVM, MicroVMError

# -- without KVM -----------------------------------------------------------------------------

def test_kwargs_and_config_json_build_the_same_model(tmp_path, echo_kernel):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    vm = MicroVM(kernel=echo_kernel, cmdline="quiet", vcpus=2, mem_mib=64,
                 drives=[{"drive_id": "rootfs", "path_on_host": str(disk),
                          "is_root_device": True, "is_read_only": True}], rng=True)
    config = vm.config_json()
    assert config["boot-source"]["boot_args"].endswith(" quiet")
    assert config["drives"] == [{"drive_id": "rootfs", "path_on_host": str(disk),
                                 "is_root_device": True, "is_read_only": True,
                                 "cache_type": "Unsafe", "io_engine": "Sync"}]
    assert config["entropy"] == {} and config["machine-config"]["vcpu_count"] == 2
    for source in (config, json.dumps(config), tmp_path / "vm.json"):
        (tmp_path / "vm.json").write_text(json.dumps(config))
        with MicroVM.from_config(source) as again:
            assert again.config_json() == config
    vm.close()


def test_the_built_in_guest_is_the_default_kernel(monkeypatch, tmp_path, echo_kernel):
    from pyvmm import builtin_guest
    monkeypatch.setattr(builtin_guest, "find_guest", lambda: None)
    with pytest.raises(MicroVMError, match="pyvmm guest build"):
        MicroVM()
    paths = builtin_guest.GuestPaths(tmp_path / "bz", tmp_path / "echo.elf", tmp_path / "echo.elf",
                                tmp_path / "System.map")
    monkeypatch.setattr(builtin_guest, "find_guest", lambda: paths)
    with MicroVM() as vm:
        boot = vm.config_json()["boot-source"]
        assert boot["kernel_image_path"] == boot["initrd_path"] == echo_kernel


DRIVE = {"drive_id": "d0", "path_on_host": "{disk}", "is_root_device": False,
         "is_read_only": False}


def _with_disk(value, disk):
    if isinstance(value, dict):
        return {k: v.format(disk=disk) if isinstance(v, str) else v for k, v in value.items()}
    return value.format(disk=disk)


@pytest.mark.parametrize("kwargs, words", [
    ({"vcpus": 0}, "out of range"), ({"mem_mib": 4}, "out of range"),
    ({"vcpus": "2"}, "must be an integer"),
    ({"drives": [{**DRIVE, "path_on_host": "/nonexistent"}]}, "does not exist"),
    ({"drives": [{**DRIVE, "rw": True}]}, "unknown field 'rw'"),
    ({"drives": ["{disk},ro"]}, "expected a Drive or a dict"),
    ({"nets": [{"iface_id": "eth0"}]}, "missing field 'host_dev_name'"),
    ({"nets": ["tap0"]}, "expected a NetworkInterface or a dict"),
    ({"cmdline": "a", "boot_args": "b"}, "not both"), ({"console": "tty"}, "bad --console"),
    ({"vm_id": "a b"}, "instance id"),
])
def test_bad_keyword_arguments_are_refused_clearly(tmp_path, echo_kernel, kwargs, words):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    kwargs = {k: [_with_disk(x, disk) for x in v] if isinstance(v, list) else v
              for k, v in kwargs.items()}
    with pytest.raises((MicroVMError, ConfigError), match=words):
        MicroVM(kernel=echo_kernel, **kwargs)


def test_what_needs_a_running_vm_is_refused_before_start(echo_kernel):
    with MicroVM(kernel=echo_kernel) as vm:
        assert vm.state == "Not started" and vm.stats == {}
        for call in (vm.pause, vm.resume, lambda: vm.serial.write("x"), vm.wait,
                     vm.send_ctrl_alt_del):
            with pytest.raises(MicroVMError, match=BEFORE_START):
                call()
        vm.stop()                        # nothing to stop: fine
    with pytest.raises(MicroVMError, match="closed"):
        vm.start()


def test_an_unconfigured_vm_cannot_start():
    with MicroVM.unconfigured() as vm:
        with pytest.raises(ConfigError, match="boot source"):
            vm.start()
        assert vm.state == "Not started"


# -- with KVM: the echo guest -------------------------------------------------------------------

@pytest.mark.kvm
def test_lifecycle_serial_pause_resume_and_reboot(echo_kernel):
    with MicroVM(kernel=echo_kernel, mem_mib=32, boot_args="") as vm:
        vm.start()
        assert vm.state == "Running"
        vm.serial.write("hello\n")
        assert vm.serial.expect(r"hel+o", timeout=30).group() == b"hello"
        vm.pause()
        assert vm.state == "Paused"
        end = vm.serial.capture.end
        vm.serial.write(b"typed while paused\n")
        time.sleep(0.5)
        assert vm.serial.capture.end == end, "a paused vCPU echoed input"
        vm.resume()
        assert vm.state == "Running"
        vm.serial.expect(b"typed while paused\n", timeout=30)
        vm.serial.write("abc")
        vm.serial.expect("abc", timeout=30)
        assert vm.serial.read() == b""             # expect() moved past everything
        stats = vm.stats
        assert stats["devices"]["serial"] > 0 and stats["serial_tx_bytes"] >= 27
        assert sum(stats["vcpus"][0].values()) > 0
        vm.serial.write("!")                      # the guest resets: the VM ends
        result = vm.wait(timeout=30)
        assert result is not None and result.exit_code == 0, result
        assert result.reason == "the guest rebooted" and vm.state == "Exited"
        with pytest.raises(MicroVMError, match="exited"):
            vm.serial.write("x")
        with pytest.raises(MicroVMError, match="the VM ended"):
            vm.serial.expect("never", timeout=30)
        with pytest.raises(MicroVMError, match="exited"):
            vm.pause()


@pytest.mark.kvm
def test_stop_ends_the_vm_with_exit_code_0(echo_kernel):
    with MicroVM(kernel=echo_kernel, mem_mib=32, vcpus=2) as vm:
        vm.start()
        assert vm.wait(timeout=0.2) is None
        vm.pause()
        vm.stop()                                 # from paused, too
        result = vm.wait(timeout=30)
        assert result.exit_code == 0 and result.reason == "stopped by the host"


@pytest.mark.kvm
def test_the_context_manager_cleans_up_after_an_exception(echo_kernel):
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError):
        with MicroVM(kernel=echo_kernel, mem_mib=32, vcpus=2) as vm:
            vm.start()
            raise RuntimeError("the test fails half-way")
    assert vm.state == "Exited"
    assert vm._vm.machine._closed
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = {t.name for t in threading.enumerate()} - before
        if not any(name.startswith("vcpu") for name in left):
            break
        time.sleep(0.05)
    assert not any(name.startswith("vcpu") for name in left), left


@pytest.mark.kvm
def test_start_failures_leave_the_vm_startable_again(tmp_path, echo_kernel):
    """A kernel that cannot load gives a clear error and no half-built VM."""
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a kernel" * 100)
    spec = VmSpec.build(kernel=bad)
    with MicroVM(spec=spec) as vm:
        with pytest.raises(Exception, match="(?i)kernel|bzImage|ELF"):
            vm.start()
        assert vm.state == "Not started"

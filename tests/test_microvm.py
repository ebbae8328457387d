"""MicroVM, the Python API: building it (kwargs or config JSON, one model),
refusing what its state does not allow, and its lifecycle on a real VM with a
tiny guest that echoes its serial console (no Linux: a second per test)."""
from __future__ import annotations

import json
import struct
import threading
import time

import pytest

from pyvmm.config import ConfigError, VmSpec
from pyvmm.microvm import BEFORE_START, MicroVM, MicroVMError

# A PVH kernel in 32-bit protected mode that echoes COM1: it polls LSR for a
# received byte, writes it back to THR, and on '!' pulses the i8042 reset line
# (the VM ends as when Linux reboots: exit code 0).
ECHO_CODE = bytes.fromhex(
    "66bafd03" "ec" "a801" "74f7"       # poll: mov $0x3fd,%dx; in; test $1,%al; jz poll
    "66baf803" "ec" "3c21" "7403"       # mov $0x3f8,%dx; in; cmp $'!',%al; je reset
    "ee" "ebeb"                          # out %al,%dx; jmp poll
    "b0fe" "e664" "f4")                  # reset: mov $0xfe,%al; out %al,$0x64; hlt


def write_echo_guest(path) -> str:
    """An ELF with one PT_LOAD at 16 MiB and the Xen PVH entry note."""
    entry = 0x1000000
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", entry)
    data_off = 64 + 56 * 2
    header = bytearray(64)
    header[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 2, 62, 1, entry, 64, 0, 0, 64, 56, 2, 0, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, data_off, entry, entry, len(ECHO_CODE),
                        len(ECHO_CODE), 0x1000)
    phdrs += struct.pack("<IIQQQQQQ", 4, 4, data_off + len(ECHO_CODE), 0, 0, len(note),
                         len(note), 4)
    path.write_bytes(bytes(header) + phdrs + ECHO_CODE + note)
    return str(path)


@pytest.fixture
def echo_kernel(tmp_path):
    return write_echo_guest(tmp_path / "echo.elf")


# -- without KVM -----------------------------------------------------------------------------

def test_kwargs_and_config_json_build_the_same_model(tmp_path, echo_kernel):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    vm = MicroVM(kernel=echo_kernel, cmdline="quiet", vcpus=2, mem_mib=64,
                 drives=[f"{disk},ro,root,id=rootfs"], rng=True)
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


@pytest.mark.parametrize("kwargs, words", [
    ({"vcpus": 0}, "out of range"), ({"mem_mib": 4}, "out of range"),
    ({"vcpus": "2"}, "must be an integer"), ({"drives": ["/nonexistent"]}, "does not exist"),
    ({"drives": ["{disk},rw"]}, "unknown option"), ({"nets": ["tap0"]}, "bad option"),
    ({"cmdline": "a", "boot_args": "b"}, "not both"), ({"console": "tty"}, "bad --console"),
    ({"vm_id": "a b"}, "instance id"),
])
def test_bad_keyword_arguments_are_refused_clearly(tmp_path, echo_kernel, kwargs, words):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    kwargs = {k: [x.format(disk=disk) for x in v] if isinstance(v, list) else v
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
        end = vm.serial.transcript.end
        vm.serial.write(b"typed while paused\n")
        time.sleep(0.5)
        assert vm.serial.transcript.end == end, "a paused vCPU echoed input"
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

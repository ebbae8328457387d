"""The sandbox root filesystem, booted cold: the built-in kernel and initramfs with the
Debian image (firmware/build-rootfs*.sh) as a read-only virtio-blk disk and
pyvmm.rootfs=/dev/vda, so firmware/init lays a tmpfs over it with overlayfs and hands
over to the agent as PID 1.  And the fallback: an image that does not mount leaves the
busybox guest, its agent started because the VM has a vsock device.

Two boots (~1-2 min each on KVM PVM), each shared by its module's checks.  Sandboxes
restored from a snapshot of this boot are tests/test_sandbox_linux.py's.
"""
from __future__ import annotations

import re

import pytest

from tests.framework.microvm import BOOT_TIMEOUT, run_in_shell

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

AGENT_READY = rb"PYVMM-AGENT-READY port=1024"
ROOTFS_CMDLINE = "pyvmm.rootfs=/dev/vda"


def boot_with_disk(factory, tmp_path_factory, disk):
    d = tmp_path_factory.mktemp("rootfs")
    return factory.boot(
        mem_mib=256, rng=True, cmdline=ROOTFS_CMDLINE,
        drives=[{"drive_id": "rootfs", "path_on_host": str(disk), "is_root_device": False,
                 "is_read_only": True}],
        vsock={"guest_cid": 3, "uds_path": str(d / "v.sock")})


@pytest.fixture(scope="module")
def sandbox_vm(guest, module_microvm_factory, tmp_path_factory):
    """The Debian image as the sandbox root, its agent serving."""
    if guest.rootfs is None:
        pytest.fail("the sandbox root filesystem is not built: run `pyvmm guest build`")
    vm = boot_with_disk(module_microvm_factory, tmp_path_factory, guest.rootfs)
    vm.serial.expect(AGENT_READY, timeout=BOOT_TIMEOUT)
    return vm


def sh(vm, script: str) -> str:
    r = vm.exec(["sh", "-c", script], timeout=120)
    assert r.exit_code == 0, (script, r)
    return r.stdout.decode()


def test_the_agent_of_the_debian_image_is_pid_1(sandbox_vm):
    assert sh(sandbox_vm, "tr '\\0' ' ' < /proc/1/cmdline") == "/usr/sbin/pyvmm-agent --init "
    assert "bookworm" in sh(sandbox_vm, "cat /etc/os-release")
    assert sh(sandbox_vm, "python3 -c 'import sys; print(sys.version_info[:2])'") == "(3, 11)\n"
    # switch_root emptied the initramfs: nothing of busybox's guest is left in sight
    assert sh(sandbox_vm, "ls /sandbox /init /bin/busybox 2>&1; true").count("No such") == 3


def test_the_root_is_an_overlay_of_the_read_only_image_on_tmpfs(sandbox_vm):
    mounts = sh(sandbox_vm, "cat /proc/mounts")
    root = next(line for line in mounts.splitlines() if line.split()[1] == "/")
    assert root.startswith("overlay / overlay "), root
    assert "lowerdir=/sandbox/lower,upperdir=/tmp/.sandbox/upper" in root
    for moved in ("/proc", "/sys", "/dev"):
        assert re.search(rf"^\S+ {moved} ", mounts, re.M), (moved, mounts)
    assert sh(sandbox_vm, "cat /sys/block/vda/ro") == "1\n"     # the disk itself is read-only


def test_the_root_is_writable_where_the_image_is_not(sandbox_vm):
    # a new file, an image file changed, an image file deleted
    sh(sandbox_vm, "echo made > /etc/pyvmm-new; echo changed > /etc/hostname; rm /etc/hosts")
    assert sh(sandbox_vm, "cat /etc/pyvmm-new /etc/hostname; ls /etc/hosts 2>&1; true") == \
        "made\nchanged\nls: cannot access '/etc/hosts': No such file or directory\n"
    # an image directory deleted and made again: an opaque directory (tmpfs xattrs)
    sh(sandbox_vm, "rm -r /var/cache/debconf && mkdir /var/cache/debconf && "
                   "touch /var/cache/debconf/only")
    assert sh(sandbox_vm, "ls /var/cache/debconf") == "only\n"
    # programs that lock files work (sqlite3 needs CONFIG_FILE_LOCKING)
    script = ("import sqlite3; c = sqlite3.connect('/root/t.db'); c.execute('create table t(a)');"
              "c.execute('insert into t values (42)'); c.commit();"
              "print(c.execute('select a from t').fetchone()[0])")
    assert sh(sandbox_vm, f'python3 -c "{script}"') == "42\n"


# -- an image that does not mount: the busybox guest, its agent started for the vsock ------

@pytest.fixture(scope="module")
def fallback_vm(guest, module_microvm_factory, tmp_path_factory):
    blank = tmp_path_factory.mktemp("blank") / "blank.img"
    blank.write_bytes(bytes(1 << 20))
    vm = boot_with_disk(module_microvm_factory, tmp_path_factory, blank)
    vm.serial.expect(AGENT_READY, timeout=BOOT_TIMEOUT)
    return vm


def test_a_rootfs_that_does_not_mount_falls_back_to_busybox_in_one_line(fallback_vm):
    tail = fallback_vm.serial.capture.tail().decode(errors="replace")
    assert tail.count("pyvmm-init: no sandbox: cannot mount an ext4 image") == 1, tail
    # /proc, /sys and /dev are where the busybox guest keeps them, and its shell runs
    out = run_in_shell(fallback_vm, "ls -d /proc/self /sys/bus /dev/null && echo $((6 * 7))")
    assert sorted(out.split()) == ["/dev/null", "/proc/self", "/sys/bus", "42"], out


def test_the_busybox_guest_starts_its_agent_when_there_is_a_vsock_device(fallback_vm):
    r = fallback_vm.exec(["sh", "-c", "echo $((6 * 7)); readlink /proc/1/exe"], timeout=120)
    assert (r.exit_code, r.stdout) == (0, b"42\n/bin/busybox\n")

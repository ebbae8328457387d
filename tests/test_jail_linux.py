"""`pyvmm jail` with a real guest: one jailed VM, booted once (a minute on KVM PVM), is
checked for its confinement, its disk and its NIC; a second jail whose memory limit is
below the VM's needs must fail cleanly.  Run as root (the jailer needs it)."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from pyvmm.jail.mounts import python_paths
from tests.framework.microvm import run_in_shell
from tests.framework.process import Process, pyvmm_command

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

UID = GID = 4321
# Extra `pyvmm run` flags for every jailed VM here (e.g. --no-seccomp, to tell a jail
# problem from a seccomp filter's).
EXTRA = os.environ.get("PYVMM_JAIL_TEST_RUN_FLAGS", "").split()
HOST_IP, GUEST_IP = "172.31.7.1", "172.31.7.2"
DISK_MIB = 4
PATTERN = hashlib.sha256(b"pyvmm-jail").hexdigest().encode() * 64        # 4 KiB


def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("PYVMM_REQUIRE_KVM") == "1":
            pytest.fail("the jail tests need root")
        pytest.skip("the jail tests need root")


def _pid_file(base: str, jail_id: str, timeout: float = 60) -> int:
    path = os.path.join(base, "pyvmm", jail_id, "pyvmm.pid")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(open(path).read())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"no {path} after {timeout} s")


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


@pytest.fixture(scope="module")
def parent_cgroup():
    """A parent cgroup of this run's own, removed afterwards with whatever is left."""
    _need_root()
    name = f"pyvmm-test-{os.getpid()}"
    yield name
    for controller in ("memory", "pids", "cpu", "blkio"):
        path = f"/sys/fs/cgroup/{controller}/{name}"
        if os.path.isdir(path):
            for child in os.listdir(path):
                if os.path.isdir(os.path.join(path, child)):
                    os.rmdir(os.path.join(path, child))
            os.rmdir(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    _need_root()
    path = tmp_path_factory.mktemp("jails")
    os.chmod(path, 0o755)
    yield str(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def netns_with_tap():
    """A network namespace with a TAP device that belongs to the jail's uid, up."""
    _need_root()
    name = f"pyvmm-jail-{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    for cmd in (["ip", "netns", "add", name],
                ["ip", "-n", name, "link", "set", "lo", "up"],
                ["ip", "-n", name, "tuntap", "add", "tapj", "mode", "tap",
                 "user", str(UID), "group", str(GID)],
                ["ip", "-n", name, "addr", "add", f"{HOST_IP}/24", "dev", "tapj"],
                ["ip", "-n", name, "link", "set", "tapj", "up"]):
        subprocess.run(cmd, check=True, capture_output=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture(scope="module")
def jailed(guest, base, parent_cgroup, netns_with_tap, tmp_path_factory):
    """One jailed VM at its shell: the built-in guest, a disk owned by the jail's uid,
    a NIC on the uid's TAP in the network namespace, a new PID namespace, limits."""
    work = tmp_path_factory.mktemp("jail-vm")
    os.chmod(work, 0o755)
    disk = work / "disk.img"
    disk.write_bytes(bytes(DISK_MIB << 20))
    os.chown(disk, UID, GID)
    jail_id = f"vm-{uuid.uuid4().hex[:8]}"
    argv = pyvmm_command() + [
        "jail", "--id", jail_id, "--uid", str(UID), "--gid", str(GID),
        "--chroot-base-dir", base, "--parent-cgroup", parent_cgroup,
        "--netns", f"/run/netns/{netns_with_tap}", "--new-pid-ns",
        "--cgroup", "memory.max=1G", "--cgroup", "pids.max=64",
        "--cgroup", "cpu.max=max 100000",
        "--resource-limit", "no-file=1024", "--resource-limit", f"fsize={2 << 30}",
        # the built-in bzImage: its LZ4 payload is decompressed on the host inside the jail
        "--", "run", "--bzimage", "--mem", "256", "--disk", str(disk),
        "--net", "tap=tapj,mac=06:00:ac:1f:07:02", "--api-sock", "api.sock", *EXTRA]
    proc = Process(argv)
    try:
        proc.expect(rb"PYVMM-INIT-OK", timeout=600)
        # lz4 imported under `python -I -S`, and no kernel cache without a home directory
        assert "pyvmm: kernel: lz4 payload decompressed on the host" in proc.stderr()
        pid = _pid_file(base, jail_id)
        run_in_shell(proc, "dmesg -n 1")
        yield {"proc": proc, "pid": pid, "id": jail_id, "disk": disk, "base": base,
               "parent": parent_cgroup, "netns": netns_with_tap}
    finally:
        if proc.returncode is None:          # the jailer forwards it and removes its cgroups
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except Exception:  # noqa: BLE001 - close() kills it
                pass
        proc.close()


def test_the_vmm_sees_only_the_jail(jailed):
    pid = jailed["pid"]
    root = os.path.join(jailed["base"], "pyvmm", jailed["id"], "root")
    # its root is the top of its own mount namespace ("/" here; where the caller is
    # itself chrooted, as in the hardware-KVM rig, the kernel names it by the mount point
    # the pivot left it on, e.g. /mnt/root): never a path inside ours
    assert not os.readlink(f"/proc/{pid}/root").startswith(jailed["base"])
    assert os.stat(f"/proc/{pid}/root").st_ino != os.stat("/").st_ino or \
        os.stat(f"/proc/{pid}/root").st_dev != os.stat("/").st_dev
    seen = set(os.listdir(f"/proc/{pid}/root"))
    assert seen == set(os.listdir(root))                  # ...is the jail directory
    # the interpreter's and the package's directories are bound at their host paths, so
    # their top-level names depend on where this checkout lives (CI clones it elsewhere)
    interpreter_tops = {Path(p).parts[1] for p in python_paths()}
    assert seen <= {"dev", "proc", "sys", "etc", "usr", "lib", "lib64", "tmp",
                    "api.sock"} | interpreter_tops
    assert "host-only-marker" not in seen
    assert not os.path.exists(f"/proc/{pid}/root/etc/passwd")
    assert not os.path.exists(f"/proc/{pid}/root/bin/sh")
    assert sorted(os.listdir(f"/proc/{pid}/root/dev")) == sorted(
        n for n in ("kvm", "net", "userfaultfd") if n != "userfaultfd"
        or os.path.exists("/dev/userfaultfd"))
    # its fds: stdio, /dev/kvm and the VM's, the disk, the TAP; nothing of the jailer's
    targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert not any(t.startswith("/run/netns") or "jails" in t and t.endswith("pyvmm.pid")
                   for t in targets)


def test_the_vmm_runs_unprivileged_in_its_namespaces(jailed):
    status = _status(jailed["pid"])
    assert status["Uid"].split() == [str(UID)] * 4
    assert status["Gid"].split() == [str(GID)] * 4
    assert status["Groups"] == ""
    assert status["NoNewPrivs"] == "1"
    assert status["CapEff"] == "0000000000000000"
    assert status["NSpid"].split()[-1] == "1"              # PID 1 of its own namespace
    for ns in ("mnt", "pid_for_children", "net"):
        assert os.readlink(f"/proc/{jailed['pid']}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
    limits = open(f"/proc/{jailed['pid']}/limits").read()
    assert "Max open files            1024                 1024" in limits
    assert f"Max file size             {2 << 30}" in limits


def test_the_vmm_sits_in_its_cgroups(jailed):
    want = f"/{jailed['parent']}/{jailed['id']}"
    lines = dict(line.strip().split(":", 2)[1:] for line in open(f"/proc/{jailed['pid']}/cgroup"))
    assert lines["memory"] == want and lines["pids"] == want and lines["cpu"] == want
    memory = f"/sys/fs/cgroup/memory{want}"
    assert int(open(f"{memory}/memory.limit_in_bytes").read()) == 1 << 30
    assert open(f"/sys/fs/cgroup/pids{want}/pids.max").read().strip() == "64"
    assert open(f"/sys/fs/cgroup/cpu{want}/cpu.cfs_quota_us").read().strip() == "-1"
    assert int(open(f"{memory}/memory.usage_in_bytes").read()) > 16 << 20   # the VM's RAM


def test_the_api_socket_is_reachable_from_outside(jailed):
    import json
    import socket
    path = os.path.join(jailed["base"], "pyvmm", jailed["id"], "root", "api.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["id"] == jailed["id"] and body["state"] == "Running"


def test_the_nic_on_the_uids_tap_carries_ping(jailed):
    proc = jailed["proc"]
    run_in_shell(proc, f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up")
    out = run_in_shell(proc, f"ping -c 3 -W 5 {HOST_IP}", timeout=120)
    assert " 0% packet loss" in out, out
    done = subprocess.run(["ip", "netns", "exec", jailed["netns"], "ping", "-c", "2", "-W", "5",
                           GUEST_IP], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_disk_written_in_the_guest_is_read_on_the_host_and_the_vm_ends_cleanly(jailed):
    proc = jailed["proc"]
    (jailed["disk"].parent / "pattern").write_bytes(PATTERN)
    # The 4 KiB pattern is built by doubling a shell variable: no process per piece (CI
    # once ran out of 120 s with 64 `cat`s, each fork costing ring-0 emulation on PVM).
    run_in_shell(proc, f"p='{PATTERN[:64].decode()}'; for i in 1 2 3 4 5 6; do p=$p$p; done; "
                       "printf '%s' \"$p\" > /tmp/pat && "
                       "dd if=/tmp/pat of=/dev/vda bs=4096 seek=1 conv=fsync 2>/dev/null && sync",
                 timeout=240)
    proc.write("exit\n")                                      # the guest reboots: the VM ends
    assert proc.wait(120) == 0, proc.stderr()
    data = jailed["disk"].read_bytes()
    assert data[4096:8192] == PATTERN
    cgroup = f"/sys/fs/cgroup/memory/{jailed['parent']}/{jailed['id']}"
    assert not os.path.exists(cgroup)                         # the jailer removed it
    assert not os.path.exists(os.path.join(jailed["base"], "pyvmm", jailed["id"], "pyvmm.pid"))


def test_a_memory_limit_below_the_vms_needs_fails_the_vm_cleanly(guest, base, parent_cgroup):
    """Guest RAM is charged to the jail's cgroup as the guest touches it: loading the
    kernel and initramfs into a 256 MiB VM with 48 MiB allowed gets the VMM OOM-killed
    inside the jail, with one clear line, and nothing else is touched."""
    jail_id = f"oom-{uuid.uuid4().hex[:8]}"
    argv = pyvmm_command() + [
        "jail", "--id", jail_id, "--uid", str(UID), "--gid", str(GID),
        "--chroot-base-dir", base, "--parent-cgroup", parent_cgroup,
        "--cgroup", "memory.max=48M", "--", "run", "--mem", "256",
        "--cmdline", "pyvmm.cmd=\"dd if=/dev/zero of=/dev/shm/fill bs=1M count=200\"", *EXTRA]
    with Process(argv) as proc:
        code = proc.wait(900)
        err = proc.stderr()
    assert code == 128 + 9, err
    assert "out of memory in its cgroup (memory.limit_in_bytes=48M)" in err, err
    assert not os.path.exists(f"/sys/fs/cgroup/memory/{parent_cgroup}/{jail_id}")
    assert os.getpid() and open("/proc/self/status").read()     # we are fine

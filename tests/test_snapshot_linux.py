"""Snapshots of the real guest: taken in this process, restored in others and here.

One VM boots (2 vCPUs, a disk, a NIC, entropy, dirty pages tracked), starts a
process that counts into a tmpfs file and onto the disk, and is snapshotted
(Full) and closed.  Every test then restores that snapshot: in a new
`pyvmm run --restore` process, here with a Diff snapshot taken on top, through
a userfaultfd handler in another process, and as ten clones at once.  Each
restored VM gets its own copy of the disk (a clone must never write the
snapshot's image), so the snapshot stays valid for the next test.
"""
from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm.snapshot import merge
from pyvmm.snapshot.clones import copy_image, memory_usage, start_clones
from tests.framework.api import firecracker_python_api
from tests.framework.microvm import run_in_shell
from tests.framework.netns import GUEST_IP, HOST_IP, NetNamespace
from tests.framework.process import Process, pyvmm_command

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

MAC = "06:00:ac:1e:00:02"
DISK_MARK = "SNAPDISK-4242"
CLONES = 10
# The counter: a tmpfs file every 0.3 s, and every 5th value onto sector 8 of the disk.
COUNTER = ("(i=0; while :; do i=$((i+1)); echo $i > /tmp/count; "
           "if [ $((i % 5)) = 0 ]; then echo C$i | dd of=/dev/vda bs=512 seek=8 "
           "conv=sync,fsync 2>/dev/null; fi; sleep 0.3; done) >/dev/null 2>&1 &")


@pytest.fixture(scope="module")
def snapshot(guest, netns, tmp_path_factory, module_microvm_factory):
    """The Full snapshot of the counting guest: {state, mem, disk, count, dir}."""
    d = tmp_path_factory.mktemp("snapshot")
    disk = d / "data.img"
    disk.write_bytes(bytes(1 << 20))
    vm = module_microvm_factory.boot(
        vcpus=2, mem_mib=256, rng=True, track_dirty_pages=True,
        drives=[{"drive_id": "data", "path_on_host": str(disk), "is_root_device": False,
                 "is_read_only": False}],
        nets=[{"iface_id": "eth0", "host_dev_name": netns.tap, "guest_mac": MAC}],
        netns=netns)
    # One program per command: each is safe to run again (sh()).
    sh(vm, "dmesg -n 1")
    sh(vm, f"ip addr add {GUEST_IP}/24 dev eth0 2>/dev/null; true")
    sh(vm, "ip link set eth0 up")
    sh(vm, f"echo {DISK_MARK} | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null")
    vm.serial.write(COUNTER + "\n")
    deadline = time.monotonic() + 600
    while int(run_in_shell(vm, "c=0; [ -e /tmp/count ] && read c < /tmp/count; echo $c")
              .strip() or 0) < 3:
        assert time.monotonic() < deadline, "the guest's counter did not start"
        time.sleep(1)
    count = counter(vm)
    vm.pause()
    state, mem = d / "vm.state", d / "vm.mem"
    result = vm.snapshot(state, mem)
    assert result.snapshot_type == "Full" and mem.stat().st_size == 256 << 20
    vm.close()                  # the VMM that took it is gone before any restore
    info = subprocess.run(pyvmm_command() + ["snapshot", "info", str(state)],
                          capture_output=True, text=True)
    assert info.returncode == 0 and "vCPUs:       2" in info.stdout, info
    return {"state": state, "mem": mem, "disk": disk, "dir": d, "count": count}


# A guest program that segfaults fails the test.  (On KVM PVM hosts, programs used to
# segfault at their first TLS read now and then: glibc's AVX routines, whose register
# state a noxsave guest kernel does not switch; pyvmm.pvm.GLIBC_NO_AVX keeps glibc off
# AVX there.  This used to run such commands again.)
SEGFAULT = "Segmentation fault"


def sh(vm, command: str, timeout: float = 120) -> str:
    out = run_in_shell(vm, command, timeout)
    assert SEGFAULT not in out, f"{command!r} segfaulted in the guest: {out}"
    return out


def counter(vm) -> int:
    # The guest's loop rewrites the file (truncate, then write): a read between the two
    # finds it empty, so read again (the count only grows).
    for _ in range(20):
        text = run_in_shell(vm, "read c < /tmp/count; echo $c").strip()
        if text:
            return int(text)
        time.sleep(0.1)
    raise AssertionError("the guest's counter file stayed empty")


def local_interrupts(vm) -> list[int]:
    """Each CPU's local APIC timer interrupts (the LOC line of /proc/interrupts)."""
    line = run_in_shell(vm, "while read -r l; do case $l in LOC:*) echo $l;; esac; done "
                            "< /proc/interrupts")
    return [int(x) for x in line.split()[1:3]]


def test_restored_in_a_new_process_it_runs_on(snapshot, netns, tmp_path):
    """`pyvmm run --restore` in a fresh process: the counter goes on, sleep sleeps,
    timers tick on both vCPUs without soft lockups, the disk and NIC work."""
    disk = tmp_path / "data.img"
    copy_image(str(snapshot["disk"]), str(disk))
    started = time.monotonic()
    proc = Process(netns.wrap(pyvmm_command() + [
        "run", "--restore", str(snapshot["dir"]), "--disk-override", f"data={disk}"]))
    try:
        first = counter(proc)
        restored_in = time.monotonic() - started
        before = local_interrupts(proc)
        t = time.monotonic()
        sh(proc, "sleep 1")
        slept = time.monotonic() - t
        time.sleep(2)
        second = counter(proc)
        after = local_interrupts(proc)
        lockups = sh(proc, "dmesg | grep -c -i -e 'soft lockup' -e 'rcu.*stall' "
                                     "-e 'hung task'; true").strip()
        mark = sh(proc, "head -c 13 /dev/vda")
        ping = netns.run("ping", "-c", "2", "-W", "10", GUEST_IP, capture_output=True,
                         text=True)
    finally:
        proc.kill()
    print(f"restore to a shell answer: {restored_in:.2f} s; sleep 1 took {slept:.2f} s; "
          f"count {first} -> {second}; LOC {before} -> {after}")
    assert second > first >= snapshot["count"]
    assert 0.9 <= slept < 30, f"sleep 1 took {slept:.2f} s after the restore"
    assert all(b > a for a, b in zip(before, after)), (before, after)
    assert lockups == "0", lockups
    assert mark.strip() == DISK_MARK
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # What the restored guest wrote is on its disk, read back on the host.
    data = disk.read_bytes()
    assert data.startswith(DISK_MARK.encode())
    written = re.match(rb"C(\d+)\n", data[8 * 512:8 * 512 + 16])
    assert written and int(written.group(1)) >= 5


def test_a_diff_on_its_base_is_the_full_snapshot(snapshot, netns, tmp_path,
                                                  microvm_factory):
    """Restore, change known pages, then a Diff and a Full snapshot at the same moment:
    the Diff merged onto the base memory file is the Full one's, byte for byte."""
    disk = tmp_path / "data.img"
    copy_image(str(snapshot["disk"]), str(disk))
    vm = microvm_factory.restore(snapshot["state"], snapshot["mem"], netns=netns,
                                 track_dirty_pages=True, drive_overrides={"data": str(disk)})
    # Pages the guest writes (KVM's dirty log), and pages virtio-blk writes for it
    # (the page cache refilled from the disk: only our device tracking sees those).
    sh(vm, "dd if=/dev/urandom of=/tmp/blob bs=4096 count=64 2>/dev/null; "
                     "echo 3 > /proc/sys/vm/drop_caches; md5sum /tmp/blob /dev/vda")
    vm.pause()
    diff = vm.snapshot(tmp_path / "diff.state", tmp_path / "diff.mem", "Diff")
    full = vm.snapshot(tmp_path / "full.state", tmp_path / "full.mem", "Full")
    print(f"Diff: {diff.memory_bytes_written >> 10} KiB in {diff.seconds * 1e3:.0f} ms; "
          f"Full: {full.memory_bytes_written >> 10} KiB in {full.seconds * 1e3:.0f} ms")
    assert 64 * 4096 <= diff.memory_bytes_written < full.memory_bytes_written
    merged = tmp_path / "merged.mem"
    copy_image(str(snapshot["mem"]), str(merged))
    merge(merged, tmp_path / "diff.state", tmp_path / "diff.mem")
    assert _same_file(merged, tmp_path / "full.mem")


def test_the_guest_clock_stays_put_or_catches_up(snapshot, netns, tmp_path,
                                                 microvm_factory):
    """The guest's clocksource is the TSC (kvmclock too, before it switches).  On hardware
    KVM both are restored as they were at the pause, so the guest's wall clock is
    behind by the time the snapshot sat on disk; with clock_realtime both move on by
    that time and it is right again.  On KVM PVM the guest TSC is the host's (a write
    to it is dropped): the guest's clock catches up by itself, either way."""
    import json
    from pyvmm.snapshot.format import read_state_file
    taken = read_state_file(snapshot["state"])["created_unix_ns"] / 1e9
    time.sleep(max(0.0, taken + 20 - time.time()))
    lags, pvm = {}, False
    for realtime in (False, True):
        disk = tmp_path / f"data-{realtime}.img"
        copy_image(str(snapshot["disk"]), str(disk))
        vm = microvm_factory.restore(snapshot["state"], snapshot["mem"], netns=netns,
                                     clock_realtime=realtime,
                                     drive_overrides={"data": str(disk)})
        guest = int(sh(vm, "date +%s").strip())
        lags[realtime] = time.time() - guest
        pvm = vm.pvm
        vm.close()
    print(f"guest wall clock behind the host by {json.dumps(lags)} s "
          f"({time.time() - taken:.0f} s after the snapshot)")
    assert abs(lags[False]) < 10 if pvm else lags[False] >= 15
    assert abs(lags[True]) < 10


def _same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def test_ten_clones_run_at_once_and_diverge(snapshot, tmp_path):
    """Ten clones of one snapshot, each in a network namespace of its own with the
    same TAP name and addresses (Firecracker's network for clones), each with its
    own copy of the disk: each keeps its own id and answers on its own network."""
    namespaces = [NetNamespace(f"pyvmm-clone-{i}-{id(tmp_path) % 10000}") for i in range(CLONES)]
    clones = []
    try:
        clones = start_clones(snapshot["state"], snapshot["mem"], CLONES, tmp_path,
                              enter=lambda i: namespaces[i].entered())
        with concurrent.futures.ThreadPoolExecutor(CLONES) as pool:
            ids = list(pool.map(lambda c: run_in_shell(
                c.vm, f"echo clone-{c.index} > /tmp/id; read x < /tmp/id; echo $x",
                timeout=900).strip(), clones))
        assert ids == [f"clone-{i}" for i in range(CLONES)]
        for ns in namespaces:
            ping = ns.run("ping", "-c", "1", "-W", "20", GUEST_IP, capture_output=True,
                          text=True)
            assert ping.returncode == 0, (ns.name, ping.stdout)
        usage = [memory_usage(c.vm) for c in clones]
        for c, u in zip(clones, usage):
            print(f"clone {c.index}: started in {c.start_seconds * 1e3:.0f} ms, disk "
                  f"{c.disk_copy}, RSS {u['rss'] >> 20} MiB, PSS {u['pss'] >> 20} MiB, "
                  f"shared {u['shared'] >> 20} MiB, private {u['private'] >> 20} MiB")
        assert all(u["shared"] > 0 for u in usage)      # the snapshot's pages are shared
        assert len({c.disks["data"] for c in clones}) == CLONES
    finally:
        for c in clones:
            c.vm.close()
        for ns in namespaces:
            ns.delete()


def test_uffd_backend_restores_through_a_handler_process(snapshot, netns, tmp_path,
                                                          microvm_factory):
    """Guest memory served by pyvmm's example page-fault handler, in a process of its
    own, over Firecracker's Uffd handshake."""
    socket_path = tmp_path / "uffd.sock"
    handler = subprocess.Popen([sys.executable, "-m", "pyvmm.snapshot.uffd_handler",
                                str(socket_path), str(snapshot["mem"])],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    vm = None
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert handler.poll() is None and time.monotonic() < deadline, \
                handler.stdout.read() if handler.poll() is not None else "no socket"
            time.sleep(0.05)
        disk = tmp_path / "data.img"
        copy_image(str(snapshot["disk"]), str(disk))
        vm = microvm_factory.restore(snapshot["state"], str(socket_path), netns=netns,
                                     backend_type="Uffd", drive_overrides={"data": str(disk)})
        first = counter(vm)
        time.sleep(2)
        assert counter(vm) > first >= 3
    finally:
        # The VM first: with its page-fault handler gone, its vCPUs would wait on
        # userfaults for ever and its TAP would stay busy for the next test.
        if vm is not None:
            vm.close()
        handler.kill()
        handler.wait()


# Last in the module: the API cannot point the restored drive at a copy (Firecracker
# has no drive override either), so this VM writes the snapshot's own disk image.
def test_a_third_party_firecracker_client_loads_and_creates_unchanged(snapshot, netns,
                                                                       tmp_path):
    """firecracker-python's calls, as it makes them (enable_diff_snapshots, mem_backend,
    resume_vm, network_overrides; then pause and create), against `pyvmm api`."""
    fc = firecracker_python_api()
    sock = tmp_path / "fc.sock"
    proc = Process(netns.wrap(pyvmm_command() + ["api", "--api-sock", str(sock)]))
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert time.monotonic() < deadline and proc.proc.poll() is None, proc.stderr()
            time.sleep(0.05)
        api = fc.Api(str(sock))
        api.load_snapshot.put(enable_diff_snapshots=True,
                              mem_backend={"backend_type": "File",
                                           "backend_path": str(snapshot["mem"])},
                              snapshot_path=str(snapshot["state"]), resume_vm=True,
                              network_overrides=[{"iface_id": "eth0",
                                                  "host_dev_name": netns.tap}])
        assert api.describe.get().json()["state"] == "Running"
        assert counter(proc) >= snapshot["count"]
        api.vm.patch(state="Paused")
        api.create_snapshot.put(mem_file_path=str(tmp_path / "again.mem"),
                                snapshot_path=str(tmp_path / "again.state"))
        api.vm.patch(state="Resumed")
        assert counter(proc) >= snapshot["count"]
        # `pyvmm snapshot create` through the same socket: pauses, saves, resumes.
        created = subprocess.run(pyvmm_command() + ["snapshot", "create", "--api-sock",
                                                    str(sock), str(tmp_path / "cli")],
                                 capture_output=True, text=True)
        assert created.returncode == 0, created.stderr
        assert api.describe.get().json()["state"] == "Running"
        assert (tmp_path / "cli" / "vm.mem").stat().st_size == 256 << 20
        with pytest.raises(fc.APIError, match="not supported after starting"):
            api.load_snapshot.put(snapshot_path=str(snapshot["state"]),
                                  mem_file_path=str(snapshot["mem"]))
    finally:
        proc.kill()
    info = subprocess.run(pyvmm_command() + ["snapshot", "info", str(tmp_path / "again.state")],
                          capture_output=True, text=True)
    assert info.returncode == 0 and "vCPUs:       2" in info.stdout, info.stdout + info.stderr

"""`pyvmm jail` without a guest: its flags, the cgroup file mapping, the mount plan and
the VM file placement as data; then (as root, with KVM) jailed `pyvmm api` processes,
which start in a second and need no boot."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from hypothesis import given, strategies as st

from pyvmm.jail import cgroups as cg
from pyvmm.jail import mounts, placement
from pyvmm.jail.jailer import (JailError, JailSpec, interpreter_argv, parse_resource_limit,
                               validate_id, vmm_args)
from pyvmm.cli_jail import split_argv

ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"


# -- the id and the flags ---------------------------------------------------------------------

@given(st.text(alphabet=ID_CHARS, min_size=1, max_size=64))
def test_ids_of_letters_digits_and_hyphens_up_to_64_are_taken(jail_id):
    assert validate_id(jail_id) == jail_id


@given(st.text(min_size=0, max_size=80))
def test_any_other_id_is_refused(jail_id):
    ok = 1 <= len(jail_id) <= 64 and all(c in ID_CHARS for c in jail_id)
    if ok:
        assert validate_id(jail_id) == jail_id
    else:
        with pytest.raises(JailError):
            validate_id(jail_id)


@pytest.mark.parametrize("bad", ["../x", "a/b", "a" * 65, "", "a b", "ü", "a\n"])
def test_ids_that_could_escape_the_base_dir_are_refused(bad):
    with pytest.raises(JailError):
        JailSpec(bad, 4000, 4000, ["run"])


@given(st.sampled_from(["fsize", "no-file"]), st.integers(min_value=0, max_value=2**62))
def test_resource_limits_parse(name, value):
    assert parse_resource_limit(f"{name}={value}") == (name, value)


def test_file_sizes_take_suffixes():
    assert parse_resource_limit("fsize=2G") == ("fsize", 2 << 30)
    assert parse_resource_limit("fsize=512m") == ("fsize", 512 << 20)


@pytest.mark.parametrize("bad", ["fsize", "fsize=", "nofile=3", "no-file=-1", "fsize=1T",
                                 "no-file=1K", "fsize=1.5G", "cpu=4"])
def test_bad_resource_limits_are_refused(bad):
    with pytest.raises(JailError):
        parse_resource_limit(bad)


def test_the_pyvmm_arguments_come_after_the_double_dash():
    assert split_argv(["--id", "a", "--", "run", "--", "x"]) == (["--id", "a"],
                                                                 ["run", "--", "x"])
    assert split_argv(["--id", "a"]) == (["--id", "a"], [])


def test_run_and_api_get_the_jail_id_unless_they_have_one():
    spec = JailSpec("vm-1", 4000, 4000, ["run"])
    assert vmm_args(spec, ["run", "--mem", "64"]) == ["run", "--id", "vm-1", "--mem", "64"]
    assert vmm_args(spec, ["api", "--id=x"]) == ["api", "--id=x"]
    assert vmm_args(spec, ["snapshot", "info", "f"]) == ["snapshot", "info", "f"]


def test_the_interpreter_runs_isolated_without_site_and_bytecode_writes():
    argv = interpreter_argv(["run"])
    assert argv[0] == os.path.realpath(sys.executable)
    assert argv[1:5] == ["-I", "-S", "-B", "-c"]
    assert argv[-1] == "run" and "from pyvmm.cli import main" in argv[5]


def test_an_fsize_below_the_vms_memory_is_refused_before_anything_runs(tmp_path):
    from pyvmm.jail.jailer import _check_fsize
    spec = JailSpec("a", 1, 1, ["run", "--mem", "512M"], rlimits={"fsize": 256 << 20})
    with pytest.raises(JailError, match="memfd"):
        _check_fsize(spec)
    _check_fsize(JailSpec("a", 1, 1, ["run", "--mem=128"], rlimits={"fsize": 256 << 20}))


def test_the_cli_reports_errors_in_one_line():
    done = subprocess.run([sys.executable, "-m", "pyvmm", "jail", "--id", "x/y", "--uid", "1",
                           "--gid", "1", "--", "run"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "bad --id" in done.stderr
    done = subprocess.run([sys.executable, "-m", "pyvmm", "jail", "--id", "x", "--uid", "1",
                           "--gid", "1"], capture_output=True, text=True)
    assert done.returncode == 2 and "arguments" in done.stderr


# -- cgroups ----------------------------------------------------------------------------------

def test_v2_names_map_to_v1_files():
    plan = cg.plan(["memory.max=512M", "pids.max=64", "cpu.max=50000 100000",
                    "io.max=8:0 rbps=1048576 wiops=max", "cpu.weight=100",
                    "cpuset.cpus=0"], 1, "pyvmm", "vm")
    assert plan.writes == [
        cg.Write("memory", "memory.limit_in_bytes", "512M"),
        cg.Write("pids", "pids.max", "64"),
        cg.Write("cpu", "cpu.cfs_period_us", "100000"),
        cg.Write("cpu", "cpu.cfs_quota_us", "50000"),
        cg.Write("blkio", "blkio.throttle.read_bps_device", "8:0 1048576"),
        cg.Write("blkio", "blkio.throttle.write_iops_device", "8:0 0"),
        cg.Write("cpu", "cpu.shares", "1024"),
        cg.Write("cpuset", "cpuset.cpus", "0")]
    assert plan.controllers == ["memory", "pids", "cpu", "blkio", "cpuset"]
    assert plan.relative_dir() == "pyvmm/vm"


def test_max_means_no_limit_on_v1():
    plan = cg.plan(["memory.max=max", "cpu.max=max"], 1, "p", "vm")
    assert cg.Write("memory", "memory.limit_in_bytes", "-1") in plan.writes
    assert cg.Write("cpu", "cpu.cfs_quota_us", "-1") in plan.writes
    assert cg.Write("cpu", "cpu.cfs_period_us", "100000") in plan.writes


def test_v2_writes_the_names_as_given():
    plan = cg.plan(["memory.max=1G", "io.max=8:0 wbps=1"], 2, "a/b", "vm")
    assert plan.writes == [cg.Write("memory", "memory.max", "1G"),
                           cg.Write("io", "io.max", "8:0 wbps=1")]
    assert plan.relative_dir() == "a/b/vm"


@given(st.integers(min_value=1, max_value=10000))
def test_cpu_weight_maps_onto_shares_proportionally(weight):
    (write,) = cg.plan([f"cpu.weight={weight}"], 1, "p", "v").writes
    assert write.file == "cpu.shares" and int(write.value) == max(2, weight * 1024 // 100)


@pytest.mark.parametrize("bad", ["memory.max", "=1", "memory=1", "../memory.max=1",
                                 "cpu.max=a b", "cpu.max=1 2 3", "io.max=8:0",
                                 "io.max=sda rbps=1", "io.max=8:0 xbps=1", "cpu.weight=0",
                                 "memory.max=1\n2"])
def test_bad_cgroup_assignments_are_refused(bad):
    with pytest.raises(cg.CgroupError):
        cg.plan([bad], 1, "pyvmm", "vm")


@pytest.mark.parametrize("bad", ["", "/", "..", "a/../b", "a//b", "a b"])
def test_bad_parent_cgroups_are_refused(bad):
    with pytest.raises(cg.CgroupError):
        cg.plan([], 1, bad, "vm")


def test_hierarchies_are_found_in_proc_mounts():
    text = ("cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0\n"
            "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n"
            "cgroup /sys/fs/cgroup/systemd cgroup rw,name=systemd 0 0\n"
            "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    v1, v2 = cg.mounts(text)
    assert v1 == {"cpu": "/sys/fs/cgroup/cpu,cpuacct", "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
                  "nosuid": "/sys/fs/cgroup/cpu,cpuacct", "memory": "/sys/fs/cgroup/memory"}
    assert v2 == "/sys/fs/cgroup/unified"
    groups = cg.Cgroups(cg.plan(["memory.max=1G", "cpu.max=max"], 1, "pyvmm", "vm"))
    assert groups.locate(text) == {
        "memory": __import__("pathlib").Path("/sys/fs/cgroup/memory/pyvmm/vm"),
        "cpu": __import__("pathlib").Path("/sys/fs/cgroup/cpu,cpuacct/pyvmm/vm")}
    with pytest.raises(cg.CgroupError, match="pids controller is not mounted"):
        cg.Cgroups(cg.plan(["pids.max=1"], 1, "p", "v")).locate(text)


# -- the mount plan ---------------------------------------------------------------------------

def _fake(links: dict[str, str], dirs: set[str]):
    """A resolver and is_dir over a made-up host."""
    def resolve(path):
        chain, parts, current = [], [p for p in path.split("/") if p][::-1], "/"
        while parts:
            candidate = os.path.join(current, parts.pop())
            if candidate in links:
                chain.append((candidate, links[candidate]))
                target = links[candidate]
                current = "/" if target.startswith("/") else current
                parts.extend([p for p in target.split("/") if p][::-1])
            else:
                current = candidate
        return chain, current
    return dict(resolve=resolve, is_dir=lambda p: p in dirs)


def test_libraries_behind_symlinked_directories_keep_their_links():
    fake = _fake({"/lib": "usr/lib", "/usr/lib/x86_64-linux-gnu/libz.so.1": "libz.so.1.2.13"},
                 {"/opt/py"})
    plan = mounts.MountPlan()
    plan.add("/opt/py", **fake)
    plan.add("/lib/x86_64-linux-gnu/libz.so.1", **fake)
    plan.add("/lib/x86_64-linux-gnu/libz.so.1", **fake)          # twice: once in the plan
    assert plan.links == [("/lib", "usr/lib"),
                          ("/usr/lib/x86_64-linux-gnu/libz.so.1", "libz.so.1.2.13")]
    assert plan.binds == [mounts.Bind("/opt/py", True, True),
                          mounts.Bind("/usr/lib/x86_64-linux-gnu/libz.so.1.2.13", True, False)]


def test_paths_inside_a_bound_directory_are_not_bound_again():
    fake = _fake({}, {"/opt/py", "/opt/py/lib"})
    plan = mounts.MountPlan()
    plan.add("/opt/py/lib/libpython.so", **fake)
    plan.add("/opt/py", **fake)                 # the directory replaces the file bind
    plan.add("/opt/py/lib", **fake)
    assert plan.binds == [mounts.Bind("/opt/py", True, True)]
    with pytest.raises(mounts.MountError, match="read-only"):
        plan.add("/opt/py/disk.img", read_only=False, **fake)


def test_a_file_wanted_writable_once_is_bound_writable():
    fake = _fake({}, set())
    plan = mounts.MountPlan()
    plan.add("/data/disk.img", **fake)
    plan.add("/data/disk.img", read_only=False, **fake)
    assert plan.binds == [mounts.Bind("/data/disk.img", False, False)]


def test_binds_are_mounted_parents_first():
    plan = mounts.MountPlan(binds=[mounts.Bind("/a/b/c", True, False),
                                   mounts.Bind("/x", True, True)])
    assert [b.path for b in plan.ordered_binds()] == ["/x", "/a/b/c"]


def test_the_real_interpreter_plan_binds_prefix_package_and_libraries_read_only():
    plan = mounts.interpreter_plan(mounts.MountPlan())
    paths = {b.path for b in plan.binds}
    assert os.path.realpath(sys.base_prefix) in paths
    import pyvmm
    package = os.path.realpath(os.path.dirname(pyvmm.__file__))
    assert plan.covered(package)
    assert all(b.read_only for b in plan.binds)
    libc = [p for p in paths if os.path.basename(p).startswith("libc.so")]
    assert libc or plan.covered("/lib/x86_64-linux-gnu/libc.so.6")
    assert not any("libX11" in p or "libtk" in p for p in paths)   # no GUI libraries
    assert not plan.covered("/etc/passwd") and not plan.covered("/home")


def test_only_the_three_devices_are_made():
    misc = "200 tun\n257 userfaultfd\n232 kvm\n1 psaux\n"
    assert mounts.devices(misc) == [mounts.Device("/dev/kvm", 10, 232),
                                    mounts.Device("/dev/net/tun", 10, 200),
                                    mounts.Device("/dev/userfaultfd", 10, 257)]
    assert [d.path for d in mounts.devices("200 tun\n")] == ["/dev/kvm", "/dev/net/tun"]


def test_ldd_output_is_read():
    text = ("\tlinux-vdso.so.1 (0x00007ffd)\n"
            "\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n"
            "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n"
            "\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n"
            "/opt/x.so:\n\tnot a dynamic executable\n"
            "\tlibmissing.so => not found\n")
    assert mounts.parse_ldd(text) == ["/lib/x86_64-linux-gnu/libz.so.1",
                                      "/lib/x86_64-linux-gnu/libc.so.6",
                                      "/lib64/ld-linux-x86-64.so.2"]


def test_host_chain_follows_real_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("x")
    (tmp_path / "dir").symlink_to("real")
    (tmp_path / "real" / "g").symlink_to(tmp_path / "real" / "f")
    links, real = mounts.host_chain(str(tmp_path / "dir" / "g"))
    assert real == str(tmp_path / "real" / "f")
    assert links == [(str(tmp_path / "dir"), "real"),
                     (str(tmp_path / "real" / "g"), str(tmp_path / "real" / "f"))]


# -- the VM's files ---------------------------------------------------------------------------

def test_run_inputs_become_absolute_and_are_listed(tmp_path):
    for name in ("k", "i", "d.img", "ro.img"):
        (tmp_path / name).write_bytes(b"x")
    root = tmp_path / "root"
    root.mkdir()
    out = placement.place(["run", "--kernel", "k", "--initrd=i", "--disk", "d.img,id=a",
                           "--disk", f"{tmp_path}/ro.img,ro,root", "--api-sock", "a.sock"],
                          str(root), cwd=str(tmp_path))
    assert out.args == ["run", "--kernel", f"{tmp_path}/k", f"--initrd={tmp_path}/i",
                        "--disk", f"{tmp_path}/d.img,id=a", "--disk",
                        f"{tmp_path}/ro.img,ro,root", "--api-sock", "a.sock"]
    assert out.files == [(f"{tmp_path}/k", False), (f"{tmp_path}/i", False),
                         (f"{tmp_path}/d.img", True), (f"{tmp_path}/ro.img", False)]


def test_files_placed_in_the_jail_root_are_left_alone(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "vmlinux").write_bytes(b"x")
    out = placement.place(["run", "--kernel", "/vmlinux"], str(root), cwd=str(tmp_path))
    assert out.args == ["run", "--kernel", "/vmlinux"] and out.files == []


def test_without_a_kernel_the_built_in_guest_is_placed(tmp_path):
    out = placement.place(["run", "--mem", "64"], str(tmp_path), cwd=str(tmp_path),
                          default_guest=lambda: ("/g/vmlinux", "/g/initramfs.cpio"))
    assert out.args == ["run", "--kernel", "/g/vmlinux", "--initrd", "/g/initramfs.cpio",
                        "--mem", "64"]
    assert out.files == [("/g/vmlinux", False), ("/g/initramfs.cpio", False)]


def test_a_config_files_inputs_are_placed(tmp_path):
    for name in ("k", "disk"):
        (tmp_path / name).write_bytes(b"x")
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": f"{tmp_path}/k"},
                                  "drives": [{"drive_id": "a", "path_on_host": f"{tmp_path}/disk",
                                              "is_read_only": False, "is_root_device": False}]}))
    out = placement.place(["run", "--config-file", "vm.json"], str(tmp_path / "nowhere"),
                          cwd=str(tmp_path))
    assert out.files == [(str(config), False), (f"{tmp_path}/k", False),
                         (f"{tmp_path}/disk", True)]


def test_a_missing_input_is_an_error_now(tmp_path):
    with pytest.raises(placement.PlacementError, match="no such file"):
        placement.place(["run", "--kernel", "nope"], str(tmp_path), cwd=str(tmp_path))


def test_access_is_checked_for_the_jailed_uid(tmp_path):
    disk = tmp_path / "disk"
    disk.write_bytes(b"x")
    os.chmod(disk, 0o644)
    placement.check_access(str(disk), 4000, 4000, writable=False)
    with pytest.raises(placement.PlacementError, match="chown or chmod"):
        placement.check_access(str(disk), 4000, 4000, writable=True)
    if os.geteuid() == 0:
        os.chown(disk, 4000, 4000)
        placement.check_access(str(disk), 4000, 4000, writable=True)


# -- jailed `pyvmm api` processes (root and KVM; no guest is booted) --------------------------

def _root_or_skip():
    if os.geteuid() != 0:
        if os.environ.get("PYVMM_REQUIRE_KVM") == "1":
            pytest.fail("the jail tests need root")
        pytest.skip("the jail tests need root")


@pytest.fixture
def jail_env(tmp_path):
    _root_or_skip()
    os.chmod(tmp_path, 0o755)
    parent = f"pyvmm-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    yield str(tmp_path), parent
    for controller in ("memory", "pids"):
        path = f"/sys/fs/cgroup/{controller}/{parent}"
        if os.path.isdir(path):
            os.rmdir(path)


def _start_api(base, parent, *flags, jail_id="api"):
    argv = [sys.executable, "-m", "pyvmm", "jail", "--id", jail_id, "--uid", "4322",
            "--gid", "4322", "--chroot-base-dir", base, "--parent-cgroup", parent,
            "--cgroup", "pids.max=32", *flags, "--", "api", "--api-sock", "api.sock"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(
                                os.path.abspath(__file__))))


def _get(path: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(path)
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            return json.loads(data.split(b"\r\n\r\n", 1)[1])
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.kvm
def test_a_jailed_api_answers_and_its_traces_go_when_it_ends(jail_env):
    base, parent = jail_env
    proc = _start_api(base, parent, "--new-pid-ns")
    try:
        root = f"{base}/pyvmm/api/root"
        assert _get(f"{root}/api.sock") == {"id": "api", "state": "Not started",
                                            "vmm_version": _get(f"{root}/api.sock")["vmm_version"],
                                            "app_name": "pyvmm"}
        pid = int(open(f"{base}/pyvmm/api/pyvmm.pid").read())
        status = open(f"/proc/{pid}/status").read()
        assert "NoNewPrivs:\t1" in status and "Uid:\t4322\t4322\t4322\t4322" in status
        assert "NSpid:" in status and status.split("NSpid:")[1].split("\n")[0].split()[-1] == "1"
        assert f"pids:/{parent}/api" in open(f"/proc/{pid}/cgroup").read()
        assert os.listdir(f"/proc/{pid}/root/proc") == ["1"] or set(
            os.listdir(f"/proc/{pid}/root/proc")) <= {"1", "self", "thread-self"}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), err
    assert not os.path.exists(f"/sys/fs/cgroup/pids/{parent}/api")
    assert not os.path.exists(f"{base}/pyvmm/api/pyvmm.pid")


@pytest.mark.kvm
def test_a_vmm_that_ignores_sigterm_is_killed_after_the_grace_time(jail_env):
    """A stopped VMM cannot act on the SIGTERM the jailer forwards: the jailer's
    deadline (KILL_AFTER_TERM) must still fire, although nothing else wakes it."""
    from pyvmm.jail.jailer import KILL_AFTER_TERM
    base, parent = jail_env
    proc = _start_api(base, parent, "--new-pid-ns", jail_id="stuck")
    try:
        assert _get(f"{base}/pyvmm/stuck/root/api.sock")["id"] == "stuck"
        pid = int(open(f"{base}/pyvmm/stuck/pyvmm.pid").read())
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=KILL_AFTER_TERM + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGKILL, err
    assert KILL_AFTER_TERM - 1 <= time.monotonic() - started < KILL_AFTER_TERM + 20
    assert not os.path.exists(f"/sys/fs/cgroup/pids/{parent}/stuck")


@pytest.mark.kvm
def test_daemonize_returns_once_the_vmm_runs(jail_env):
    base, parent = jail_env
    proc = _start_api(base, parent, "--daemonize", jail_id="d-1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    pid = int(open(f"{base}/pyvmm/d-1/pyvmm.pid").read())
    try:
        assert _get(f"{base}/pyvmm/d-1/root/api.sock")["id"] == "d-1"
        assert os.getsid(pid) != os.getsid(0)
        assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
    finally:
        supervisor = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while os.path.exists(f"/sys/fs/cgroup/pids/{parent}/d-1") and \
                time.monotonic() < deadline:
            time.sleep(0.1)
    assert not os.path.exists(f"/sys/fs/cgroup/pids/{parent}/d-1")


@pytest.mark.kvm
def test_a_setup_failure_is_one_line_and_leaves_no_cgroup(jail_env):
    base, parent = jail_env
    proc = _start_api(base, parent, "--netns", "/nonexistent/netns", jail_id="bad")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--netns /nonexistent/netns" in err.decode()
    assert not os.path.exists(f"/sys/fs/cgroup/pids/{parent}/bad")


@pytest.mark.kvm
def test_cgroup_v2_places_the_vmm_in_the_unified_hierarchy(jail_env):
    base, parent = jail_env
    v1, v2 = cg.mounts()
    mounted_here = None
    if v2 is None:           # a cgroup v1 host: the unified hierarchy exists, just unmounted
        mounted_here = tempfile.mkdtemp(prefix="pyvmm-cgroup2-")
        subprocess.run(["mount", "-t", "cgroup2", "none", mounted_here], check=True)
        v1, v2 = cg.mounts()
        assert v2 == mounted_here
    try:
        _run_in_cgroup_v2(base, parent, v2)
    finally:
        if mounted_here:
            subprocess.run(["umount", mounted_here], check=False)
            os.rmdir(mounted_here)


def _run_in_cgroup_v2(base: str, parent: str, v2: str) -> None:
    argv = [sys.executable, "-m", "pyvmm", "jail", "--id", "v2", "--uid", "4322", "--gid",
            "4322", "--chroot-base-dir", base, "--parent-cgroup", parent,
            "--cgroup-version", "2", "--cgroup", "cgroup.max.depth=0",
            "--", "api", "--api-sock", "api.sock"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert _get(f"{base}/pyvmm/v2/root/api.sock")["id"] == "v2"
        pid = int(open(f"{base}/pyvmm/v2/pyvmm.pid").read())
        assert f"0::/{parent}/v2\n" in open(f"/proc/{pid}/cgroup").read()
        assert open(f"{v2}/{parent}/v2/cgroup.max.depth").read().strip() == "0"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert not os.path.exists(f"{v2}/{parent}/v2")
    os.rmdir(f"{v2}/{parent}")

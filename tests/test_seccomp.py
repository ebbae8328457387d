"""seccomp: the filter file format (pyvmm.seccomp) and the filters themselves, each
tried in a child process, since a filter stays on its thread and a violation ends
the whole process with the SIGSYS line (csrc/seccomp.c)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm import seccomp
from pyvmm.seccomp import SeccompError

ROOT = Path(__file__).resolve().parent.parent
EXIT_SIGSYS = 159
DEFAULT = json.loads(seccomp.DEFAULT_FILTER.read_text())


def default_copy() -> dict:
    return json.loads(json.dumps(DEFAULT))


# -- the filter file ------------------------------------------------------------------

def test_default_filter_parses_with_a_filter_for_every_thread():
    policy = seccomp.load()
    assert set(policy.threads) == set(seccomp.THREAD_KINDS)
    vcpu = policy.threads["vcpu"]
    assert "KVM_RUN" in vcpu.ioctls and "KVM_CREATE_VM" not in vcpu.ioctls
    for kind, entry in policy.threads.items():
        for banned in ("execve", "execveat", "fork", "vfork", "ptrace", "mount", "ioctl",
                       "socket", "kexec_load", "init_module", "bpf"):
            assert banned not in entry.syscalls, (kind, banned)
        assert policy.compiled(kind)[1] > 0


def test_only_the_api_and_main_threads_may_open_for_writing_or_create_vms():
    policy = seccomp.load()
    for kind, entry in policy.threads.items():
        if kind in ("api", "main"):
            assert entry.open == "any" and "KVM_CREATE_VM" in entry.ioctls
        else:
            assert entry.open in (None, "read-only")
            assert "KVM_CREATE_VM" not in entry.ioctls
            assert not set(entry.ioctls) & {"TUNSETIFF", "USERFAULTFD_IOC_NEW"}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["threads"].pop("io"), "no filter for the 'io' thread"),
    (lambda d: d["threads"].update(gpu={}), "unknown thread 'gpu'"),
    (lambda d: d["threads"]["io"].update(syscalls={"no_such_call": "x"}),
     "no system call named 'no_such_call'"),
    (lambda d: d["threads"]["io"].update(syscalls={"ioctl": "x"}),
     "ioctl is allowed only through \"ioctl\""),
    (lambda d: d["threads"]["io"].update(syscalls={"socket": "x"}), "only through \"socket\""),
    (lambda d: d["threads"]["io"].update(ioctl={"KVM_FLY": ""}), "unknown ioctl 'KVM_FLY'"),
    (lambda d: d["threads"]["io"].update(ioctl={"0x1ffffffff": ""}), "out of range"),
    (lambda d: d["threads"]["io"].update(socket=["AF_PACKET"]), "\"socket\" must be a list"),
    (lambda d: d["threads"]["io"].update(open="write"), "\"open\" must be one of"),
    (lambda d: d["threads"]["io"].update(include=["nope"]), "unknown group 'nope'"),
    (lambda d: d["threads"]["io"].update(color="red"), "unknown key 'color'"),
    (lambda d: d.update(extra=1), "unknown key 'extra'"),
])
def test_bad_filters_are_one_line_errors(change, message):
    data = default_copy()
    change(data)
    with pytest.raises(SeccompError) as info:
        seccomp.parse(data, "f.json")
    text = str(info.value)
    assert message in text and text.startswith("seccomp filter f.json: ") and "\n" not in text


def test_ioctl_numbers_are_accepted(tmp_path):
    data = default_copy()
    data["threads"]["io"]["ioctl"] = {"0x5401": "TCGETS by number"}
    assert seccomp.parse(data).threads["io"].ioctls["0x5401"] == 0x5401


def test_load_reports_unreadable_and_non_json_files(tmp_path):
    with pytest.raises(SeccompError, match="cannot read it"):
        seccomp.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SeccompError, match="not valid JSON"):
        seccomp.load(tmp_path / "bad.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe")
    with pytest.raises(SeccompError, match="not UTF-8"):
        seccomp.load(tmp_path / "bin.json")


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) |
                    st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
def test_arbitrary_json_is_a_policy_or_a_seccomp_error(data):
    try:
        seccomp.parse(data)
    except SeccompError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(seccomp.THREAD_KINDS),
       st.sampled_from(["syscalls", "ioctl", "socket", "open", "include"]), JSON)
def test_a_default_filter_with_one_entry_mangled_is_a_policy_or_a_seccomp_error(kind, key,
                                                                              value):
    data = default_copy()
    data["threads"][kind][key] = value
    try:
        seccomp.parse(data)
    except SeccompError as exc:
        assert "\n" not in str(exc)


# -- the filters, in child processes ------------------------------------------------------

def child(code: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop(seccomp.DEV_ENV, None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_killed(result: subprocess.CompletedProcess, thread: str, call: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.startswith("pyvmm: seccomp:")]
    assert result.returncode == EXIT_SIGSYS, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"pyvmm: seccomp: thread {thread} made a forbidden system call "
                               f"{call} ("), lines[0]
    assert "the VMM is stopped. Run with --no-seccomp" in lines[0]
    assert "done" not in result.stdout


TINY_GUEST = """
    import sys
    from pyvmm import seccomp
    from pyvmm.testbed import Mode, TinyVm, assemble
    with TinyVm(Mode.LONG_RING0) as vm:
        vm.machine.seccomp = seccomp.resolve(sys.argv[1] if len(sys.argv) > 1 else True)
        vm.load(assemble("mov $0x2a, %eax\\n mov $0xf4, %dx\\n out %eax, %dx\\n",
                         Mode.LONG_RING0))
        outcome = vm.run(timeout=30)
        print(outcome.kind.name, vm.exit_value, "done")
"""


@pytest.mark.kvm
def test_a_tiny_guest_runs_under_the_vcpu_filter():
    result = child(TINY_GUEST)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["DEVICE_STOP", "42", "done"]


@pytest.mark.kvm
def test_a_vcpu_thread_making_a_forbidden_call_ends_the_process_with_one_line():
    result = child(TINY_GUEST, {seccomp.DEV_ENV: "forbid:vcpu"})
    assert_killed(result, "vcpu0", seccomp.FORBIDDEN_TEST_CALL)


def test_the_io_thread_making_a_forbidden_call_ends_the_process_with_one_line():
    result = child("""
        import time
        from pyvmm import seccomp
        from pyvmm.devices.iothread import IoThread
        io = IoThread()
        io.seccomp = seccomp.resolve(True)
        io.start()
        time.sleep(5)
        print("done")
    """, {seccomp.DEV_ENV: "forbid:io"})
    assert_killed(result, "io", seccomp.FORBIDDEN_TEST_CALL)


def test_the_io_thread_serves_under_its_filter():
    result = child("""
        import os, threading
        from pyvmm import seccomp
        from pyvmm.devices.iothread import IoThread
        io = IoThread()
        io.seccomp = seccomp.resolve(True)
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        served = threading.Event()
        io.add_eventfd(fd, served.set)
        io.start()
        os.eventfd_write(fd, 1)
        assert served.wait(10)
        assert io.stop()
        print("done", io.error_count)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["done", "0"]


def test_the_api_thread_making_a_forbidden_call_ends_pyvmm_api_with_one_line(tmp_path):
    sock = tmp_path / "api.sock"
    result = subprocess.run([sys.executable, "-m", "pyvmm", "api", "--api-sock", str(sock)],
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 seccomp.DEV_ENV: "forbid:api"},
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert_killed(result, "api", seccomp.FORBIDDEN_TEST_CALL)


def test_pyvmm_api_serves_requests_under_its_filters(tmp_path):
    sock = tmp_path / "api.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "api", "--api-sock", str(sock)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        from pyvmm.api.client import ApiClient
        import time
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        client = ApiClient(str(sock), timeout=30)
        status, body = client.get("/")
        assert status == 200 and body["state"] == "Not started"
        status, _ = client.request("PUT", "/machine-config",
                                   {"vcpu_count": 1, "mem_size_mib": 128})
        assert status == 204
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "seccomp" not in stderr


@pytest.mark.kvm
@pytest.mark.parametrize("request_name, allowed", [("KVM_CREATE_VM", False),
                                                   ("KVM_GET_VCPU_MMAP_SIZE", False),
                                                   ("KVM_IRQ_LINE", True)])
def test_ioctl_arguments_are_filtered_a_kvm_ioctl_off_the_list_kills(request_name, allowed):
    """The vCPU filter allows ioctl with KVM_RUN and the few others its devices use:
    KVM_CREATE_VM or KVM_GET_VCPU_MMAP_SIZE, even on /dev/kvm, end the process; a listed
    one (KVM_IRQ_LINE, here on the wrong fd) reaches the kernel and just fails."""
    result = child(f"""
        import os, threading
        from pyvmm import seccomp
        from pyvmm.kvm import lib
        from pyvmm.kvm.ioctl import ioctl_int
        policy = seccomp.resolve(True)
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        def thread():
            seccomp.enter_thread("vcpu", policy, "vcpu0")
            try:
                ioctl_int(kvm, lib.{request_name}, 0, "{request_name}")
            except Exception as exc:
                print(type(exc).__name__)
            print("done")
        t = threading.Thread(target=thread)
        t.start(); t.join()
    """)
    if allowed:
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[-1] == "done"
    else:
        assert_killed(result, "vcpu0", "ioctl")


@pytest.mark.kvm
def test_a_custom_filter_without_kvm_run_stops_the_tiny_guest(tmp_path):
    data = default_copy()
    data["threads"]["vcpu"]["ioctl"].pop("KVM_RUN")
    path = tmp_path / "filter.json"
    path.write_text(json.dumps(data))
    result = child(TINY_GUEST.replace("sys.argv[1] if len(sys.argv) > 1 else True",
                                      repr(str(path))))
    assert_killed(result, "vcpu0", "ioctl")


def test_a_filtered_thread_cannot_fork_or_exec():
    for action, call in (("os.fork()", "clone"), ("os.execv('/bin/true', ['true'])", "execve")):
        result = child(f"""
            import os, threading
            from pyvmm import seccomp
            policy = seccomp.resolve(True)
            def thread():
                seccomp.enter_thread("io", policy)
                {action}
                print("done")
            t = threading.Thread(target=thread)
            t.start(); t.join()
        """)
        assert_killed(result, "io", call)


def test_a_filtered_thread_may_start_threads_through_clone_with_clone3_refused():
    result = child("""
        import threading
        from pyvmm import seccomp
        policy = seccomp.resolve(True)
        out = []
        def inner():
            seccomp.enter_thread("console", policy, "console-out")
            out.append("inner")
        def thread():
            seccomp.enter_thread("vcpu", policy, "vcpu0")
            t = threading.Thread(target=inner)
            t.start(); t.join()
        t = threading.Thread(target=thread)
        t.start(); t.join()
        print(out[0], "done")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["inner", "done"]


# -- the command line ------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("command", ["run", "api"])
def test_a_bad_filter_file_is_one_line_before_anything_starts(tmp_path, command):
    bad = tmp_path / "bad.json"
    bad.write_text('{"threads": {}}')
    sock = tmp_path / "api.sock"
    result = run_cli(command, "--api-sock", str(sock), "--seccomp-filter", str(bad))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "seccomp filter" in lines[0] and "no filter for the" in lines[0]
    assert not sock.exists()


def test_no_seccomp_and_a_filter_file_contradict(tmp_path):
    result = run_cli("api", "--api-sock", str(tmp_path / "s"), "--no-seccomp",
                     "--seccomp-filter", "x.json")
    assert result.returncode != 0 and "not allowed with argument" in result.stderr


def test_sockets_only_of_the_listed_families():
    """The I/O thread may make AF_UNIX sockets (vsock's host side), not AF_INET ones."""
    for family, killed in (("AF_UNIX", False), ("AF_INET", True)):
        result = child(f"""
            import socket, threading
            from pyvmm import seccomp
            policy = seccomp.resolve(True)
            def thread():
                seccomp.enter_thread("io", policy)
                socket.socket(socket.{family}, socket.SOCK_STREAM).close()
                print("done")
            t = threading.Thread(target=thread)
            t.start(); t.join()
        """)
        if killed:
            assert_killed(result, "io", "socket")
        else:
            assert result.returncode == 0 and "done" in result.stdout, result.stderr


def test_docs_list_every_call_and_ioctl_of_every_thread():
    """docs/seccomp.md's tables are generated from default.json: regenerate them when
    the lists change (python3 -m pyvmm.seccomp.doc)."""
    doc = (ROOT / "docs" / "seccomp.md").read_text()
    policy = seccomp.load()
    for kind, entry in policy.threads.items():
        section = doc.split(f"#### {kind}\n", 1)[1].split("\n####", 1)[0]
        for name in list(entry.syscalls) + list(entry.ioctls):
            assert f"`{name}`" in section or f" {name}," in section or f"({name}" in section \
                or f" {name})" in section, (kind, name)


def test_threads_the_api_thread_starts_are_allowed_nothing_the_api_list_forbids():
    """Under `pyvmm api` the API thread starts the vCPU, I/O, console and metrics
    threads, and a thread inherits its creator's filter on top of its own: a call in
    the I/O list but not in the API's is still killed (io_uring_enter once was)."""
    policy = seccomp.load()
    api = policy.threads["api"]
    for kind in ("vcpu", "io", "console", "metrics"):
        entry = policy.threads[kind]
        assert set(entry.syscalls) <= set(api.syscalls), (kind, set(entry.syscalls) - set(api.syscalls))
        assert set(entry.ioctls) <= set(api.ioctls), (kind, set(entry.ioctls) - set(api.ioctls))
        assert set(entry.families) <= set(api.families), kind

"""Sandboxes against the real guest: the Debian root file system, the agent, vsock.

One cold boot makes the sandbox template (the cached snapshot; ~1-2 min on KVM PVM,
or nothing if it is cached already); every test then restores its own sandbox from
it in about a second.  Each test's sandbox is its own VM: a test that breaks one
breaks nothing else.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

MIB = 1 << 20


@pytest.fixture(scope="module")
def template(guest):
    from pyvmm.sandbox import ensure_template
    if not getattr(guest, "rootfs", None):
        pytest.fail("the sandbox root file system is not built: run `pyvmm guest build`")
    return ensure_template(log=print)


@pytest.fixture
def sandbox(template):
    from pyvmm.sandbox import Sandbox
    with Sandbox() as sb:
        yield sb


def test_python_in_a_sandbox_prints_45_and_the_clock_is_the_hosts(sandbox):
    r = sandbox.run("python3 -c 'print(sum(range(10)))'")
    assert (r.stdout, r.stderr, r.returncode) == (b"45\n", b"", 0)
    # no network unless asked for: the loopback interface only
    assert sandbox.run("ls /sys/class/net").stdout.split() == [b"lo"]
    # the restore sent the agent the present time: the guest's clock is not the template's
    guest_now = int(sandbox.run(["date", "+%s"]).stdout)
    assert abs(guest_now - time.time()) < 30


def test_the_microvm_of_a_sandbox_runs_commands_and_moves_files_itself(sandbox):
    vm = sandbox.vm                       # any MicroVM with vsock and the agent
    assert vm.exec(["sh", "-c", "echo out; echo err >&2; exit 2"]).returncode == 2
    assert vm.agent() is vm.agent()       # one Agent, waited for once
    vm.write_file("/srv/from-microvm", b"bytes\0in")
    assert vm.read_file("/srv/from-microvm") == b"bytes\0in"
    events = list(vm.exec_stream(["echo", "streamed"]))
    assert ("stdout", b"streamed\n") in events and events[-1][0] == "exit"


def test_exit_codes_0_1_and_137_when_killed(sandbox):
    assert sandbox.run("true").returncode == 0
    assert sandbox.run("exit 1").returncode == 1
    killed = sandbox.run("kill -9 $$")
    assert (killed.signal, killed.returncode) == (9, 137)


def test_stdout_and_stderr_are_kept_apart_and_in_order(sandbox):
    r = sandbox.run("for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done")
    assert r.stdout == b"".join(b"out%d\n" % i for i in range(1, 6))
    assert r.stderr == b"".join(b"err%d\n" % i for i in range(1, 6))


def test_ten_megabytes_of_output_arrive_intact(sandbox):
    count = 1_500_000                                   # `seq` prints 11.4 MB
    r = sandbox.run(["seq", "1", str(count)])
    expected = "".join(f"{i}\n" for i in range(1, count + 1)).encode()
    assert r.returncode == 0 and len(r.stdout) == len(expected) > 10 * MIB
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(expected).hexdigest()


def test_stdin_is_streamed_in_and_closed(sandbox):
    data = os.urandom(3 * MIB)
    r = sandbox.run(["sha256sum"], stdin=data)
    assert r.returncode == 0
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    process = sandbox.start_process(["cat"], stdin=True)
    process.write_stdin(b"hello ")
    process.write_stdin(b"sandbox")
    process.close_stdin()
    result = process.wait()
    assert (result.stdout, result.returncode) == (b"hello sandbox", 0)


def test_a_timeout_kills_the_command_and_its_children(sandbox):
    # 10 s, not 2: on a loaded CI host the shell once had not printed $! within 2 s
    # (stdout came back empty).  The pid goes to a file too, read after the kill.
    started = time.monotonic()
    r = sandbox.run("sleep 600 & echo $! > /tmp/child; echo $!; wait", timeout=10)
    assert r.timed_out and r.signal == 9
    assert time.monotonic() - started < 90
    child = int(sandbox.read_file("/tmp/child"))
    # the background sleep was in the command's process group: it is gone too
    assert sandbox.run(f"kill -0 {child}").returncode != 0


def test_a_ten_megabyte_file_goes_in_and_comes_back(sandbox):
    data = os.urandom(10 * MIB)
    sandbox.write_file("/work/deep/dir/blob", data, mode=0o600)
    listing = sandbox.run("stat -c '%a %s' /work/deep/dir/blob; sha256sum /work/deep/dir/blob")
    mode, size, digest = listing.stdout.split()[:3]
    assert (mode, int(size)) == (b"600", len(data))
    assert digest.decode() == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(sandbox.read_file("/work/deep/dir/blob")).digest() == \
        hashlib.sha256(data).digest()


def test_twenty_commands_at_once(sandbox):
    def one(i: int) -> bytes:
        return sandbox.run(f"sleep 0.5; echo {i}").stdout
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        outputs = list(pool.map(one, range(20)))
    assert outputs == [b"%d\n" % i for i in range(20)]


def test_two_sandboxes_from_one_snapshot_do_not_see_each_others_files(template):
    from pyvmm.sandbox import Sandbox
    with Sandbox() as a, Sandbox() as b:
        a.write_file("/root/mine", b"a's secret")
        assert b.run("cat /root/mine").returncode != 0
        assert a.run("cat /root/mine").stdout == b"a's secret"
        # and the writes of one never reach the shared image
        assert b.run("test -e /root/mine").returncode == 1


def test_a_client_that_vanishes_gets_its_command_killed(sandbox):
    process = sandbox.start_process("echo $$; exec sleep 600")
    pid = None
    for kind, data in process:
        if kind == "stdout":
            pid = int(data)
            break
    process.kill()                        # the connection closes without a word
    deadline = time.monotonic() + 30
    while sandbox.run(f"kill -0 {pid}").returncode == 0:
        assert time.monotonic() < deadline, "the vanished client's command still runs"
        time.sleep(0.2)


def test_the_lifetime_limit_kills_the_vm(template):
    from pyvmm.sandbox import Sandbox, SandboxError
    with Sandbox(lifetime=3) as sb:
        assert sb.run("true").returncode == 0
        deadline = time.monotonic() + 30
        while sb.vm.state != "Exited":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(SandboxError, match="wall-clock limit"):
            sb.run("true")


# -- the host side of vsock, Firecracker's protocol, with plain sockets ------------------

def _connect(uds_path: str, port: int) -> tuple[socket.socket, bytes]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(uds_path)
    s.sendall(b"CONNECT %d\n" % port)
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        line += chunk
    return s, line


def test_connect_ok_exchange_with_a_plain_socket_and_a_port_nobody_listens_on(sandbox):
    from pyvmm.agent import protocol
    s, line = _connect(sandbox.uds_path, 1024)
    with s:
        assert line.startswith(b"OK ") and int(line[3:]) > 0
        # the agent speaks first or answers HELLO: either way a protocol frame arrives
        s.sendall(protocol.hello())
        header = s.recv(5)
        assert len(header) == 5
    s, line = _connect(sandbox.uds_path, 4444)           # nobody listens there
    with s:
        assert line == b""                               # closed, no OK
    assert sandbox.run("true").returncode == 0


def test_a_guest_initiated_connection_reaches_uds_path_underscore_port(sandbox):
    listener_path = f"{sandbox.uds_path}_5000"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(listener_path)
    listener.listen(1)
    listener.settimeout(60)
    payload = os.urandom(256 * 1024)
    received = bytearray()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(60)
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received.extend(chunk)
            conn.sendall(b"thanks")
    server = threading.Thread(target=serve)
    server.start()
    r = sandbox.run(["/usr/sbin/pyvmm-agent", "vsock-connect", "2", "5000"], stdin=payload,
                    timeout=120)
    server.join(60)
    listener.close()
    assert hashlib.sha256(bytes(received)).digest() == hashlib.sha256(payload).digest()
    assert r.stdout == b"thanks"
    # a port nobody listens on: the guest's connect fails (a reset), the guest goes on
    refused = sandbox.run(["/usr/sbin/pyvmm-agent", "vsock-connect", "2", "5001"], stdin=b"x",
                          timeout=60)
    assert refused.returncode != 0
    # nor can it reach any other CID
    other = sandbox.run(["/usr/sbin/pyvmm-agent", "vsock-connect", "7", "5000"], stdin=b"x",
                        timeout=60)
    assert other.returncode != 0


def test_a_malformed_frame_gets_an_error_and_the_agent_serves_on(sandbox):
    s, line = _connect(sandbox.uds_path, 1024)
    assert line.startswith(b"OK ")
    with s:
        s.sendall(b"\xff\xff\xff\xff\x99garbage")
        s.settimeout(20)
        while s.recv(65536):            # an ERROR frame perhaps, then the agent closes
            pass
    assert sandbox.run("echo still here").stdout == b"still here\n"


def test_no_agent_is_a_clear_error_after_a_timeout_not_a_hang(sandbox):
    from pyvmm.agent.client import Agent
    from pyvmm.errors import PyvmmError
    started = time.monotonic()
    with pytest.raises(PyvmmError, match="no agent"):
        Agent.over_vsock(sandbox.uds_path, 4321, connect_timeout=3).health()
    assert time.monotonic() - started < 30


# -- the command line --------------------------------------------------------------------

def test_pyvmm_sandbox_run_prints_hi_and_exits_3(template):
    r = subprocess.run([sys.executable, "-m", "pyvmm", "sandbox", "run", "--",
                        "sh", "-c", "echo hi; echo oops >&2; exit 3"],
                       capture_output=True, timeout=300)
    assert (r.stdout, r.stderr.splitlines()[-1:], r.returncode) == (b"hi\n", [b"oops"], 3), r.stderr


def test_pyvmm_exec_and_cp_reach_a_running_sandbox(sandbox, tmp_path):
    cli = [sys.executable, "-m", "pyvmm"]
    r = subprocess.run(cli + ["exec", "--vsock", sandbox.uds_path, "--env", "GREETING=hey",
                              "--cwd", "/tmp", "--", "sh", "-c", 'echo "$GREETING $(pwd)"; exit 5'],
                       capture_output=True, timeout=120)
    assert (r.stdout, r.returncode) == (b"hey /tmp\n", 5), r.stderr
    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom(MIB))
    r = subprocess.run(cli + ["cp", "--vsock", sandbox.uds_path, str(source), "guest:/srv/in.bin"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cli + ["cp", "--vsock", sandbox.uds_path, "guest:/srv/in.bin",
                              str(tmp_path / "out.bin")], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.bin").read_bytes() == source.read_bytes()
    r = subprocess.run(cli + ["exec", "--vsock", sandbox.uds_path, "-i", "--", "wc", "-c"],
                       input=b"x" * 1000, capture_output=True, timeout=120)
    assert r.stdout.strip() == b"1000"


def test_a_sandbox_asked_for_a_network_gets_an_interface_on_its_tap(template, tmp_path):
    from pyvmm.sandbox import Sandbox
    from tests.framework.netns import NetNamespace
    netns = NetNamespace(f"pyvmm-sbx-{os.getpid()}", tap="sbxtap0")
    try:
        with netns.entered():
            sb = Sandbox(tap=netns.tap)            # its own template, with an interface
        with sb:
            assert sb.run("ls /sys/class/net").stdout.split() == [b"eth0", b"lo"]
            assert sb.vm.spec.network_interfaces["eth0"].host_dev_name == netns.tap
    finally:
        netns.delete()

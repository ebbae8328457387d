"""The guest agent (firmware/agent) run on the host with --unix, no VM: commands, files,
concurrency, clients that vanish and clients that lie.

The agent is built once per session with firmware/agent/build.sh, which needs musl-gcc
(Debian's musl-tools): without it these tests fail, with that sentence, rather than skip.
SET_TIME is never sent here (it would set the host's clock; test_agent_protocol.py
checks its encoding).
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pyvmm.agent import AgentClient, AgentError, connect_unix
from pyvmm.agent import protocol as p
from pyvmm.agent.protocol import FrameDecoder, FrameType, Tag

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "firmware" / "agent" / "build.sh"
TEN_MB = 10 * 1000 * 1000


@pytest.fixture(scope="session")
def agent_binary(tmp_path_factory) -> Path:
    if shutil.which("musl-gcc") is None:
        pytest.fail("musl-gcc is missing: install it with `apt-get install musl-tools` "
                    "(the guest agent is built against musl)")
    out = tmp_path_factory.mktemp("agent") / "pyvmm-agent"
    subprocess.run([str(BUILD), str(out)], check=True, timeout=300)
    return out


class HostAgent:
    """pyvmm-agent --unix PATH, started and stopped by its pid."""

    def __init__(self, binary: Path, path: Path) -> None:
        self.path = str(path)
        self.proc = subprocess.Popen([str(binary), "--unix", self.path], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        line = self.proc.stdout.readline()
        assert line == f"PYVMM-AGENT-READY unix={self.path}\n".encode(), line

    def connect(self, timeout: float = 10.0) -> AgentClient:
        return AgentClient.connect(lambda: connect_unix(self.path), timeout=timeout)

    def raw(self) -> "RawConn":
        return RawConn(self.path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def peak_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def agent(agent_binary, tmp_path_factory):
    host_agent = HostAgent(agent_binary, tmp_path_factory.mktemp("sock") / "agent.sock")
    yield host_agent
    assert host_agent.alive(), "the agent exited during the tests"
    host_agent.stop()


@pytest.fixture
def client(agent):
    with agent.connect() as c:
        yield c


class RawConn:
    """Bytes in, frames out: for clients that break the protocol."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.decoder = FrameDecoder()
        self.frames: list[p.Frame] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self) -> None:
        self.send(p.hello())
        assert self.next().type == FrameType.HELLO

    def next(self, timeout: float = 5.0) -> p.Frame | None:
        """The next frame, or None when the agent closed the connection."""
        self.sock.settimeout(timeout)
        while not self.frames:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def close(self) -> None:
        self.sock.close()


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """True once `pid` is no more: dead and reaped (the agent is a subreaper, so even a
    command's orphaned children are reaped by it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.02)
    return False


# -- commands ------------------------------------------------------------------------------------

def test_hello_names_version_and_build(client):
    assert client.info.version == p.PROTOCOL_VERSION
    assert len(client.info.build_id) == 12


@pytest.mark.parametrize("script, code, sig, returncode", [
    ("exit 0", 0, None, 0), ("exit 1", 1, None, 1), ("kill -9 $$", None, 9, 137)])
def test_exit_codes_and_signals(client, script, code, sig, returncode):
    result = client.exec(["sh", "-c", script])
    assert (result.exit_code, result.signal, result.returncode, result.timed_out) == (code, sig, returncode, False)


def test_stdout_and_stderr_apart_and_each_in_order(client):
    result = client.exec(["sh", "-c", "i=0; while [ $i -lt 500 ]; do echo out$i; echo err$i >&2; "
                                      "i=$((i+1)); done"])
    assert result.stdout == b"".join(b"out%d\n" % i for i in range(500))
    assert result.stderr == b"".join(b"err%d\n" % i for i in range(500))


def test_ten_megabytes_of_output_arrive_intact(client, tmp_path):
    # the command hashes what it prints: the host must see the same bytes
    result = client.exec(["sh", "-c", f"head -c {TEN_MB} /dev/urandom > {tmp_path}/f; "
                                      f"sha256sum < {tmp_path}/f >&2; cat {tmp_path}/f"])
    assert len(result.stdout) == TEN_MB
    assert result.stderr.split()[0].decode() == hashlib.sha256(result.stdout).hexdigest()


def test_stdin_streamed_in_and_closed(client):
    data = os.urandom(3 * 1024 * 1024 + 17)
    result = client.exec(["sha256sum"], stdin=io.BytesIO(data))
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    # a command that reads nothing for a while: stdin waits in the pipe, nothing is lost
    result = client.exec(["sh", "-c", "sleep 0.3; wc -c"], stdin=data)
    assert int(result.stdout) == len(data)


def test_stdin_nobody_reads_is_dropped_and_the_connection_goes_on(client):
    assert client.exec(["sh", "-c", "head -c 100 > /dev/null; echo read"], stdin=bytes(TEN_MB)).stdout == b"read\n"
    assert client.exec(["true"], stdin=bytes(TEN_MB)).exit_code == 0
    assert client.exec(["echo", "next"]).stdout == b"next\n"


def test_interactive_stdin_and_streamed_events(client):
    proc = client.start(["sh", "-c", "while read line; do echo got:$line; done; echo bye"], stdin=True)
    proc.write_stdin(b"one\n")
    events = proc.events(timeout=5)
    assert next(events) == ("stdout", b"got:one\n")
    proc.write_stdin(b"two\n")
    assert next(events) == ("stdout", b"got:two\n")
    proc.close_stdin()
    assert proc.wait(timeout=5).stdout == b"bye\n"
    assert proc.returncode == 0


def test_env_cwd_and_exec_failures_like_a_shell(client, tmp_path):
    result = client.exec(["sh", "-c", 'echo "$FOO|$HOME|$PATH"; pwd'], env={"FOO": "bar", "HOME": "/x"},
                         cwd=str(tmp_path))
    assert result.stdout.decode().splitlines() == [
        "bar|/x|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", str(tmp_path)]
    missing = client.exec(["no-such-program-here"])
    assert missing.exit_code == 127 and b"No such file or directory" in missing.stderr
    no_cwd = client.exec(["true"], cwd=str(tmp_path / "gone"))
    assert no_cwd.exit_code == 126 and b"cannot change directory" in no_cwd.stderr
    not_executable = client.exec([str(tmp_path)])
    assert not_executable.exit_code == 126


def test_a_string_command_runs_through_sh(client):
    assert client.exec("echo $((6*7))").stdout == b"42\n"


def test_timeout_kills_the_command_and_its_children(client):
    start = time.monotonic()
    result = client.exec(["sh", "-c", "sleep 1000 & echo $!; wait"], timeout=0.5)
    assert time.monotonic() - start < 5
    assert result.timed_out and result.signal == signal.SIGKILL and result.returncode == 137
    grandchild = int(result.stdout)
    assert wait_gone(grandchild), f"the command's child {grandchild} survived the timeout"


def test_signal_goes_to_the_process_group(client):
    proc = client.start(["sh", "-c", "trap 'echo term; exit 5' TERM; echo ready; "
                                     "while :; do sleep 0.05; done"])
    events = proc.events(timeout=5)
    assert next(events) == ("stdout", b"ready\n")
    proc.signal(signal.SIGTERM)
    result = proc.wait(timeout=5)
    assert (result.stdout, result.exit_code) == (b"term\n", 5)


def test_pty_mode_gives_the_command_a_terminal(client):
    result = client.exec(["tty"], pty=True)
    assert result.exit_code == 0 and result.stdout.startswith(b"/dev/pts/")
    assert client.exec(["sh", "-c", "[ -t 0 ] && [ -t 1 ] && stty size"], pty=True).stdout == b"24 80\r\n"
    result = client.exec(["sh", "-c", "read x; echo x=$x"], pty=True, stdin=b"hello\n")
    assert result.stdout.endswith(b"x=hello\r\n")


def test_max_output_kills_a_flood(agent):
    with agent.connect() as c:
        with pytest.raises(AgentError, match="more than 100000 bytes"):
            c.exec(["cat", "/dev/zero"], max_output=100_000)
    with agent.connect() as c:
        assert c.health().procs > 0


def test_late_stdin_after_exit_is_harmless(client):
    proc = client.start(["true"], stdin=True)
    assert proc.wait(timeout=5).exit_code == 0
    # frames sent before the client saw EXIT must not break the connection
    client._chan.queue(p.encode_frame(FrameType.STDIN, b"late") + p.encode_frame(FrameType.STDIN_CLOSE)
                       + p.signal_request(15))
    client._chan.flush(time.monotonic() + 5)
    assert client.exec(["echo", "ok"]).stdout == b"ok\n"


def test_exec_true_round_trip(client):
    client.exec(["true"])
    start = time.perf_counter()
    for _ in range(50):
        client.exec(["true"])
    per_call_ms = (time.perf_counter() - start) / 50 * 1000
    print(f"exec true round trip on the host: {per_call_ms:.2f} ms")
    assert per_call_ms < 100


# -- files ---------------------------------------------------------------------------------------

def test_put_and_get_ten_megabytes(client, tmp_path):
    data = os.urandom(TEN_MB)
    target = tmp_path / "a" / "b" / "c.bin"
    client.put_file(str(target), io.BytesIO(data), mode=0o640, mkdirs=True)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert hashlib.sha256(target.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    out = io.BytesIO()
    assert client.get_file(str(target), out) == TEN_MB
    assert hashlib.sha256(out.getvalue()).digest() == hashlib.sha256(data).digest()
    assert client.get_file(str(target)) == data
    assert [n for n in os.listdir(target.parent) if n != "c.bin"] == []   # no temporary left


def test_put_replaces_atomically_with_exact_mode(client, tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")
    client.put_file(str(target), b"new", mode=0o4755, mkdirs=False)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o4755
    client.put_file(str(target), b"", mode=0o600)
    assert target.read_bytes() == b""


def test_file_errors_are_clear_and_leave_the_connection_usable(client, tmp_path):
    with pytest.raises(AgentError, match="No such file or directory"):
        client.put_file(str(tmp_path / "no" / "dir" / "f"), b"x" * 300_000, mkdirs=False)
    with pytest.raises(AgentError, match="No such file or directory"):
        client.get_file(str(tmp_path / "missing"))
    with pytest.raises(AgentError, match="not a regular file"):
        client.get_file(str(tmp_path))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(AgentError, match="not a regular file"):   # and no hang in open()
        client.get_file(str(tmp_path / "fifo"))
    with pytest.raises(AgentError, match="names a directory"):
        client.put_file(str(tmp_path) + "/", b"x")
    assert client.health().connections >= 1
    assert not list(tmp_path.glob("**/.pyvmm-put-*"))


# -- health, entropy -----------------------------------------------------------------------------

def test_health(client):
    health = client.health()
    assert health.uptime_ms > 0 and health.mem_total > health.mem_free > 0
    assert health.procs > 0 and health.connections >= 1 and health.load1 >= 0


def test_reseed(client):
    if os.geteuid() != 0:
        with pytest.raises(AgentError, match="cannot add entropy"):
            client.reseed(64)
    else:
        client.reseed(64)   # root on the host: adds 64 bytes to its pool, harmless
    with pytest.raises(AgentError, match="1 to 4096 bytes"):
        client.reseed(5000)


# -- many clients, vanishing clients -------------------------------------------------------------

def test_twenty_commands_at_once(agent):
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with agent.connect() as c:
                results[i] = c.exec(["sh", "-c", f"sleep 0.5; echo {i}"]).stdout
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert results == {i: b"%d\n" % i for i in range(20)}
    assert time.monotonic() - start < 5, "the commands did not run concurrently"


def test_a_client_that_vanishes_gets_its_command_killed(agent):
    c = agent.connect()
    proc = c.start(["sh", "-c", "sleep 1000 & echo $! $$; wait"])
    kind, data = next(proc.events(timeout=5))
    child, shell = (int(x) for x in data.split())
    c.close()
    assert wait_gone(shell) and wait_gone(child), "the vanished client's command was orphaned"


def test_a_client_that_vanishes_while_stdin_is_blocked(agent):
    raw = agent.raw()
    raw.hello()
    raw.send(p.exec_request(["sh", "-c", "echo $$; sleep 1000"], stdin=True))
    shell = int(raw.next().payload)
    raw.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):   # backpressure: the pipe is full, the agent stops reading
        raw.sock.sendall(p.encode_frame(FrameType.STDIN, b"x" * 60000) * 100)
    raw.close()
    assert wait_gone(shell)


def test_a_client_that_vanishes_while_the_agent_waits_to_send(agent, tmp_path):
    # the command floods, the client reads nothing: the agent's queue is full and it is
    # not reading the connection, yet it must notice the close
    raw = agent.raw()
    raw.hello()
    raw.send(p.exec_request(["sh", "-c", "echo $$; exec cat /dev/zero"]))
    shell = int(raw.next().payload.split(b"\n")[0])
    time.sleep(0.5)
    raw.close()
    assert wait_gone(shell)
    big = tmp_path / "big"
    big.write_bytes(bytes(8 * 1024 * 1024))
    raw = agent.raw()
    raw.hello()
    raw.send(p.get_file_request(str(big)))
    assert raw.next().type == FrameType.DATA
    time.sleep(0.3)
    raw.close()
    time.sleep(0.2)
    with agent.connect() as c:
        assert c.health().connections == 1


def test_slow_reader_costs_bounded_agent_memory(agent, tmp_path):
    big = tmp_path / "big"
    big.write_bytes(os.urandom(20 * 1024 * 1024))
    with agent.connect() as c:
        proc = c.start(["cat", str(big)])
        time.sleep(0.5)                 # the agent may buffer only a few chunks meanwhile
        result = proc.wait(timeout=30)
    assert len(result.stdout) == 20 * 1024 * 1024
    print(f"agent peak RSS after a slow 20 MiB read: {agent.peak_rss_kib()} KiB")
    assert agent.peak_rss_kib() < 16 * 1024


# -- clients that break the protocol -------------------------------------------------------------

def expect_error_then_close(raw: RawConn, match: str) -> None:
    frame = raw.next()
    assert frame is not None and frame.type == FrameType.ERROR, frame
    assert match in p.error_text(frame)
    assert raw.next() is None
    raw.close()


def test_hello_version_mismatch_names_both_versions(agent):
    c = AgentClient(connect_unix(agent.path))
    with pytest.raises(AgentError, match="client speaks version 7, this agent speaks version 1"):
        c.hello(version=7)
    c.close()


@pytest.mark.parametrize("payload, match", [
    (struct.pack(">I", p.MAX_FRAME_SIZE + 1), "frame length"),
    (struct.pack(">I", 0), "frame length"),
    (p.encode_frame(FrameType.STDOUT, b"x"), "not expected"),
    (b"\x00\x00\x00\x01\xee", "not expected"),
    (p.encode_frame(FrameType.EXEC, b"\x03\x00\x00\x00\x09ls"), "TLV length beyond"),
    (p.encode_frame(FrameType.EXEC, p.encode_tlvs([(Tag.PATH, "x")])), "unexpected TLV tag"),
    (p.encode_frame(FrameType.EXEC, p.encode_tlvs([(Tag.CWD, "/")])), "ARGV missing"),
    (p.encode_frame(FrameType.EXEC, b"\x06\x00\x00\x00\x02\x00\x01" + p.encode_tlvs([(Tag.ARGV, "x")])),
     "bad FLAGS"),
    (p.encode_frame(FrameType.EXEC, p.encode_tlvs([(Tag.ARGV, "a\0b")])), "NUL"),
    (p.encode_frame(FrameType.GET_FILE, p.encode_tlvs([(Tag.PATH, "a"), (Tag.PATH, "b")])), "repeated"),
    (p.encode_frame(FrameType.HEALTH, b"x"), "carries no payload"),
    (p.encode_frame(FrameType.SIGNAL, p.encode_tlvs([(Tag.SIGNAL, 9)])), "not expected"),
])
def test_malformed_frames_get_an_error_and_a_close(agent, payload, match):
    raw = agent.raw()
    raw.hello()
    raw.send(payload)
    expect_error_then_close(raw, match)
    with agent.connect() as c:
        assert c.health().procs > 0


def test_requests_before_hello_are_refused(agent):
    raw = agent.raw()
    raw.send(p.encode_frame(FrameType.HEALTH))
    expect_error_then_close(raw, "HEALTH")


def test_a_bad_frame_mid_command_kills_the_command(agent):
    raw = agent.raw()
    raw.hello()
    raw.send(p.exec_request(["sh", "-c", "echo $$; sleep 1000"]))
    shell = int(raw.next().payload)
    raw.send(p.encode_frame(FrameType.HEALTH))        # not while a command runs
    expect_error_then_close(raw, "not expected")
    assert wait_gone(shell)


# frames hypothesis may never produce: they would run programs, write files or set the
# clock of the host running these tests
UNSAFE_TYPES = {FrameType.EXEC, FrameType.PUT_FILE, FrameType.SET_TIME}


def only_safe_frames(data: bytes) -> bool:
    pos = 0
    while pos + 5 <= len(data):
        length = struct.unpack_from(">I", data, pos)[0]
        if data[pos + 4] in UNSAFE_TYPES:
            return False
        if length == 0:
            return True
        pos += 4 + length
    return True


safe_types = st.integers(0, 255).filter(lambda t: t not in UNSAFE_TYPES)
tlv = st.builds(lambda tag, body, lie: struct.pack(">BI", tag, len(body) + lie) + body,
                st.integers(0, 40), st.binary(max_size=20), st.sampled_from([0, 0, 0, 1, 7, 1 << 31]))
frames = st.one_of(
    st.builds(lambda t, tlvs: struct.pack(">IB", 1 + len(b"".join(tlvs)), t) + b"".join(tlvs),
              safe_types, st.lists(tlv, max_size=4)),
    st.builds(lambda n, t: struct.pack(">IB", n, t), st.sampled_from([0, p.MAX_FRAME_SIZE + 1, 0xFFFFFFFF]),
              safe_types),
    st.binary(min_size=1, max_size=64),
)


@given(hello_first=st.booleans(), garbage=st.lists(frames, min_size=1, max_size=4).map(b"".join))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.filter_too_much])
def test_hostile_bytes_never_hurt_the_agent(agent, hello_first, garbage):
    assume(only_safe_frames(garbage))
    raw = agent.raw()
    if hello_first:
        raw.hello()
    try:
        raw.send(garbage)
        while True:    # answers, an ERROR, a close, or silence while it waits for more bytes
            frame = raw.next(timeout=0.3)
            if frame is None:
                break
            assert frame.type in (FrameType.HELLO, FrameType.OK, FrameType.ERROR, FrameType.DATA,
                                  FrameType.DATA_END)
    except (TimeoutError, socket.timeout, BrokenPipeError, ConnectionResetError):
        pass
    finally:
        raw.close()
    assert agent.alive()
    with agent.connect(timeout=5) as c:
        c.health()


# -- --init: PID 1 of a sandbox, tried in private namespaces -------------------------------------

@pytest.fixture
def init_agent(agent_binary):
    """The agent as PID 1 of new PID, mount and UTS namespaces (unshare; private mount
    propagation, so its mounts stay inside), its console bound to /dev/null."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for namespaces")
    sock_dir = Path(tempfile.mkdtemp(dir="/var/tmp"))   # --init mounts a tmpfs over /tmp
    sock = sock_dir / "agent.sock"
    proc = subprocess.Popen(["unshare", "--fork", "--pid", "--mount-proc", "--mount", "--uts", "--kill-child",
                             "sh", "-c", 'mount --bind /dev/null /dev/console && exec "$0" --init --unix "$1"',
                             str(agent_binary), str(sock)])
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the --init agent did not start"
        time.sleep(0.02)
    host_agent = HostAgent.__new__(HostAgent)
    host_agent.path, host_agent.proc = str(sock), proc
    yield host_agent
    proc.kill()          # --kill-child: PID 1 dies, and the namespace with it
    proc.wait(timeout=10)
    shutil.rmtree(sock_dir)


def test_init_mode_is_pid_1_with_a_system_around_it(init_agent):
    with init_agent.connect() as c:
        result = c.exec(["sh", "-c", "cat /proc/1/comm; hostname; stat -f -c %T /tmp; echo $PATH; "
                                     "ls -d /proc/self /dev/pts /sys/kernel"])
        assert result.exit_code == 0, result
        comm, hostname, tmp_fs, path, *listed = result.stdout.decode().splitlines()
        assert (comm, hostname, tmp_fs) == ("pyvmm-agent", "sandbox", "tmpfs")
        assert path.startswith("/usr/local/sbin:")
        # an orphan (its parent shell exited) is PID 1's to reap: no zombie left behind
        orphan = int(c.exec(["sh", "-c", "sleep 0.2 & echo $!"]).stdout)
        time.sleep(0.6)
        assert c.exec(["test", "-e", f"/proc/{orphan}"]).exit_code == 1


# -- Agent: one connection per operation, shared by threads -----------------------------------

def test_one_agent_shared_by_twenty_threads_and_a_streamed_command_closes_its_connection(agent):
    import concurrent.futures
    from pyvmm.agent.client import Agent
    shared = Agent(lambda: connect_unix(agent.path))
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        outputs = list(pool.map(lambda i: shared.exec(f"sleep 0.2; echo {i}").stdout, range(20)))
    assert outputs == [b"%d\n" % i for i in range(20)]
    process = shared.start(["cat"], stdin=True)
    process.write_stdin(b"streamed")
    process.close_stdin()
    assert process.wait().stdout == b"streamed"
    assert process._client._chan.sock.fileno() == -1     # closed with the command's end


def test_agent_exec_bounds_the_output_it_keeps(agent):
    from pyvmm.agent.client import Agent
    shared = Agent(lambda: connect_unix(agent.path), max_output=1 << 20)
    with pytest.raises(AgentError, match="more than"):
        shared.exec("head -c 5000000 /dev/zero")
    assert shared.exec("echo fine").stdout == b"fine\n"


def test_commands_inherit_glibc_tunables_from_the_agents_environment(agent_binary, tmp_path):
    """On KVM PVM hosts the VMM puts GLIBC_TUNABLES on the kernel command line (glibc must
    not use AVX there, pyvmm.pvm); the kernel hands it to init, and the agent must pass
    it on to every command although it gives them a clean environment."""
    path = str(tmp_path / "tunables.sock")
    proc = subprocess.Popen([str(agent_binary), "--unix", path], stdout=subprocess.PIPE,
                            env={"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2", "SECRET": "no"})
    try:
        assert proc.stdout.readline().startswith(b"PYVMM-AGENT-READY")
        with AgentClient.connect(lambda: connect_unix(path)) as client:
            env = client.exec(["/usr/bin/env"]).stdout.decode().splitlines()
        assert "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2" in env
        assert not any(line.startswith("SECRET=") for line in env)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()

"""`pyvmm exec` and `pyvmm cp` with no VM: the agent runs on the host behind a stand-in
for the VMM's vsock socket (Firecracker's CONNECT/OK, relayed to the agent's Unix
socket), so the command line is tested in seconds; tests/test_sandbox_linux.py runs
the same commands against the real guest.  And the errors, one line each."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.test_agent import HostAgent, agent_binary  # noqa: F401 - the fixture

CLI = [sys.executable, "-m", "pyvmm"]


class FirecrackerRelay:
    """Listens where a VMM's vsock socket would be; `CONNECT <port>\\n` is answered
    `OK <n>\\n` and the connection relayed to the host agent's Unix socket."""

    def __init__(self, path: Path, agent_path: str) -> None:
        self.path, self.agent_path = str(path), agent_path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            chunk = conn.recv(1)
            if not chunk:
                conn.close()
                return
            line += chunk
        if line != b"CONNECT 1024\n":
            conn.close()
            return
        agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        agent.connect(self.agent_path)
        conn.sendall(b"OK 1073741824\n")
        for a, b in ((conn, agent), (agent, conn)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def relay(agent_binary, tmp_path):  # noqa: F811 - the fixture
    agent = HostAgent(agent_binary, tmp_path / "agent.sock")
    r = FirecrackerRelay(tmp_path / "vsock.sock", agent.path)
    yield r
    r.close()
    agent.stop()


def pyvmm(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), input=input, capture_output=True, timeout=60)


def test_exec_streams_both_outputs_and_exits_with_the_commands_code(relay, tmp_path):
    r = pyvmm("exec", "--vsock", relay.path, "--env", "A=1", "--env", "B=two words",
              "--cwd", str(tmp_path), "--", "sh", "-c", 'echo "$A $B $(pwd)"; echo e >&2; exit 4')
    assert (r.stdout, r.stderr, r.returncode) == \
        (f"1 two words {tmp_path}\n".encode(), b"e\n", 4)


def test_exec_passes_stdin_with_i_and_reports_a_signal_as_128_plus_it(relay):
    r = pyvmm("exec", "--vsock", relay.path, "-i", "--", "wc", "-c", input=b"y" * 70000)
    assert (r.stdout.strip(), r.returncode) == (b"70000", 0)
    r = pyvmm("exec", "--vsock", relay.path, "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + 15


def test_exec_timeout_kills_and_says_so(relay):
    r = pyvmm("exec", "--vsock", relay.path, "--timeout", "0.5", "--", "sleep", "30")
    assert r.returncode == 137
    assert b"longer than 0.5 s" in r.stderr


def test_cp_in_and_out(relay, tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(3 << 20))
    source.chmod(0o640)
    inside = tmp_path / "guest-side" / "deep" / "copy.bin"
    assert pyvmm("cp", "--vsock", relay.path, str(source), f"guest:{inside}").returncode == 0
    assert inside.read_bytes() == source.read_bytes()
    assert inside.stat().st_mode & 0o777 == 0o640
    out_dir = tmp_path / "back"
    out_dir.mkdir()
    assert pyvmm("cp", "--vsock", relay.path, f"guest:{inside}", str(out_dir)).returncode == 0
    assert (out_dir / "copy.bin").read_bytes() == source.read_bytes()
    missing = pyvmm("cp", "--vsock", relay.path, "guest:/no/such/file", str(out_dir / "x"))
    assert missing.returncode != 0 and len(missing.stderr.splitlines()) == 1
    assert not (out_dir / "x").exists() and not list(out_dir.glob(".x*"))


@pytest.mark.parametrize("args, message", [
    (["exec", "--vsock", "/nonexistent.sock", "--connect-timeout", "0.3", "--", "true"],
     b"no agent answered on vsock port 1024"),
    (["exec", "--vsock", "/nonexistent.sock"], b"no command given"),
    (["exec", "--api-sock", "/nonexistent.sock", "--", "true"], b"cannot reach the API"),
    (["cp", "--vsock", "x.sock", "a", "b"], b"exactly one of SRC and DST"),
    (["cp", "--vsock", "x.sock", "guest:/a", "guest:/b"], b"exactly one of SRC and DST"),
    (["run", "--vsock", "cid=1,uds=/tmp/x.sock"], b"guest_cid"),
    (["run", "--vsock", "bogus"], b"--vsock"),
])
def test_errors_are_one_line(args, message):
    r = pyvmm(*args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr

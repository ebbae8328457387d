"""The one way the tests and the benchmarks spawn a VMM process (pyvmm or QEMU).

Process(argv) starts the child at once, with
- stdin a pipe left open (the guest's serial input, for `--console stdio`);
- stdout read as it comes by a thread, which time-stamps the markers it was
  asked to watch: seconds from time.perf_counter() just before the spawn to
  the read that completed the marker (how the benchmarks time "exec -> X");
- stderr in a temporary file, so that no pipe fills up and it can be read
  whenever;
- a session of its own, so that kill() also ends what it started (`ip netns
  exec` wrappers, say).

Its console has the interface of MicroVM.serial (write, read, expect), so
run_in_shell() works on a process as on a MicroVM: `process.serial` is the
process itself.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence


def pyvmm_command() -> list[str]:
    """How pyvmm is started: this interpreter, not the `pyvmm` pyenv shim (a bash
    script that would add ~50 ms of its own to every start-up figure)."""
    return [sys.executable, "-m", "pyvmm"]


class Process:
    """A child process with its stdout collected and time-stamped (see the module)."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 markers: Sequence[bytes] = (), stdin: bool = True) -> None:
        """stdin: a pipe left open (True) or /dev/null (False)."""
        self.argv = list(argv)
        self.out = bytearray()
        self.position = 0                     # where read() and expect() start by default
        self.wanted = list(markers)
        self.seen: dict[bytes, float] = {}    # marker -> seconds from spawn to its read
        self.eof = False
        self._changed = threading.Condition()
        self._err = tempfile.TemporaryFile()
        self._err_data: bytes | None = None
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE if stdin else
                                     subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._err, env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name=f"read-{self.proc.pid}",
                                        daemon=True)
        self._reader.start()

    # -- stdout ------------------------------------------------------------------------

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            now = time.perf_counter()
            with self._changed:
                if not data:
                    self.eof = True
                    self._changed.notify_all()
                    return
                overlap = max(0, len(self.out) - max((len(m) for m in self.wanted), default=1))
                self.out += data
                for marker in self.wanted:
                    if marker not in self.seen and marker in self.out[overlap:]:
                        self.seen[marker] = now - self.t0
                self._changed.notify_all()

    @property
    def serial(self) -> "Process":
        """The guest's console, as MicroVM.serial: here the process's stdin and stdout."""
        return self

    def write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read(self) -> bytes:
        """stdout since the last read() or expect(); moves past it."""
        with self._changed:
            data = bytes(self.out[self.position:])
            self.position = len(self.out)
        return data

    def expect(self, pattern: bytes | str | re.Pattern, timeout: float = 30.0,
               since: int | None = None) -> re.Match:
        """Wait for a regex (or literal bytes) on stdout after `since` (default: the end of
        the last read() or expect()); returns the match (positions are absolute in
        `out`) and moves past it.  AssertionError at timeout or when stdout ends first."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        start = self.position if since is None else since
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = regex.search(self.out, start)
                if found:
                    self.position = found.end()
                    return found
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    break
                self._changed.wait(left)
        self.proc.poll()
        raise AssertionError(f"{regex.pattern!r} not seen; status {self.proc.returncode}; "
                             f"stdout tail: {bytes(self.out[-3000:])!r}; stderr: "
                             f"{self.stderr()[-3000:]!r}")

    def wait_marker(self, marker: bytes, timeout: float) -> float | None:
        """Seconds from spawn to the read that completed `marker` (one of `markers`),
        or None if it did not come within timeout (or stdout ended)."""
        with self._changed:
            self._changed.wait_for(lambda: marker in self.seen or self.eof, timeout)
            return self.seen.get(marker)

    # -- the process ---------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        """The exit status (subprocess.TimeoutExpired after timeout), stdout drained."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def wait_exit(self, timeout: float) -> float | None:
        """Seconds from spawn to the process's exit, or None if it runs on after timeout."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        exited = time.perf_counter() - self.t0
        self._reader.join(5)
        return exited

    def wait_for_socket(self, path: str | os.PathLike, timeout: float = 30.0,
                        interval: float = 0.002) -> float | None:
        """Seconds from spawn until a Unix socket at path accepts a connection (tried
        every `interval` s), or None if the process exits or timeout passes first."""
        deadline = self.t0 + timeout
        while time.perf_counter() < deadline and self.proc.poll() is None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                try:
                    sock.connect(os.fspath(path))
                    return time.perf_counter() - self.t0
                except OSError:
                    pass
            time.sleep(interval)
        return None

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stderr_data(self) -> bytes:
        """Everything the process wrote on stderr so far."""
        if self._err_data is not None:
            return self._err_data
        return os.pread(self._err.fileno(), 1 << 24, 0)

    def stderr(self) -> str:
        return self.stderr_data().decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL to the process's session (it and what it started); reaps it.
        AssertionError, with where its threads sleep in the kernel, if it outlives the
        SIGKILL by KILL_GRACE seconds: a test fails instead of waiting forever."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"pid {self.proc.pid} ({' '.join(self.argv[:4])} ...) still runs "
                    f"{KILL_GRACE} s after SIGKILL, stuck in the host kernel: "
                    f"{kernel_waits(self.proc.pid)}") from None

    def close(self) -> None:
        """Kill if still running, drain stdout, keep stderr, release the pipes and file."""
        try:
            self.kill()
        finally:
            self._release()

    def _release(self) -> None:
        self._reader.join(10)
        if self._err_data is None:
            self._err_data = self.stderr_data()
            self._err.close()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


KILL_GRACE = 60.0     # s: a SIGKILLed process is gone in milliseconds unless the kernel holds it


def kernel_waits(pid: int) -> str:
    """Each thread's state, wait channel and kernel stack (root reads those): what
    holds a process that a SIGKILL did not end."""
    lines = []
    try:
        tasks = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError as exc:
        return f"/proc/{pid}: {exc.strerror}"
    for tid in tasks[:16]:
        base = f"/proc/{pid}/task/{tid}"
        parts = []
        for name in ("comm", "wchan", "stack"):
            try:
                with open(f"{base}/{name}") as f:
                    parts.append(f.read().strip().replace("\n", " | ")[:600])
            except OSError as exc:
                parts.append(f"({name}: {exc.strerror})")
        try:
            with open(f"{base}/stat") as f:
                parts.insert(1, "state " + f.read().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            pass
        lines.append(f"[{tid}] " + "; ".join(parts))
    return "\n".join(lines)


def run_pyvmm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m pyvmm ARGS` with stdin /dev/null, to its end; stdout and stderr as text.
    subprocess.TimeoutExpired (the process killed) after timeout seconds."""
    with Process(pyvmm_command() + list(args), stdin=False) as proc:
        code = proc.wait(timeout)
    return subprocess.CompletedProcess(proc.argv, code, proc.out.decode(errors="replace"),
                                       proc.stderr())


__all__ = ["Process", "pyvmm_command", "run_pyvmm"]

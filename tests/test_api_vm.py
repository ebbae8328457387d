"""The API process on a real VM: `pyvmm api` and `pyvmm run --config-file`.

The tiny echo guest (test_microvm.py) makes the lifecycle fast: configure,
InstanceStart, serial through the process's stdin/stdout, pause (the guest
stops echoing), resume, and a guest-side reset that ends the process with 0.

One test boots Linux (about a minute on KVM PVM hosts): the built-in guest,
configured and started through `pyvmm api`.  It is configured by replaying,
PUT by PUT, the same JSON that test_the_config_file_* hands to `pyvmm run
--config-file`; that config-file path is checked here on the echo guest, not
by a second Linux boot, to keep to one slow boot.  Both paths go through
VmSpec.to_vm_config(), the one conversion to the VMM's configuration.
"""
from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvmm import builtin_guest
from pyvmm.api.client import ApiClient
from pyvmm.config import DEFAULT_BOOT_ARGS
from test_api import check_response
from test_microvm import write_echo_guest

pytestmark = pytest.mark.kvm

# PVM: ~45-60 s to /init alone, many minutes on a loaded host; hardware KVM: under a second.
# The same knob as tests/linux_guest.py.
LINUX_BOOT_TIMEOUT = float(os.environ.get("PYVMM_BOOT_TIMEOUT", 1200))


class Process:
    """A pyvmm process with its console on stdin/stdout, its stdout collected."""

    def __init__(self, *args: str) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "pyvmm", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.out = bytearray()
        self.err = b""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return
            with self._lock:
                self.out += chunk

    def write(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def expect(self, marker: bytes | re.Pattern, timeout: float, since: int = 0) -> int:
        """Wait for marker (bytes or a regex) on stdout after position `since`;
        returns the position after it."""
        regex = marker if isinstance(marker, re.Pattern) else re.compile(re.escape(marker))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.proc.poll() is not None
            if exited:
                time.sleep(0.2)                  # let the reader drain the pipe
            with self._lock:
                found = regex.search(self.out, since)
            if found:
                return found.end()
            if exited:
                break
            time.sleep(0.02)
        raise AssertionError(f"{marker!r} not seen; status {self.proc.poll()}; stdout tail: "
                             f"{bytes(self.out[-3000:])!r}; stderr: {self.stderr()!r}")

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        if not self.err:
            self.err = self.proc.stderr.read()
        return self.err.decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


def wait_for_socket(path: Path, proc: Process, timeout: float = 30) -> float:
    """Seconds from the process's start until the socket accepts a connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
            return time.monotonic() - proc.started
        except OSError:
            if proc.proc.poll() is not None:
                raise AssertionError(f"pyvmm exited with {proc.proc.returncode}: "
                                     f"{proc.stderr()}") from None
            time.sleep(0.002)
    raise AssertionError(f"{path} never accepted a connection")


class Api(ApiClient):
    def call(self, method, url, body=None, expect=None):
        status, payload = self.request(method, url, body)
        check_response(method, url, status, payload)
        if expect is not None:
            assert status == expect, f"{method} {url} -> {status} {payload}"
        return payload


def replay(api: Api, config: dict) -> None:
    """Configure through the API from a config file's JSON, route by route."""
    api.call("PUT", "/boot-source", config["boot-source"], 204)
    if config.get("machine-config"):
        api.call("PUT", "/machine-config", config["machine-config"], 204)
    for drive in config.get("drives") or []:
        api.call("PUT", f"/drives/{drive['drive_id']}", drive, 204)
    for iface in config.get("network-interfaces") or []:
        api.call("PUT", f"/network-interfaces/{iface['iface_id']}", iface, 204)
    for name in ("entropy", "vsock", "logger", "metrics", "serial"):
        if config.get(name) is not None:
            api.call("PUT", f"/{name}", config[name], 204)


@pytest.fixture
def echo_config(tmp_path) -> dict:
    return {"boot-source": {"kernel_image_path": write_echo_guest(tmp_path / "echo.elf"),
                            "boot_args": "console=ttyS0"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 32}}


@pytest.fixture
def processes():
    started: list[Process] = []
    yield started
    for proc in started:
        proc.kill()


def test_api_process_lifecycle_with_the_echo_guest(tmp_path, echo_config, processes):
    sock = tmp_path / "api.sock"
    proc = Process("api", "--api-sock", str(sock), "--id", "echo-vm")
    processes.append(proc)
    wait_for_socket(sock, proc)
    metrics = tmp_path / "metrics.ndjson"
    with Api(str(sock)) as api:
        assert api.call("GET", "/", expect=200)["state"] == "Not started"
        replay(api, echo_config)
        api.call("PUT", "/metrics", {"metrics_path": str(metrics)}, 204)
        api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
        info = api.call("GET", "/", expect=200)
        assert (info["id"], info["state"]) == ("echo-vm", "Running")
        proc.write(b"ping\n")
        at = proc.expect(b"ping\n", 30)
        api.call("PATCH", "/vm", {"state": "Paused"}, 204)
        assert api.call("GET", "/", expect=200)["state"] == "Paused"
        proc.write(b"during pause\n")
        time.sleep(0.5)
        assert b"during pause" not in proc.out[at:], "a paused guest echoed"
        api.call("PATCH", "/vm", {"state": "Resumed"}, 204)
        proc.expect(b"during pause\n", 30, at)
        api.call("PUT", "/actions", {"action_type": "FlushMetrics"}, 204)
        line = json.loads(metrics.read_text().splitlines()[-1])
        assert line["devices"]["serial"]["requests"] > 0 and len(line["vcpus"]) == 2
        assert line["vmm"] == {"id": "echo-vm", "state": "Running"}
        config = api.call("GET", "/vm/config", expect=200)
        assert config["machine-config"]["vcpu_count"] == 2
        proc.write(b"!")                         # the guest resets: the process exits 0
        assert proc.wait(30) == 0, proc.stderr()
    assert not sock.exists()
    assert json.loads(metrics.read_text().splitlines()[-1])["vmm"]["state"] == "Exited"


def test_the_config_file_boots_without_an_api(tmp_path, echo_config, processes):
    config_file = tmp_path / "vm.json"
    config_file.write_text(json.dumps(echo_config))
    proc = Process("run", "--config-file", str(config_file), "--no-api")
    processes.append(proc)
    proc.write(b"from the config file\n")
    proc.expect(b"from the config file\n", 60)
    proc.write(b"!")
    assert proc.wait(30) == 0, proc.stderr()


def test_run_with_a_config_file_serves_it_on_the_api(tmp_path, echo_config, processes):
    config_file = tmp_path / "vm.json"
    config_file.write_text(json.dumps(echo_config))
    sock = tmp_path / "api.sock"
    proc = Process("run", "--config-file", str(config_file), "--api-sock", str(sock),
                   "--console", "stdio")
    processes.append(proc)
    wait_for_socket(sock, proc)
    with Api(str(sock)) as api:
        deadline = time.monotonic() + 30
        while api.call("GET", "/", expect=200)["state"] != "Running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        config = api.call("GET", "/vm/config", expect=200)
        assert config["boot-source"] == {**echo_config["boot-source"], "initrd_path": None}
        assert config["machine-config"]["mem_size_mib"] == 32
        fault = api.call("PUT", "/boot-source", echo_config["boot-source"], 400)
        assert "after starting" in fault["fault_message"]
        api.call("PATCH", "/vm", {"state": "Paused"}, 204)
        api.call("PATCH", "/vm", {"state": "Resumed"}, 204)
    proc.write(b"!")
    assert proc.wait(30) == 0, proc.stderr()


def test_socket_ready_time(tmp_path, processes, record_property):
    """From process start (fork+exec of `python -m pyvmm api`) until the API socket
    accepts a connection: the median of five runs."""
    times = []
    for run in range(5):
        sock = tmp_path / f"api{run}.sock"
        proc = Process("api", "--api-sock", str(sock), "--console", "none")
        processes.append(proc)
        times.append(wait_for_socket(sock, proc))
        proc.proc.terminate()
        proc.wait(10)
    median = statistics.median(times)
    record_property("socket_ready_median_s", median)
    print(f"\nAPI socket ready after {median * 1000:.0f} ms (median of "
          f"{', '.join(f'{t * 1000:.0f}' for t in times)} ms)")
    assert median < 2.0


# -- the one Linux boot --------------------------------------------------------------------------

@pytest.mark.linux
def test_linux_through_the_api_configure_start_pause_resume_ctrl_alt_del(tmp_path, processes):
    guest = builtin_guest.find_guest()
    if guest is None:
        pytest.fail("the built-in guest is not built: run `pyvmm guest build` (.ci/run does)")
    # The JSON a config file would hold (see the module docstring).
    config = {"boot-source": {"kernel_image_path": str(guest.vmlinux),
                              "initrd_path": str(guest.initramfs),
                              "boot_args": DEFAULT_BOOT_ARGS},
              "machine-config": {"vcpu_count": 2, "mem_size_mib": 256}}
    sock = tmp_path / "api.sock"
    metrics = tmp_path / "metrics.ndjson"
    proc = Process("api", "--api-sock", str(sock))
    processes.append(proc)
    wait_for_socket(sock, proc)
    with Api(str(sock)) as api:
        replay(api, config)
        api.call("PUT", "/metrics", {"metrics_path": str(metrics)}, 204)
        exported = api.call("GET", "/vm/config", expect=200)
        assert exported["boot-source"] == config["boot-source"]
        assert exported["machine-config"] == {**config["machine-config"], "smt": False,
                                              "track_dirty_pages": False, "huge_pages": "None"}
        started = time.monotonic()
        api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
        at = proc.expect(b"PYVMM-INIT-OK", LINUX_BOOT_TIMEOUT)
        print(f"\nInstanceStart to PYVMM-INIT-OK: {time.monotonic() - started:.1f} s")
        at = proc.expect(b"# ", 120, at)         # the shell's prompt
        uptime_before, at = shell(proc, "cat /proc/uptime", at)
        host_before = time.monotonic()
        api.call("PATCH", "/vm", {"state": "Paused"}, 204)
        assert api.call("GET", "/", expect=200)["state"] == "Paused"
        paused_at = len(proc.out)
        time.sleep(3)
        assert len(proc.out) == paused_at, "a paused guest wrote to its console"
        api.call("PATCH", "/vm", {"state": "Resumed"}, 204)
        assert api.call("GET", "/", expect=200)["state"] == "Running"
        # the serial console still works after resume
        proc.write(b"echo after-resume-$((1+1))\n")
        at = proc.expect(b"after-resume-2", 120, at)
        # the guest's clock did not jump: it went forward, by no more than the host's
        uptime_after, at = shell(proc, "cat /proc/uptime", at)
        host_elapsed = time.monotonic() - host_before
        guest_elapsed = float(uptime_after.split()[0]) - float(uptime_before.split()[0])
        print(f"across a 3 s pause: guest clock +{guest_elapsed:.2f} s, host +{host_elapsed:.2f} s")
        assert 0 <= guest_elapsed <= host_elapsed + 1.0
        api.call("PUT", "/actions", {"action_type": "FlushMetrics"}, 204)
        line = json.loads(metrics.read_text().splitlines()[-1])
        assert sum(sum(v["exits"].values()) for v in line["vcpus"]) > 0
        assert line["devices"]["serial"]["tx_bytes"] > 0
        # Ctrl-Alt-Del on the i8042 keyboard: the kernel signals /init, which
        # syncs and reboots, and the VMM process ends with status 0.
        api.call("PUT", "/actions", {"action_type": "SendCtrlAltDel"}, 204)
        proc.expect(b"pyvmm-init: Ctrl-Alt-Del", 300, at)
        assert proc.wait(300) == 0, proc.stderr()
    assert not sock.exists()


def shell(proc: Process, command: str, since: int, timeout: float = 120) -> tuple[str, int]:
    """Run a command at the guest's shell; (its output, the position after it)."""
    tag = f"T{time.monotonic_ns() % 10**9}"
    # The echo of the typed line has "{tag}-start;", the output "{tag}-start\r\n".
    proc.write(f"echo {tag}-start; {command}; echo {tag}-end\n".encode())
    start = proc.expect(re.compile(f"{tag}-start\r?\n".encode()), timeout, since)
    end = proc.expect(f"{tag}-end".encode(), timeout, start)
    return bytes(proc.out[start:end - len(tag) - 4]).decode(errors="replace"), end

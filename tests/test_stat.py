"""Live statistics: GET /pyvmm/stats (on a stand-in VM, checked against the OpenAPI
document), `pyvmm stat`'s table, and, with KVM, `pyvmm stat --once` against a running
echo guest (a tiny PVH kernel: milliseconds to boot) that `pyvmm run --trace` also
traces, so the CLI's trace path is checked end to end without booting Linux; the
refreshing view ends by itself when the VM does."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm.cli_stat import Poll, render
from tests.framework.api import CheckedClient
from tests.test_api_routes import configure

ROOT = Path(__file__).resolve().parent.parent


def test_the_stats_route_gives_the_counters_and_a_clock(api, api_files):
    before = api.payload("GET", "/pyvmm/stats", expect=200)
    assert (before["state"], before["exits"], before["stats"]) == ("Not started", {}, {})
    configure(api, api_files)
    api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
    after = api.payload("GET", "/pyvmm/stats", expect=200)
    assert after["state"] == "Running" and after["exits"] == {"IO": 3}
    assert after["devices"] == {"serial": 3, "i8042": 0}
    assert after["stats"]["serial_tx_bytes"] == 3 and "trace" not in after
    assert after["monotonic_ns"] > before["monotonic_ns"]
    fault = api.payload("PUT", "/pyvmm/stats", {}, 400)
    assert "Invalid request method and/or path: PUT pyvmm." == fault["fault_message"]


def test_the_table_has_totals_and_rates_per_reason_and_device():
    before = Poll("Running", 0, {"IO": 100, "HLT": 2}, {"serial": 60, "i8042": 0})
    now = Poll("Running", 2_000_000_000, {"IO": 300, "HLT": 2, "MMIO": 10},
               {"serial": 160, "i8042": 0, "virtio-blk": 10})
    text = render(Path("s.sock"), now, before)
    assert text.startswith("pyvmm stat s.sock: Running, 312 exits, 105/s")
    assert re.search(r"^IO\s+300\s+100$", text, re.M)
    assert re.search(r"^HLT\s+2\s+0$", text, re.M)
    assert re.search(r"^MMIO\s+10\s+5$", text, re.M)
    assert re.search(r"^serial\s+160\s+50$", text, re.M)
    assert "i8042" not in text                  # devices never used are left out


def pyvmm(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_stat_without_a_vm_is_one_line(tmp_path):
    result = pyvmm("stat", "--api-sock", str(tmp_path / "none.sock"), "--once")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "cannot reach the API" in result.stderr


@pytest.mark.kvm
def test_stat_once_and_the_trace_of_a_running_echo_guest(tmp_path, echo_kernel, spawn_pyvmm):
    sock, trace = tmp_path / "api.sock", tmp_path / "echo.trace"
    proc = spawn_pyvmm("run", "--kernel", echo_kernel, "--mem", "32", "--api-sock", str(sock),
                       "--console", "stdio", "--trace", str(trace))
    assert proc.wait_for_socket(sock, 30) is not None, proc.stderr()
    with CheckedClient(str(sock)) as api:
        deadline = time.monotonic() + 30
        while api.payload("GET", "/", expect=200)["state"] != "Running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.write(b"hello\n")
        proc.expect(b"hello\n", 30)
        stats = api.payload("GET", "/pyvmm/stats", expect=200)
        assert stats["exits"]["IO"] > 0 and stats["devices"]["serial"] > 0
        # An exit is counted as it comes and recorded once handled: one may be between.
        assert stats["trace"]["recorded"] >= stats["exits"]["IO"] - 1 and \
            stats["trace"]["dropped"] == 0
    result = pyvmm("stat", "--api-sock", str(sock), "--once", "--interval", "0.3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"pyvmm stat {sock}: Running, ")
    assert re.search(r"^IO\s+\d+\s+\d+$", result.stdout, re.M), result.stdout
    assert re.search(r"^serial\s+\d+\s+\d+$", result.stdout, re.M), result.stdout
    # The refreshing view, left running: it ends by itself, with status 0, with the VM.
    live = spawn_pyvmm("stat", "--api-sock", str(sock), "--interval", "0.2", stdin=False)
    live.expect(b"exit reason", 30)
    proc.write(b"!")                             # the guest resets: the process exits 0
    assert proc.wait(30) == 0, proc.stderr()
    assert live.wait(30) == 0, live.stderr()
    assert "the VM has ended" in live.stderr()
    assert re.search(r"pyvmm: trace: \d+ exits written to ", proc.stderr())
    summary = pyvmm("trace", str(trace), "--top", "5")
    assert summary.returncode == 0, summary.stderr
    # The echo guest reads each of "hello\n!" from RBR and writes back all but the '!'.
    assert re.search(r"pio\s+0x3f8\s+serial\s+13\s+7\s+6$", summary.stdout, re.M), \
        summary.stdout
    assert re.search(r"pio\s+0x64\s+i8042\s+1\s+0\s+1$", summary.stdout, re.M)

"""The API process on a real VM: `pyvmm api` and `pyvmm run --config-file`.

The tiny echo guest (framework.images) makes the lifecycle fast: configure,
InstanceStart, serial through the process's stdin/stdout, pause (the guest
stops echoing), resume, and a guest-side reset that ends the process with 0.

One test boots Linux (about a minute on KVM PVM hosts): the built-in guest,
configured and started through `pyvmm api`.  It is configured by replaying,
PUT by PUT, the same JSON that test_the_config_file_* hands to `pyvmm run
--config-file`; that config-file path is checked here on the echo guest, not
by a second Linux boot, to keep to one slow boot.  Both paths build the same
pyvmm.config.VmSpec, the one model the VM is built from.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from pyvmm.config import DEFAULT_BOOT_ARGS
from tests.framework.api import CheckedClient
from tests.framework.microvm import BOOT_TIMEOUT, INIT_MARKER, run_in_shell
from tests.framework.process import Process, pyvmm_command

pytestmark = pytest.mark.kvm


def wait_for_socket(path, proc: Process, timeout: float = 30) -> float:
    """Seconds from the process's start until the socket accepts a connection."""
    ready = proc.wait_for_socket(path, timeout)
    assert ready is not None, (f"{path} never accepted a connection; pyvmm's status "
                               f"{proc.returncode}: {proc.stderr()}")
    return ready


def replay(api: CheckedClient, config: dict) -> None:
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
def echo_config(echo_kernel) -> dict:
    return {"boot-source": {"kernel_image_path": echo_kernel, "boot_args": "console=ttyS0"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 32}}


def test_api_process_lifecycle_with_the_echo_guest(tmp_path, echo_config, spawn_pyvmm):
    sock = tmp_path / "api.sock"
    proc = spawn_pyvmm("api", "--api-sock", str(sock), "--id", "echo-vm")
    wait_for_socket(sock, proc)
    metrics = tmp_path / "metrics.ndjson"
    with CheckedClient(str(sock)) as api:
        assert api.payload("GET", "/", expect=200)["state"] == "Not started"
        replay(api, echo_config)
        api.call("PUT", "/metrics", {"metrics_path": str(metrics)}, 204)
        api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
        info = api.payload("GET", "/", expect=200)
        assert (info["id"], info["state"]) == ("echo-vm", "Running")
        proc.write(b"ping\n")
        at = proc.expect(b"ping\n", 30).end()
        api.call("PATCH", "/vm", {"state": "Paused"}, 204)
        assert api.payload("GET", "/", expect=200)["state"] == "Paused"
        proc.write(b"during pause\n")
        time.sleep(0.5)
        assert b"during pause" not in proc.out[at:], "a paused guest echoed"
        api.call("PATCH", "/vm", {"state": "Resumed"}, 204)
        proc.expect(b"during pause\n", 30, at)
        api.call("PUT", "/actions", {"action_type": "FlushMetrics"}, 204)
        line = json.loads(metrics.read_text().splitlines()[-1])
        assert line["devices"]["serial"]["requests"] > 0 and len(line["vcpus"]) == 2
        assert line["vmm"] == {"id": "echo-vm", "state": "Running"}
        config = api.payload("GET", "/vm/config", expect=200)
        assert config["machine-config"]["vcpu_count"] == 2
        proc.write(b"!")                         # the guest resets: the process exits 0
        assert proc.wait(30) == 0, proc.stderr()
    assert not sock.exists()
    assert json.loads(metrics.read_text().splitlines()[-1])["vmm"]["state"] == "Exited"


def test_the_config_file_boots_without_an_api(tmp_path, echo_config, spawn_pyvmm):
    config_file = tmp_path / "vm.json"
    config_file.write_text(json.dumps(echo_config))
    proc = spawn_pyvmm("run", "--config-file", str(config_file), "--no-api")
    proc.write(b"from the config file\n")
    proc.expect(b"from the config file\n", 60)
    proc.write(b"!")
    assert proc.wait(30) == 0, proc.stderr()


def test_run_with_a_config_file_serves_it_on_the_api(tmp_path, echo_config, spawn_pyvmm):
    config_file = tmp_path / "vm.json"
    config_file.write_text(json.dumps(echo_config))
    sock = tmp_path / "api.sock"
    proc = spawn_pyvmm("run", "--config-file", str(config_file), "--api-sock", str(sock),
                       "--console", "stdio")
    wait_for_socket(sock, proc)
    with CheckedClient(str(sock)) as api:
        deadline = time.monotonic() + 30
        while api.payload("GET", "/", expect=200)["state"] != "Running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        config = api.payload("GET", "/vm/config", expect=200)
        assert config["boot-source"] == {**echo_config["boot-source"], "initrd_path": None}
        assert config["machine-config"]["mem_size_mib"] == 32
        fault = api.payload("PUT", "/boot-source", echo_config["boot-source"], 400)
        assert "after starting" in fault["fault_message"]
        api.call("PATCH", "/vm", {"state": "Paused"}, 204)
        api.call("PATCH", "/vm", {"state": "Resumed"}, 204)
    proc.write(b"!")
    assert proc.wait(30) == 0, proc.stderr()


# -- the one Linux boot --------------------------------------------------------------------------

@pytest.mark.linux
def test_linux_through_the_api_configure_start_pause_resume_ctrl_alt_del(tmp_path, guest,
                                                                         spawn_pyvmm):
    # The JSON a config file would hold (see the module docstring).
    config = {"boot-source": {"kernel_image_path": str(guest.vmlinux),
                              "initrd_path": str(guest.initramfs),
                              "boot_args": DEFAULT_BOOT_ARGS},
              "machine-config": {"vcpu_count": 2, "mem_size_mib": 256}}
    sock = tmp_path / "api.sock"
    metrics = tmp_path / "metrics.ndjson"
    proc = spawn_pyvmm("api", "--api-sock", str(sock))
    wait_for_socket(sock, proc)
    with CheckedClient(str(sock)) as api:
        replay(api, config)
        api.call("PUT", "/metrics", {"metrics_path": str(metrics)}, 204)
        # a real virtio-vsock device: the busybox /init starts the agent for it
        vsock = {"guest_cid": 3, "uds_path": str(tmp_path / "vsock.sock")}
        api.call("PUT", "/vsock", vsock, 204)
        exported = api.payload("GET", "/vm/config", expect=200)
        assert exported["vsock"] == vsock
        assert exported["boot-source"] == config["boot-source"]
        assert exported["machine-config"] == {**config["machine-config"], "smt": False,
                                              "track_dirty_pages": False, "huge_pages": "None"}
        started = time.monotonic()
        api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
        proc.expect(INIT_MARKER, BOOT_TIMEOUT)
        print(f"\nInstanceStart to {INIT_MARKER.decode()}: {time.monotonic() - started:.1f} s")
        proc.expect(b"# ", 120)                  # the shell's prompt
        uptime_before = run_in_shell(proc, "cat /proc/uptime")
        host_before = time.monotonic()
        api.call("PATCH", "/vm", {"state": "Paused"}, 204)
        assert api.payload("GET", "/", expect=200)["state"] == "Paused"
        paused_at = len(proc.out)
        time.sleep(3)
        assert len(proc.out) == paused_at, "a paused guest wrote to its console"
        api.call("PATCH", "/vm", {"state": "Resumed"}, 204)
        assert api.payload("GET", "/", expect=200)["state"] == "Running"
        # the serial console still works after resume
        proc.write(b"echo after-resume-$((1+1))\n")
        proc.expect(b"after-resume-2", 120)
        # the guest's clock did not jump: it went forward, by no more than the host's
        uptime_after = run_in_shell(proc, "cat /proc/uptime")
        host_elapsed = time.monotonic() - host_before
        guest_elapsed = float(uptime_after.split()[0]) - float(uptime_before.split()[0])
        print(f"across a 3 s pause: guest clock +{guest_elapsed:.2f} s, host +{host_elapsed:.2f} s")
        assert 0 <= guest_elapsed <= host_elapsed + 1.0
        # `pyvmm exec --api-sock` finds the vsock socket through GET /vm/config and runs a
        # command through the guest's agent: its output, its stderr and its exit code
        executed = subprocess.run(
            pyvmm_command() + ["exec", "--api-sock", str(sock), "--connect-timeout", "120",
                               "--", "sh", "-c", "uname -s; echo to-stderr >&2; exit 7"],
            capture_output=True, timeout=300)
        assert (executed.stdout, executed.stderr, executed.returncode) == \
            (b"Linux\n", b"to-stderr\n", 7), executed.stderr
        api.call("PUT", "/actions", {"action_type": "FlushMetrics"}, 204)
        line = json.loads(metrics.read_text().splitlines()[-1])
        assert sum(sum(v["exits"].values()) for v in line["vcpus"]) > 0
        assert line["devices"]["serial"]["tx_bytes"] > 0
        # Ctrl-Alt-Del on the i8042 keyboard: the kernel signals /init, which
        # syncs and reboots, and the VMM process ends with status 0.
        api.call("PUT", "/actions", {"action_type": "SendCtrlAltDel"}, 204)
        proc.expect(b"pyvmm-init: Ctrl-Alt-Del", 300)
        assert proc.wait(300) == 0, proc.stderr()
    assert not sock.exists()

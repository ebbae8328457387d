"""`pyvmm run` flags and `pyvmm api`: the flags build the same model as a config
file, and every mistake is one line on stderr with status 2, no traceback.
(Boots through the CLI are in test_api_vm.py.)"""
from __future__ import annotations

import json
import signal
import socket
import time

import pytest

from pyvmm.cli import _build_parser, spec_from_args
from pyvmm.config import DEFAULT_BOOT_ARGS
from tests.framework.process import run_pyvmm as pyvmm


@pytest.fixture
def files(tmp_path):
    (tmp_path / "vmlinux").write_bytes(b"kernel")
    (tmp_path / "initrd").write_bytes(b"initrd")
    (tmp_path / "root.img").write_bytes(bytes(8192))
    return tmp_path


def test_run_flags_build_the_config_file_model(files):
    args = _build_parser().parse_args([
        "run", "--kernel", str(files / "vmlinux"), "--initrd", str(files / "initrd"),
        "--cmdline", "quiet", "--mem", "1G", "--cpus", "2", "--rng",
        "--disk", f"{files / 'root.img'},root,id=rootfs", "--net", "tap=tap0,mac=06:00:00:00:00:01"])
    spec = spec_from_args(args)
    config = spec.to_json()
    assert config["boot-source"]["boot_args"] == f"{DEFAULT_BOOT_ARGS} quiet"
    assert config["machine-config"]["mem_size_mib"] == 1024
    assert config["drives"][0]["is_root_device"] and config["entropy"] == {}
    assert config["network-interfaces"] == [{"iface_id": "eth0", "host_dev_name": "tap0",
                                             "guest_mac": "06:00:00:00:00:01"}]
    (files / "vm.json").write_text(json.dumps(config))
    from_file = spec_from_args(_build_parser().parse_args(
        ["run", "--config-file", str(files / "vm.json")]))
    assert from_file.to_json() == config


def test_run_defaults_are_unchanged(files):
    spec = spec_from_args(_build_parser().parse_args(["run", "--kernel", str(files / "vmlinux")]))
    assert (spec.machine_config.vcpu_count, spec.machine_config.mem_size_mib) == (1, 256)
    assert spec.boot_source.boot_args == DEFAULT_BOOT_ARGS and spec.drives == {}


@pytest.mark.parametrize("args, words", [
    (["run", "--kernel", "{d}/vmlinux", "--disk", "{d}/nope.img"], "does not exist"),
    (["run", "--kernel", "{d}/vmlinux", "--disk", "{d}/root.img,fast"], "unknown option"),
    (["run", "--kernel", "{d}/vmlinux", "--net", "tap0"], "bad option"),
    (["run", "--kernel", "{d}/vmlinux", "--net", "tap=tap0,mac=xx"], "not a MAC"),
    (["run", "--kernel", "{d}/vmlinux", "--cpus", "40"], "out of range"),
    (["run", "--kernel", "{d}/vmlinux", "--initrd", "{d}/nope"], "initrd_path"),
    (["run", "--config-file", "{d}/vm.json", "--cpus", "2"], "cannot be combined"),
    (["run", "--config-file", "{d}/missing.json"], "cannot read config file"),
    (["run", "--config-file", "{d}/bad.json"], "not valid JSON"),
    (["run", "--config-file", "{d}/vm.json", "--no-api", "--api-sock", "{d}/s"], "contradict"),
    (["run", "--kernel", "{d}/vmlinux", "--console", "tty"], "bad --console"),
    (["run", "--kernel", "{d}/vmlinux", "--id", "not valid!"], "instance id"),
    (["api"], "--api-sock"),
    (["api", "--api-sock", "{d}/no/such/dir/api.sock"], "No such file"),
])
def test_cli_mistakes_are_one_line(files, args, words):
    (files / "vm.json").write_text(json.dumps(
        {"boot-source": {"kernel_image_path": str(files / "vmlinux")}}))
    (files / "bad.json").write_text("{")
    result = pyvmm(*[a.format(d=files) for a in args])
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert words in lines[0], lines[0]


def test_api_refuses_a_socket_path_that_is_in_use(files):
    path = files / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        result = pyvmm("api", "--api-sock", str(path))
    assert result.returncode == 2 and "another process is serving" in result.stderr
    (files / "plain").write_text("x")
    result = pyvmm("api", "--api-sock", str(files / "plain"))
    assert result.returncode == 2 and "not a socket" in result.stderr


def test_api_process_stops_on_sigterm_and_removes_its_socket(files, spawn_pyvmm):
    path = files / "api.sock"
    proc = spawn_pyvmm("api", "--api-sock", str(path), stdin=False)
    deadline = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < deadline and proc.returncode is None
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) != 0
    assert not path.exists()
    assert "Traceback" not in proc.stderr()


def test_help_lists_the_new_flags():
    result = pyvmm("run", "--help")
    for flag in ("--disk", "--net", "--rng", "--config-file", "--no-api", "--api-sock"):
        assert flag in result.stdout
    assert "--api-sock" in pyvmm("api", "--help").stdout

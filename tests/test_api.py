"""The REST API without KVM: every route's success and error cases, responses
checked against pyvmm/api/openapi.json, the HTTP layer's handling of malformed
requests, and hypothesis on request bodies.

The server runs in this process over a MicroVM whose vm_factory is a stand-in
for pyvmm.vmm.LinuxVm, so the lifecycle (InstanceStart, pause, resume, PATCH
/drives after start) is exercised without booting anything; the real VMM
behind the same routes is tested in test_api_vm.py.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.api.client import ApiClient
from pyvmm.api.schema import openapi, request_schema, response_schema, route, validate
from pyvmm.api.server import ApiServer
from pyvmm.config import VmSpec
from pyvmm.microvm import MicroVM


class FakeResult:
    exit_code, reason, outcome = 0, "stopped by the host", None


class FakeSerial:
    def __init__(self) -> None:
        self.output = lambda data: None


class FakeLinuxVm:
    """Stands in for pyvmm.vmm.LinuxVm: records calls, never touches KVM."""
    instances: list["FakeLinuxVm"] = []

    def __init__(self, config) -> None:
        self.config = config
        self.calls: list[str] = []
        self.serial = FakeSerial()
        self.pvm = False
        self.sent = b""
        self.drives: dict[str, Path] = {}
        self._done = threading.Event()
        FakeLinuxVm.instances.append(self)

    def start(self): self.calls.append("start")
    def pause(self): self.calls.append("pause")
    def resume(self): self.calls.append("resume")
    def stop(self): self.calls.append("stop"); self._done.set()
    def send(self, data): self.sent += data
    def close(self): self.calls.append("close")
    def update_drive(self, drive_id, path): self.drives[drive_id] = path
    def send_ctrl_alt_del(self): self.calls.append("ctrl-alt-del")

    def wait(self, timeout=None):
        return FakeResult() if self._done.wait(timeout) else None

    def stats(self):
        return {"vcpus": [{"IO": 3}], "devices": {"serial": 3, "i8042": 0},
                "unhandled": {"pio": 0, "mmio": 0}, "pvm_fixups": {}, "serial_tx_bytes": 3,
                "virtio": {"drive:rootfs": {"requests": 2, "bytes_read": 1024}}}


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF not really")
    (tmp_path / "initrd").write_bytes(b"07070100")
    (tmp_path / "rootfs.img").write_bytes(bytes(1 << 20))
    (tmp_path / "data.img").write_bytes(bytes(1 << 20))
    return tmp_path


def _serve(tmp_path, **options):
    vm = MicroVM.unconfigured()
    vm.vm_factory = FakeLinuxVm
    server = ApiServer(vm, str(tmp_path / "api.sock"), **options)
    server.start()
    return vm, server


@pytest.fixture
def api(files):
    vm, server = _serve(files, request_timeout=1.0, idle_timeout=5.0)
    client = Checked(server.path)
    yield client
    client.close()
    server.close()
    vm.close()


class Checked(ApiClient):
    """An ApiClient whose every exchange is checked against the OpenAPI document:
    the request body (when it is meant to be valid), the status and the response."""

    def call(self, method: str, url: str, body=None, expect: int | None = None, raw=None):
        status, payload = self.request(method, url, body, raw=raw)
        if expect is not None:
            assert status == expect, f"{method} {url} -> {status} {payload}"
        check_response(method, url, status, payload)
        if expect in (200, 204) and body is not None:
            schema = request_schema(method, url)
            assert schema is not None and not validate(body, schema), \
                f"a request the server accepted breaks the document: {validate(body, schema)}"
        return status, payload


def check_response(method: str, url: str, status: int, payload) -> None:
    if status == 400:
        assert isinstance(payload, dict) and not validate(payload, {"$ref":
                                                          "#/components/schemas/Error"}), payload
        assert payload["fault_message"]
        return
    found, schema = response_schema(method, url.split("?")[0], status)
    assert found, f"{method} {url} answered {status}, which the document does not describe"
    if schema is None:
        assert payload is None, f"{method} {url}: {status} must have no body"
    else:
        errors = validate(payload, schema)
        assert not errors, f"{method} {url}: {errors}"


def configure(api: Checked, files: Path) -> None:
    api.call("PUT", "/boot-source", {"kernel_image_path": str(files / "vmlinux"),
                                     "initrd_path": str(files / "initrd"),
                                     "boot_args": "console=ttyS0 reboot=k"}, 204)
    api.call("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}, 204)
    api.call("PUT", "/drives/rootfs", {"drive_id": "rootfs", "is_root_device": True,
                                       "path_on_host": str(files / "rootfs.img"),
                                       "is_read_only": False}, 204)


# -- the document itself -------------------------------------------------------------------

def test_the_document_is_openapi_3_and_refs_resolve():
    doc = openapi()
    assert doc["openapi"].startswith("3.")
    text = json.dumps(doc)
    for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in doc["components"]["schemas"], name
    for template, item in doc["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            assert "400" in operation["responses"], (template, method)


def test_the_document_and_the_model_agree_on_fields():
    """The request schemas list exactly the fields pyvmm.config accepts."""
    from pyvmm import config
    schemas = openapi()["components"]["schemas"]
    for schema, section in (("BootSource", config.BootSource),
                            ("MachineConfiguration", config.MachineConfig),
                            ("Drive", config.Drive), ("NetworkInterface", config.NetworkInterface),
                            ("EntropyDevice", config.Entropy), ("Vsock", config.Vsock),
                            ("Logger", config.Logger), ("Metrics", config.Metrics),
                            ("SerialDevice", config.SerialConfig)):
        assert set(schemas[schema]["properties"]) == set(section.FIELDS), schema
        assert set(schemas[schema].get("required", [])) == \
            {name for name, (_, required) in section.FIELDS.items() if required}, schema
    assert set(schemas["PartialDrive"]["properties"]) == set(config.Drive.PATCH_FIELDS)


def test_the_validator_catches_what_it_should():
    info = {"$ref": "#/components/schemas/InstanceInfo"}
    good = {"id": "a", "state": "Running", "vmm_version": "1", "app_name": "pyvmm"}
    assert validate(good, info) == []
    assert validate({**good, "state": "Dancing"}, info)
    assert validate({**good, "extra": 1}, info)
    assert validate({k: v for k, v in good.items() if k != "id"}, info)
    assert validate({"vcpu_count": True, "mem_size_mib": 128},
                    {"$ref": "#/components/schemas/MachineConfiguration"})
    assert route("/drives/abc") == "/drives/{drive_id}" and route("/drives/a/b") is None


# -- every route ------------------------------------------------------------------------------

def test_get_instance_and_version(api):
    _, info = api.call("GET", "/", expect=200)
    assert info == {"id": "anonymous-instance", "state": "Not started",
                    "vmm_version": info["vmm_version"], "app_name": "pyvmm"}
    _, version = api.call("GET", "/version", expect=200)
    assert version["firecracker_version"].startswith("1.")


def test_boot_source(api, files):
    api.call("PUT", "/boot-source", {"kernel_image_path": str(files / "vmlinux")}, 204)
    _, config = api.call("GET", "/vm/config", expect=200)
    assert config["boot-source"] == {"kernel_image_path": str(files / "vmlinux"),
                                     "initrd_path": None, "boot_args": None}
    for body, words in [({}, "missing field 'kernel_image_path'"),
                        ({"kernel_image_path": str(files / "nope")}, "does not exist"),
                        ({"kernel_image_path": str(files)}, "not a regular file"),
                        ({"kernel_image_path": 7}, "must be a string"),
                        ({"kernel_image_path": str(files / "vmlinux"),
                          "initrd_path": "/nonexistent"}, "initrd_path"),
                        ({"kernel_image_path": str(files / "vmlinux"), "boot_arg": "x"},
                         "unknown field 'boot_arg'"),
                        ([1, 2], "expected a JSON object")]:
        _, fault = api.call("PUT", "/boot-source", body, 400)
        assert words in fault["fault_message"], (body, fault)


def test_machine_config_get_put_patch(api):
    _, mc = api.call("GET", "/machine-config", expect=200)
    assert (mc["vcpu_count"], mc["mem_size_mib"], mc["smt"]) == (1, 128, False)
    api.call("PUT", "/machine-config", {"vcpu_count": 3, "mem_size_mib": 512,
                                        "track_dirty_pages": True}, 204)
    api.call("PATCH", "/machine-config", {"mem_size_mib": 256}, 204)
    _, mc = api.call("GET", "/machine-config", expect=200)
    assert (mc["vcpu_count"], mc["mem_size_mib"], mc["track_dirty_pages"]) == (3, 256, True)
    # PUT resets omitted optional fields to their defaults, as in Firecracker
    api.call("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 128, "smt": True}, 204)
    assert api.call("GET", "/machine-config")[1]["track_dirty_pages"] is False
    for method, body, words in [
            ("PUT", {"vcpu_count": 0, "mem_size_mib": 128}, "out of range"),
            ("PUT", {"vcpu_count": 33, "mem_size_mib": 128}, "out of range"),
            ("PUT", {"vcpu_count": 3, "mem_size_mib": 128, "smt": True}, "even"),
            ("PATCH", {"vcpu_count": 5}, "even"),            # smt is still on
            ("PUT", {"vcpu_count": 1, "mem_size_mib": 8}, "mem_size_mib 8 is out of range"),
            ("PUT", {"vcpu_count": 1}, "missing field 'mem_size_mib'"),
            ("PUT", {"vcpu_count": True, "mem_size_mib": 128}, "must be an integer"),
            ("PUT", {"vcpu_count": 1.0, "mem_size_mib": 128}, "must be an integer"),
            ("PATCH", {"mem_size_mib": "128"}, "must be an integer"),
            ("PATCH", {"smt": 1}, "must be a boolean"),
            ("PATCH", {"huge_pages": "2M"}, "not supported yet"),
            ("PATCH", {"huge_pages": "1G"}, "must be None, Transparent or 2M"),
            ("PATCH", {"cpu_template": "T2"}, "not supported yet"),
            ("PATCH", {"vcpus": 2}, "unknown field 'vcpus'")]:
        _, fault = api.call(method, "/machine-config", body, 400)
        assert words in fault["fault_message"], (body, fault)
    # a refused PATCH changes nothing
    assert api.call("GET", "/machine-config")[1]["vcpu_count"] == 2


def test_drives(api, files):
    root = {"drive_id": "rootfs", "path_on_host": str(files / "rootfs.img"),
            "is_root_device": True, "is_read_only": False}
    data = {"drive_id": "data", "path_on_host": str(files / "data.img"),
            "is_root_device": False, "is_read_only": True, "cache_type": "Unsafe",
            "io_engine": "Sync", "rate_limiter": None, "partuuid": None}
    api.call("PUT", "/drives/data", data, 204)
    api.call("PUT", "/drives/rootfs", root, 204)
    api.call("PUT", "/drives/rootfs", root, 204)               # same id: replaced
    _, config = api.call("GET", "/vm/config", expect=200)
    assert [d["drive_id"] for d in config["drives"]] == ["rootfs", "data"]   # root first
    assert config["drives"][1]["is_read_only"] is True
    os.chmod(files / "data.img", 0o444)
    writable_needed = {**data, "drive_id": "data2", "is_read_only": False}
    for url, body, words in [
            ("/drives/other", root, "does not match"),
            ("/drives/second_root", {**root, "drive_id": "second_root"}, "root device already"),
            ("/drives/x", {**data, "drive_id": "x", "path_on_host": str(files / "none")},
             "does not exist"),
            ("/drives/bad-id", {**data, "drive_id": "bad-id"}, "invalid"),
            ("/drives/x", {**data, "drive_id": "x", "is_root_device": "yes"}, "boolean"),
            ("/drives/x", {k: v for k, v in data.items() if k != "is_root_device"} |
             {"drive_id": "x"}, "missing field 'is_root_device'"),
            ("/drives/x", {**data, "drive_id": "x", "io_engine": "Async"}, "not supported yet"),
            ("/drives/x", {**data, "drive_id": "x", "cache_type": "Writeback"},
             "not supported yet"),
            ("/drives/x", {**data, "drive_id": "x", "rate_limiter": {"bandwidth": {}}},
             "not supported yet"),
            ("/drives/x", {**data, "drive_id": "x", "socket": "/tmp/vhost"}, "vhost-user"),
            ("/drives/x", {**data, "drive_id": "x", "unknown": 1}, "unknown field")]:
        _, fault = api.call("PUT", url, body, 400)
        assert words in fault["fault_message"], (url, fault)
    if os.geteuid() != 0:           # root may write anything
        _, fault = api.call("PUT", "/drives/data2", writable_needed, 400)
        assert "writable" in fault["fault_message"]
    # PATCH is for after start only
    _, fault = api.call("PATCH", "/drives/rootfs", {"drive_id": "rootfs",
                                                    "path_on_host": str(files / "data.img")}, 400)
    assert "before starting" in fault["fault_message"]


def test_network_interfaces(api):
    eth0 = {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}
    api.call("PUT", "/network-interfaces/eth0", eth0, 204)
    api.call("PUT", "/network-interfaces/eth1", {"iface_id": "eth1", "host_dev_name": "tap1"},
             204)
    _, config = api.call("GET", "/vm/config", expect=200)
    assert config["network-interfaces"] == [eth0, {"iface_id": "eth1", "host_dev_name": "tap1"}]
    for url, body, words in [
            ("/network-interfaces/eth9", eth0, "does not match"),
            ("/network-interfaces/eth2", {**eth0, "iface_id": "eth2"}, "already used by eth0"),
            ("/network-interfaces/eth2", {"iface_id": "eth2", "host_dev_name": "tap2",
                                          "guest_mac": "06:00:ac:10:00:02"}, "already used"),
            ("/network-interfaces/eth2", {"iface_id": "eth2", "host_dev_name": "tap2",
                                          "guest_mac": "zz:00:00:00:00:00"}, "not a MAC"),
            ("/network-interfaces/eth2", {"iface_id": "eth2", "host_dev_name": "tap2",
                                          "guest_mac": "01:00:00:00:00:00"}, "multicast"),
            ("/network-interfaces/eth2", {"iface_id": "eth2", "host_dev_name": "x" * 16},
             "not a valid interface name"),
            ("/network-interfaces/eth2", {"iface_id": "eth2", "host_dev_name": "a/b"},
             "not a valid interface name"),
            ("/network-interfaces/eth2", {"iface_id": "eth2", "host_dev_name": "tap2",
                                          "mtu": 1500}, "not supported yet"),
            ("/network-interfaces/eth2", {"iface_id": "eth2"}, "missing field")]:
        _, fault = api.call("PUT", url, body, 400)
        assert words in fault["fault_message"], (body, fault)
    _, fault = api.call("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"}, 400)
    assert "not supported yet" in fault["fault_message"]


def test_entropy_vsock_serial(api, files):
    api.call("PUT", "/entropy", {}, 204)
    api.call("PUT", "/entropy", {"rate_limiter": None}, 204)
    api.call("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(files / "v.sock")}, 204)
    api.call("PUT", "/serial", {"serial_out_path": str(files / "console.log")}, 204)
    _, config = api.call("GET", "/vm/config", expect=200)
    assert config["entropy"] == {} and config["vsock"]["guest_cid"] == 3
    assert config["serial"] == {"serial_out_path": str(files / "console.log")}
    for url, body, words in [
            ("/entropy", {"rate_limiter": {"ops": {"size": 1, "refill_time": 1}}},
             "not supported yet"),
            ("/entropy", {"foo": 1}, "unknown field"),
            ("/vsock", {"guest_cid": 2, "uds_path": "/tmp/x"}, "out of range"),
            ("/vsock", {"guest_cid": "3", "uds_path": "/tmp/x"}, "integer"),
            ("/vsock", {"guest_cid": 3}, "missing field 'uds_path'"),
            ("/serial", {"serial_out_path": "/nonexistent/dir/log"}, "not a directory"),
            ("/serial", {"serial_out_path": str(files)}, "is a directory"),
            ("/serial", {"rate_limiter": {"size": 1, "refill_time": 1}}, "not supported yet")]:
        _, fault = api.call("PUT", url, body, 400)
        assert words in fault["fault_message"], (url, body, fault)


def test_logger_and_metrics(api, files):
    log_path, metrics_path = files / "fc.log", files / "metrics.fifo"
    os.mkfifo(metrics_path)
    reader = os.open(metrics_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        api.call("PUT", "/logger", {"log_path": str(log_path), "level": "debug",
                                    "show_level": True, "show_log_origin": False}, 204)
        api.call("PUT", "/metrics", {"metrics_path": str(metrics_path)}, 204)
        _, fault = api.call("PUT", "/metrics", {"metrics_path": str(files / "m2")}, 400)
        assert "already" in fault["fault_message"]
        _, fault = api.call("PUT", "/logger", {"level": "Loud"}, 400)
        assert "not one of" in fault["fault_message"]
        api.call("PUT", "/actions", {"action_type": "FlushMetrics"}, 204)
        line = json.loads(os.read(reader, 65536).decode().splitlines()[0])
        assert line["vmm"]["state"] == "Not started" and line["api_server"]["requests"] >= 3
        assert "utc_timestamp_ms" in line
        _, config = api.call("GET", "/vm/config", expect=200)
        assert config["logger"]["level"] == "Debug"
        assert config["metrics"] == {"metrics_path": str(metrics_path)}
        text = log_path.read_text()
        assert "PUT /metrics -> 400" in text and ":WARNING]" in text and "fc_api" in text
    finally:
        os.close(reader)


def test_lifecycle_through_the_api(api, files):
    """InstanceStart, pre-boot resources refused after it, pause/resume, PATCH
    /drives, SendCtrlAltDel, metrics with the VM's counters (a stand-in VM)."""
    metrics = files / "metrics.json"
    configure(api, files)
    api.call("PUT", "/metrics", {"metrics_path": str(metrics)}, 204)
    _, fault = api.call("PATCH", "/vm", {"state": "Paused"}, 400)
    assert "before starting" in fault["fault_message"]
    api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
    fake = FakeLinuxVm.instances[-1]
    assert fake.calls == ["start"]
    assert (fake.config.vcpus, fake.config.mem_mib, fake.config.cmdline) == \
        (2, 256, "console=ttyS0 reboot=k")
    assert [(d.drive_id, d.is_root) for d in fake.config.drives] == [("rootfs", True)]
    assert api.call("GET", "/")[1]["state"] == "Running"
    for url, body in [("/boot-source", {"kernel_image_path": str(files / "vmlinux")}),
                      ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
                      ("/drives/d2", {"drive_id": "d2", "path_on_host": str(files / "data.img"),
                                      "is_root_device": False}),
                      ("/network-interfaces/e", {"iface_id": "e", "host_dev_name": "tap9"}),
                      ("/entropy", {}), ("/vsock", {"guest_cid": 9, "uds_path": "/tmp/v"}),
                      ("/logger", {"level": "Info"}), ("/metrics", {"metrics_path": "/tmp/m"}),
                      ("/serial", {}), ("/actions", {"action_type": "InstanceStart"})]:
        _, fault = api.call("PUT", url, body, 400)
        assert fault["fault_message"] == \
            "The requested operation is not supported after starting the microVM.", url
    _, fault = api.call("PATCH", "/machine-config", {"vcpu_count": 1}, 400)
    assert "after starting" in fault["fault_message"]
    api.call("PATCH", "/vm", {"state": "Paused"}, 204)
    assert api.call("GET", "/")[1]["state"] == "Paused"
    api.call("PATCH", "/vm", {"state": "Paused"}, 204)          # already paused: fine
    api.call("PATCH", "/vm", {"state": "Resumed"}, 204)
    assert api.call("GET", "/")[1]["state"] == "Running"
    assert fake.calls == ["start", "pause", "resume"]
    for body in [{"state": "Stopped"}, {"state": "paused"}, {}, {"state": "Paused", "x": 1}]:
        api.call("PATCH", "/vm", body, 400)
    api.call("PATCH", "/drives/rootfs", {"drive_id": "rootfs",
                                         "path_on_host": str(files / "data.img")}, 204)
    assert fake.drives == {"rootfs": files / "data.img"}
    _, config = api.call("GET", "/vm/config", expect=200)
    assert config["drives"][0]["path_on_host"] == str(files / "data.img")
    for body, words in [({"drive_id": "nope", "path_on_host": str(files / "data.img")},
                         "does not match"),
                        ({"drive_id": "rootfs", "path_on_host": "/nonexistent"}, "does not exist"),
                        ({"drive_id": "rootfs", "is_read_only": True}, "unknown field")]:
        _, fault = api.call("PATCH", "/drives/rootfs", body, 400)
        assert words in fault["fault_message"]
    _, fault = api.call("PATCH", "/drives/ghost", {"drive_id": "ghost"}, 400)
    assert "does not exist" in fault["fault_message"]
    api.call("PUT", "/actions", {"action_type": "SendCtrlAltDel"}, 204)
    assert fake.calls[-1] == "ctrl-alt-del"
    api.call("PUT", "/actions", {"action_type": "FlushMetrics"}, 204)
    line = json.loads(metrics.read_text().splitlines()[-1])
    assert line["vmm"]["state"] == "Running"
    assert line["vcpus"] == [{"exits": {"IO": 3}}]
    assert line["devices"]["serial"] == {"requests": 3, "tx_bytes": 3}
    assert line["devices"]["drive:rootfs"] == {"requests": 2, "bytes_read": 1024}
    api.call("PUT", "/actions", {"action_type": "FlushMetrics"}, 204)
    line = json.loads(metrics.read_text().splitlines()[-1])
    assert line["devices"]["serial"] == {"requests": 0, "tx_bytes": 0}     # per period


def test_instance_start_errors(api, files):
    _, fault = api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 400)
    assert "boot source" in fault["fault_message"]
    for body in [{"action_type": "Reboot"}, {"action_type": 1}, {}, {"action_type": "FlushMetrics",
                                                                    "extra": True}, "x"]:
        api.call("PUT", "/actions", body, 400)
    assert api.call("GET", "/")[1]["state"] == "Not started"


def test_unsupported_and_unknown_routes(api):
    for method, url in [("PUT", "/snapshot/create"), ("PUT", "/snapshot/load"),
                        ("PUT", "/balloon"), ("GET", "/balloon/statistics"),
                        ("PUT", "/mmds"), ("PUT", "/mmds/config"), ("PUT", "/cpu-config"),
                        ("PUT", "/pmem/p0"), ("PUT", "/hotplug/memory")]:
        _, fault = api.call(method, url, {"x": 1}, 400)
        assert "not supported yet" in fault["fault_message"], url
    for method, url in [("GET", "/nothing"), ("DELETE", "/drives/x"), ("POST", "/actions"),
                        ("GET", "/actions"), ("GET", "/drives/x/y"), ("PUT", "/")]:
        _, fault = api.call(method, url, {"x": 1} if method in ("PUT", "POST") else None, 400)
        assert "Invalid request method and/or path" in fault["fault_message"], url


def test_bad_bodies(api):
    for raw, words in [(b"", "empty"), (b"{", "not valid JSON"), (b"\xff\xfe", "UTF-8"),
                       (b'{"vcpu_count": NaN, "mem_size_mib": 1}', "NaN"),
                       (b'{"vcpu_count": 1, "vcpu_count": 2, "mem_size_mib": 128}',
                        "duplicate field"),
                       (b"[" * 25000 + b"]" * 25000, "nested too deeply")]:
        status, fault = api.request("PUT", "/machine-config", raw=raw)
        assert status == 400 and words in fault["fault_message"], (raw[:20], fault)
    assert api.call("GET", "/")[0] == 200


# -- HTTP on the wire --------------------------------------------------------------------------

def raw_exchange(path: str, data: bytes, timeout: float = 5.0, read_all: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                return out
            if not chunk:
                return out
            out += chunk
            if not read_all:
                return out


def test_get_with_content_length_zero_and_connection_close(api):
    reply = raw_exchange(api.path, b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
                                   b"Connection: close\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head
    assert json.loads(body)["state"] == "Not started"         # and the server closed it


def test_keep_alive_pipelined_requests(api):
    one = b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /machine-config HTTP/1.1\r\nConnection: close\r\n\r\n"
    reply = raw_exchange(api.path, one * 3 + last)
    assert reply.count(b"HTTP/1.1 200 OK") == 4


def test_put_with_expect_100_continue(api, files):
    body = json.dumps({"vcpu_count": 2, "mem_size_mib": 256}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(api.path)
        sock.sendall(b"PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(1000).startswith(b"HTTP/1.1 204 ")


@pytest.mark.parametrize("request_bytes", [
    b"garbage\r\n\r\n",
    b"GET /\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
    b"PUT /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"PUT /vm HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n",
    b"PUT /vm HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"PUT /vm HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
    b"G\xc3\xa9T / HTTP/1.1\r\n\r\n",
    b"\x00\x01\x02\r\n\r\n",
], ids=["no-version-garbage", "http09", "http2", "bad-header", "negative-length",
        "bad-length", "conflicting-lengths", "chunked", "huge-length", "huge-head",
        "non-ascii", "binary"])
def test_malformed_requests_get_400_and_the_server_lives(api, request_bytes):
    reply = raw_exchange(api.path, request_bytes)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b"fault_message" in reply
    assert api.call("GET", "/", expect=200)


def test_a_body_over_the_limit_is_refused(api):
    raw = json.dumps({"kernel_image_path": "x" * 60000}).encode()
    status, fault = api.request("PUT", "/boot-source", raw=raw)
    assert status == 400 and "larger than" in fault["fault_message"]
    assert api.call("GET", "/", expect=200)


def test_a_slow_client_is_cut_off_and_others_are_served_meanwhile(api):
    """request_timeout is 1 s here: a client that stops half-way gets a 400 and a
    closed connection, and never blocks anyone else."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.settimeout(10)
        slow.connect(api.path)
        slow.sendall(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu")
        started = time.monotonic()
        assert api.call("GET", "/", expect=200)         # served while the slow one waits
        reply = slow.recv(1000)
        assert reply.startswith(b"HTTP/1.1 400 ") and b"in time" in reply
        assert slow.recv(1000) == b""                    # closed
        assert time.monotonic() - started < 5
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dribble:
        dribble.settimeout(10)
        dribble.connect(api.path)
        started = time.monotonic()
        try:
            for _ in range(40):                          # a byte every 0.1 s never ends
                dribble.sendall(b"G")
                time.sleep(0.1)
        except OSError:
            pass                                         # cut off: good
        assert time.monotonic() - started < 3.5
        assert dribble.recv(1000).startswith(b"HTTP/1.1 400 ")


def test_too_many_connections_are_dropped_not_queued(files):
    vm, server = _serve(files, max_connections=4, idle_timeout=30)
    socks = []
    try:
        for _ in range(4):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(server.path)
            socks.append(sock)
        time.sleep(0.2)
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.settimeout(5)
        extra.connect(server.path)
        assert extra.recv(100) == b""                    # dropped at once
        extra.close()
        socks.pop().close()                              # a slot frees up
        time.sleep(0.2)
        with ApiClient(server.path) as client:
            assert client.get("/")[0] == 200
    finally:
        for sock in socks:
            sock.close()
        server.close()
        vm.close()


def test_a_stale_socket_file_is_replaced_and_a_live_one_is_not(files):
    path = files / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()                                        # the file stays, nobody listens
    vm, server = _serve(files)
    try:
        with pytest.raises(OSError, match="another process"):
            ApiServer(MicroVM.unconfigured(), str(path)).start()
        assert ApiClient(str(path)).get("/")[0] == 200
    finally:
        server.close()
        vm.close()
    assert not path.exists()                             # removed at close


# -- hypothesis ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=12)
FIELD_NAMES = ["kernel_image_path", "boot_args", "initrd_path", "vcpu_count", "mem_size_mib",
               "smt", "track_dirty_pages", "huge_pages", "drive_id", "path_on_host",
               "is_root_device", "is_read_only", "iface_id", "host_dev_name", "guest_mac",
               "guest_cid", "uds_path", "action_type", "state", "metrics_path", "log_path",
               "level", "serial_out_path", "rate_limiter"]
typed_objects = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=6)
ROUTES = [("PUT", "/boot-source"), ("PUT", "/machine-config"), ("PATCH", "/machine-config"),
          ("PUT", "/drives/d0"), ("PATCH", "/drives/d0"), ("PUT", "/network-interfaces/eth0"),
          ("PUT", "/entropy"), ("PUT", "/vsock"), ("PUT", "/actions"), ("PATCH", "/vm"),
          ("PUT", "/logger"), ("PUT", "/metrics"), ("PUT", "/serial"),
          ("PUT", "/snapshot/create")]


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory):
    """One server for all hypothesis examples: a server that survives them all."""
    directory = tmp_path_factory.mktemp("hyp")
    vm, server = _serve(directory, request_timeout=2.0)
    client = Checked(server.path)
    yield client, vm
    client.close()
    server.close()
    vm.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route_=st.sampled_from(ROUTES), body=st.one_of(json_values, typed_objects))
def test_random_bodies_get_204_or_400_never_a_crash(shared_api, route_, body):
    client, vm = shared_api
    method, url = route_
    if url == "/actions" and isinstance(body, dict) and body.get("action_type") == \
            "InstanceStart":
        body = {**body, "action_type": "FlushMetrics"}   # keep the VM unstarted
    status, payload = client.call(method, url, body)
    assert status in (204, 400)
    if status == 204:
        schema = request_schema(method, url)
        assert not validate(body, schema), (method, url, body)
    assert client.get("/")[0] == 200
    assert vm.state == "Not started"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_on_the_wire_never_hang_or_kill_the_server(shared_api, data):
    client, _ = shared_api
    reply = raw_exchange(client.path, data + b"\r\n\r\n", timeout=5.0)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 "), reply[:100]
    assert client.get("/")[0] == 200


def test_vm_config_round_trips_through_a_config_file(api, files):
    configure(api, files)
    api.call("PUT", "/entropy", {}, 204)
    api.call("PUT", "/vsock", {"guest_cid": 5, "uds_path": "/tmp/v.sock"}, 204)
    _, config = api.call("GET", "/vm/config", expect=200)
    assert VmSpec.from_json(json.dumps(config)).to_json() == config

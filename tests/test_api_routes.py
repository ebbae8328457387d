"""The REST API's routes without KVM: every route's success and error cases,
responses checked against pyvmm/api/openapi.json, and hypothesis on request
bodies.

The server runs in this process over a MicroVM whose vm_factory is a stand-in
for pyvmm.builder.LinuxVm (framework.api.FakeLinuxVm), so the lifecycle
(InstanceStart, pause, resume, PATCH /drives after start) is exercised
without booting anything; the real VMM behind the same routes is tested in
test_api_vm.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.api.schema import request_schema, validate
from pyvmm.config import VmSpec
from tests.framework.api import CheckedClient, FakeLinuxVm


def configure(api: CheckedClient, api_files: Path) -> None:
    api.call("PUT", "/boot-source", {"kernel_image_path": str(api_files / "vmlinux"),
                                     "initrd_path": str(api_files / "initrd"),
                                     "boot_args": "console=ttyS0 reboot=k"}, 204)
    api.call("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}, 204)
    api.call("PUT", "/drives/rootfs", {"drive_id": "rootfs", "is_root_device": True,
                                       "path_on_host": str(api_files / "rootfs.img"),
                                       "is_read_only": False}, 204)


# -- every route ------------------------------------------------------------------------------

def test_get_instance_and_version(api):
    _, info = api.call("GET", "/", expect=200)
    assert info == {"id": "anonymous-instance", "state": "Not started",
                    "vmm_version": info["vmm_version"], "app_name": "pyvmm"}
    _, version = api.call("GET", "/version", expect=200)
    assert version["firecracker_version"].startswith("1.")


def test_boot_source(api, api_files):
    api.call("PUT", "/boot-source", {"kernel_image_path": str(api_files / "vmlinux")}, 204)
    _, config = api.call("GET", "/vm/config", expect=200)
    assert config["boot-source"] == {"kernel_image_path": str(api_files / "vmlinux"),
                                     "initrd_path": None, "boot_args": None}
    for body, words in [({}, "missing field 'kernel_image_path'"),
                        ({"kernel_image_path": str(api_files / "nope")}, "does not exist"),
                        ({"kernel_image_path": str(api_files)}, "not a regular file"),
                        ({"kernel_image_path": 7}, "must be a string"),
                        ({"kernel_image_path": str(api_files / "vmlinux"),
                          "initrd_path": "/nonexistent"}, "initrd_path"),
                        ({"kernel_image_path": str(api_files / "vmlinux"), "boot_arg": "x"},
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
    api.call("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 128, "smt": False}, 204)
    assert api.call("GET", "/machine-config")[1]["track_dirty_pages"] is False
    for method, body, words in [
            ("PUT", {"vcpu_count": 0, "mem_size_mib": 128}, "out of range"),
            ("PUT", {"vcpu_count": 33, "mem_size_mib": 128}, "out of range"),
            ("PUT", {"vcpu_count": 2, "mem_size_mib": 128, "smt": True},
             "smt true is not supported yet"),
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


def test_drives(api, api_files):
    root = {"drive_id": "rootfs", "path_on_host": str(api_files / "rootfs.img"),
            "is_root_device": True, "is_read_only": False}
    data = {"drive_id": "data", "path_on_host": str(api_files / "data.img"),
            "is_root_device": False, "is_read_only": True, "cache_type": "Unsafe",
            "io_engine": "Sync", "rate_limiter": None, "partuuid": None}
    api.call("PUT", "/drives/data", data, 204)
    api.call("PUT", "/drives/rootfs", root, 204)
    api.call("PUT", "/drives/rootfs", root, 204)               # same id: replaced
    _, config = api.call("GET", "/vm/config", expect=200)
    assert [d["drive_id"] for d in config["drives"]] == ["rootfs", "data"]   # root first
    assert config["drives"][1]["is_read_only"] is True
    os.chmod(api_files / "data.img", 0o444)
    writable_needed = {**data, "drive_id": "data2", "is_read_only": False}
    for url, body, words in [
            ("/drives/other", root, "does not match"),
            ("/drives/second_root", {**root, "drive_id": "second_root"}, "root device already"),
            ("/drives/x", {**data, "drive_id": "x", "path_on_host": str(api_files / "none")},
             "does not exist"),
            ("/drives/bad-id", {**data, "drive_id": "bad-id"},
             "alphanumeric characters and underscores"),     # Firecracker's words
            ("/drives/x", {**data, "drive_id": "x", "partuuid": "a b"}, "partuuid"),
            ("/drives/x", {**data, "drive_id": "x", "is_root_device": "yes"}, "boolean"),
            ("/drives/x", {k: v for k, v in data.items() if k != "is_root_device"} |
             {"drive_id": "x"}, "missing field 'is_root_device'"),
            ("/drives/x", {**data, "drive_id": "x", "io_engine": "async"},
             "io_engine must be Sync or Async"),
            ("/drives/x", {**data, "drive_id": "x", "cache_type": "Writeback!"},
             "cache_type must be Unsafe or Writeback"),
            ("/drives/x", {**data, "drive_id": "x", "rate_limiter": {"bandwidth": {}}},
             "missing field 'size'"),
            ("/drives/x", {**data, "drive_id": "x", "socket": "/tmp/vhost"}, "vhost-user"),
            ("/drives/x", {**data, "drive_id": "x", "unknown": 1}, "unknown field")]:
        _, fault = api.call("PUT", url, body, 400)
        assert words in fault["fault_message"], (url, fault)
    if os.geteuid() != 0:           # root may write anything
        _, fault = api.call("PUT", "/drives/data2", writable_needed, 400)
        assert "writable" in fault["fault_message"]
    # PATCH is for after start only
    _, fault = api.call("PATCH", "/drives/rootfs",
                        {"drive_id": "rootfs", "path_on_host": str(api_files / "data.img")}, 400)
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
    assert "before starting" in fault["fault_message"]


def test_entropy_vsock_serial(api, api_files):
    api.call("PUT", "/entropy", {}, 204)
    api.call("PUT", "/entropy", {"rate_limiter": None}, 204)
    api.call("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(api_files / "v.sock")}, 204)
    api.call("PUT", "/serial", {"serial_out_path": str(api_files / "console.log")}, 204)
    _, config = api.call("GET", "/vm/config", expect=200)
    assert config["entropy"] == {} and config["vsock"]["guest_cid"] == 3
    assert config["serial"] == {"serial_out_path": str(api_files / "console.log")}
    for url, body, words in [
            ("/entropy", {"rate_limiter": {"ops": {"size": -1, "refill_time": 1}}},
             "out of range"),
            ("/entropy", {"foo": 1}, "unknown field"),
            ("/vsock", {"guest_cid": 2, "uds_path": "/tmp/x"}, "out of range"),
            ("/vsock", {"guest_cid": "3", "uds_path": "/tmp/x"}, "integer"),
            ("/vsock", {"guest_cid": 3}, "missing field 'uds_path'"),
            ("/serial", {"serial_out_path": "/nonexistent/dir/log"}, "not a directory"),
            ("/serial", {"serial_out_path": str(api_files)}, "is a directory"),
            ("/serial", {"rate_limiter": {"refill_time": 1}}, "missing field 'size'")]:
        _, fault = api.call("PUT", url, body, 400)
        assert words in fault["fault_message"], (url, body, fault)


def test_logger_and_metrics(api, api_files):
    log_path, metrics_path = api_files / "fc.log", api_files / "metrics.fifo"
    os.mkfifo(metrics_path)
    reader = os.open(metrics_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        api.call("PUT", "/logger", {"log_path": str(log_path), "level": "debug",
                                    "show_level": True, "show_log_origin": False}, 204)
        api.call("PUT", "/metrics", {"metrics_path": str(metrics_path)}, 204)
        _, fault = api.call("PUT", "/metrics", {"metrics_path": str(api_files / "m2")}, 400)
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


def test_lifecycle_through_the_api(api, api_files):
    """InstanceStart, pre-boot resources refused after it, pause/resume, PATCH
    /drives, SendCtrlAltDel, metrics with the VM's counters (a stand-in VM)."""
    metrics = api_files / "metrics.json"
    configure(api, api_files)
    api.call("PUT", "/metrics", {"metrics_path": str(metrics)}, 204)
    _, fault = api.call("PATCH", "/vm", {"state": "Paused"}, 400)
    assert "before starting" in fault["fault_message"]
    api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
    fake = FakeLinuxVm.instances[-1]
    assert fake.calls == ["start"]
    spec = fake.spec
    assert (spec.machine_config.vcpu_count, spec.machine_config.mem_size_mib,
            spec.boot_source.boot_args) == (2, 256, "console=ttyS0 reboot=k")
    assert [(d.drive_id, d.is_root_device) for d in spec.ordered_drives()] == [("rootfs", True)]
    assert api.call("GET", "/")[1]["state"] == "Running"
    for url, body in [("/boot-source", {"kernel_image_path": str(api_files / "vmlinux")}),
                      ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
                      ("/drives/d2", {"drive_id": "d2", "path_on_host": str(api_files / "data.img"),
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
                                         "path_on_host": str(api_files / "data.img")}, 204)
    assert fake.drives == {"rootfs": api_files / "data.img"}
    _, config = api.call("GET", "/vm/config", expect=200)
    assert config["drives"][0]["path_on_host"] == str(api_files / "data.img")
    for body, words in [({"drive_id": "nope", "path_on_host": str(api_files / "data.img")},
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


def test_instance_start_errors(api, api_files):
    _, fault = api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 400)
    assert "boot source" in fault["fault_message"]
    for body in [{"action_type": "Reboot"}, {"action_type": 1}, {}, {"action_type": "FlushMetrics",
                                                                    "extra": True}, "x"]:
        api.call("PUT", "/actions", body, 400)
    assert api.call("GET", "/")[1]["state"] == "Not started"


def test_unsupported_and_unknown_routes(api):
    for method, url in [("PUT", "/balloon"), ("GET", "/balloon/statistics"),
                        ("PUT", "/cpu-config"),
                        ("PUT", "/pmem/p0"), ("PUT", "/hotplug/memory")]:
        _, fault = api.call(method, url, None if method == "GET" else {"x": 1}, 400)
        assert "not supported yet" in fault["fault_message"], url


def test_routes_firecracker_has_not_are_answered_in_its_words(api, api_files):
    """Firecracker's ParsedRequest::try_from (api_server/parsed_request.rs): the
    method and the first path segment choose the route; a missing one is
    "Invalid request method and/or path: METHOD segment." (pyvmm.api.routing)."""
    body = {"x": 1}
    for method, url, sent, message in [
            ("GET", "/nothing", None, "Invalid request method and/or path: GET nothing."),
            ("GET", "/actions", None, "Invalid request method and/or path: GET actions."),
            ("GET", "/drives/x", None, "Invalid request method and/or path: GET drives."),
            ("GET", "/drives/x/y", None, "Invalid request method and/or path: GET drives."),
            ("GET", "/vm", None, "Invalid request method and/or path: GET vm."),
            ("DELETE", "/", None, "Invalid request method and/or path: DELETE ."),
            ("DELETE", "/vsock", None, "Invalid request method and/or path: DELETE vsock."),
            ("PUT", "/", body, "Invalid request method and/or path: PUT ."),
            ("PUT", "/vm", body, "Invalid request method and/or path: PUT vm."),
            ("PATCH", "/vsock", body, "Invalid request method and/or path: PATCH vsock."),
            ("PUT", "/snapshot/x", body, "Invalid request method and/or path: PUT /snapshot/x."),
            ("PUT", "/snapshot", body, "Missing snapshot operation type."),
            ("PUT", "/drives", body, "The ID cannot be empty."),
            ("PUT", "/drives//x", body, "The ID cannot be empty."),
            ("PATCH", "/network-interfaces/a-b", body,
             "API Resource IDs can only contain alphanumeric characters and underscores."),
            ("DELETE", "/drives/x", None,
             "The requested operation is not supported before starting the microVM.")]:
        _, fault = api.call(method, url, sent, 400)
        assert fault["fault_message"] == message, (method, url, fault)
    for method, url, raw, message in [
            ("POST", "/actions", b"{}", "Invalid HTTP Method: Unsupported HTTP method."),
            ("OPTIONS", "/", b"", "Invalid HTTP Method: Unsupported HTTP method."),
            ("PUT", "/nothing", b"", "Empty PUT request."),
            ("PATCH", "/vm", b"", "Empty PATCH request."),
            ("GET", "/", b"{}", "Invalid request.")]:
        status, fault = api.request(method, url, raw=raw)
        assert (status, fault) == (400, {"fault_message": message}), (method, url)
    # Firecracker reads no further than a route needs: PUT /vsock/x is PUT /vsock.
    status, _ = api.request("PUT", "/vsock/x", {"guest_cid": 3, "uds_path": "/tmp/v.sock"})
    assert status == 204 and api.payload("GET", "/vm/config")["vsock"]["guest_cid"] == 3
    status, _ = api.request("PUT", "/boot-source/", {"kernel_image_path":
                                                      str(api_files / "vmlinux")})
    assert status == 204 and api.request("GET", "/machine-config/x")[0] == 200


def test_bad_bodies(api):
    for raw, words in [(b"", "Empty PUT request."), (b"{", "not valid JSON"), (b"\xff\xfe", "UTF-8"),
                       (b'{"vcpu_count": NaN, "mem_size_mib": 1}', "NaN"),
                       (b'{"vcpu_count": 1, "vcpu_count": 2, "mem_size_mib": 128}',
                        "duplicate field"),
                       (b"[" * 25000 + b"]" * 25000, "nested too deeply")]:
        status, fault = api.request("PUT", "/machine-config", raw=raw)
        assert status == 400 and words in fault["fault_message"], (raw[:20], fault)
    assert api.call("GET", "/")[0] == 200


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
               "level", "serial_out_path", "rate_limiter", "snapshot_path", "mem_file_path",
               "snapshot_type", "mem_backend", "resume_vm", "network_overrides"]
typed_objects = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=6)
ROUTES = [("PUT", "/boot-source"), ("PUT", "/machine-config"), ("PATCH", "/machine-config"),
          ("PUT", "/drives/d0"), ("PATCH", "/drives/d0"), ("PUT", "/network-interfaces/eth0"),
          ("PUT", "/entropy"), ("PUT", "/vsock"), ("PUT", "/actions"), ("PATCH", "/vm"),
          ("PUT", "/logger"), ("PUT", "/metrics"), ("PUT", "/serial"),
          ("PUT", "/snapshot/create"), ("PUT", "/snapshot/load")]


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


def test_vm_config_round_trips_through_a_config_file(api, api_files):
    configure(api, api_files)
    api.call("PUT", "/entropy", {}, 204)
    api.call("PUT", "/vsock", {"guest_cid": 5, "uds_path": "/tmp/v.sock"}, 204)
    _, config = api.call("GET", "/vm/config", expect=200)
    assert VmSpec.from_json(json.dumps(config)).to_json() == config

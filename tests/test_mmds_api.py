"""MMDS through the API, the config file, the CLI and MicroVM (a stand-in VM: the
guest's side is tests/test_mmds_linux.py), answered as Firecracker answers."""
from __future__ import annotations

import json

import pytest

from pyvmm.config import ConfigError, VmSpec
from pyvmm.mmds.store import DEFAULT_SIZE_LIMIT
from pyvmm.microvm import MicroVM
from tests.framework.api import FakeLinuxVm
from tests.test_api_routes import configure

NET = {"iface_id": "eth0", "host_dev_name": "tap-mmds"}
CONFIG = {"version": "V2", "network_interfaces": ["eth0"]}


def test_the_data_store_before_start(api):
    assert api.payload("GET", "/mmds", expect=200) == {}
    api.call("PUT", "/mmds", {"latest": {"meta-data": {"id": "i-1", "tags": {"a": "1"}}}}, 204)
    api.call("PATCH", "/mmds", {"latest": {"meta-data": {"tags": {"a": None, "b": "2"}}}}, 204)
    assert api.payload("GET", "/mmds", expect=200) == \
        {"latest": {"meta-data": {"id": "i-1", "tags": {"b": "2"}}}}
    # GET /vm/config is configuration only: the data is not in it.
    assert api.payload("GET", "/vm/config", expect=200)["mmds-config"] is None


def test_the_store_limit_is_firecrackers_413(api):
    # The API's request body limit is the store's default limit (both 51200 bytes, as
    # in Firecracker), so it is a PATCH that makes the store outgrow it.
    half = "x" * (DEFAULT_SIZE_LIMIT // 2)
    api.call("PUT", "/mmds", {"a": half}, 204)
    _, fault = api.call("PATCH", "/mmds", {"b": half}, 413)
    assert "doesn't fit" in fault["fault_message"], fault
    assert api.payload("GET", "/mmds", expect=200) == {"a": half}     # unchanged


def test_mmds_config_is_validated_as_firecracker_does(api, api_files):
    configure(api, api_files)
    for body, words in [({"network_interfaces": ["eth0"]}, "'eth0'"),
                        ({"network_interfaces": []}, "network_interfaces"),
                        ({}, "network_interfaces"),
                        ({"network_interfaces": ["eth0"], "version": "V3"}, "version"),
                        ({"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"},
                         "ipv4_address"),
                        ({"network_interfaces": ["eth0"], "bogus": 1}, "bogus")]:
        _, fault = api.call("PUT", "/mmds/config", body, 400)
        assert words in fault["fault_message"], (body, fault)
    api.call("PUT", "/network-interfaces/eth0", NET, 204)
    api.call("PUT", "/mmds/config", {**CONFIG, "ipv4_address": "169.254.170.2",
                                     "imds_compat": True}, 204)
    config = api.payload("GET", "/vm/config", expect=200)["mmds-config"]
    assert config == {"version": "V2", "network_interfaces": ["eth0"],
                      "ipv4_address": "169.254.170.2", "imds_compat": True}
    _, fault = api.call("PUT", "/mmds/other", {"x": 1}, 400)
    assert fault["fault_message"] == "Unrecognized PUT request path `other`."


def test_after_start_the_data_changes_and_the_config_does_not(api, api_files):
    configure(api, api_files)
    api.call("PUT", "/network-interfaces/eth0", NET, 204)
    api.call("PUT", "/mmds/config", CONFIG, 204)
    api.call("PUT", "/mmds", {"id": "before"}, 204)
    api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
    fake = FakeLinuxVm.instances[-1]
    assert fake.mmds is not None and fake.mmds.get() == {"id": "before"}
    api.call("PATCH", "/mmds", {"id": "after"}, 204)
    assert fake.mmds.get() == {"id": "after"}            # the running VM's own store
    assert api.payload("GET", "/mmds", expect=200) == {"id": "after"}
    _, fault = api.call("PUT", "/mmds/config", CONFIG, 400)
    assert "after starting" in fault["fault_message"] or "started" in fault["fault_message"]


def test_after_start_without_mmds_the_store_is_not_initialized(api, api_files):
    configure(api, api_files)
    api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
    assert FakeLinuxVm.instances[-1].mmds is None
    for method, body in [("GET", None), ("PUT", {"a": 1}), ("PATCH", {"a": 1})]:
        _, fault = api.call(method, "/mmds", body, 400)
        assert "not initialized" in fault["fault_message"]


def test_the_config_file_section_round_trips(tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"x")
    body = {"boot-source": {"kernel_image_path": str(kernel)},
            "network-interfaces": [NET], "mmds-config": CONFIG}
    spec = VmSpec.from_json(body)
    assert spec.mmds_config is not None and spec.mmds_config.version == "V2"
    again = VmSpec.from_json(spec.to_json())
    assert again.mmds_config == spec.mmds_config
    with pytest.raises(ConfigError, match="'eth1'"):
        VmSpec.from_json({**body, "mmds-config": {"network_interfaces": ["eth1"]}})


def test_microvm_mmds_from_python(tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"x")
    with MicroVM(kernel=kernel, nets=[NET], mmds={"id": "py"}) as vm:
        # mmds= alone serves V2 on every interface.
        assert vm.spec.mmds_config is not None
        assert (vm.spec.mmds_config.version, vm.spec.mmds_config.network_interfaces) == \
            ("V2", ["eth0"])
        assert vm.mmds.get() == {"id": "py"}
        vm.mmds.patch({"more": [1, 2]})
        assert vm.mmds.get() == {"id": "py", "more": [1, 2]}
    with MicroVM(kernel=kernel, nets=[NET], mmds_config={**CONFIG, "version": "V1"}) as vm:
        assert vm.spec.mmds_config.version == "V1" and vm.mmds.get() in (None, {})


@pytest.mark.parametrize("argv, words", [
    (["--mmds", "{meta}"], "needs a --net"),
    (["--mmds-version", "V1"], "needs --mmds"),
    (["--mmds", "{missing}"], "cannot read"),
    (["--mmds", "{bad}"], "not valid JSON"),
])
def test_cli_mmds_flags_fail_in_one_line(tmp_path, spawn_pyvmm, argv, words):
    meta, bad = tmp_path / "meta.json", tmp_path / "bad.json"
    meta.write_text(json.dumps({"a": "b"}))
    bad.write_text("{nope")
    args = [a.format(meta=meta, bad=bad, missing=tmp_path / "none.json") for a in argv]
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"x")
    proc = spawn_pyvmm("run", "--kernel", str(kernel), *args, stdin=False)
    assert proc.wait(60) != 0
    err = proc.stderr()
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err

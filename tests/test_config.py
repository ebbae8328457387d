"""pyvmm.config: the one model behind the API, the config file, the CLI flags
and MicroVM's keyword arguments; strict parsing and the conversion to VmConfig."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm import config as cfg
from pyvmm.config import ConfigError, Drive, MachineConfig, NetworkInterface, VmSpec


@pytest.fixture
def files(tmp_path):
    (tmp_path / "vmlinux").write_bytes(b"kernel")
    (tmp_path / "initrd").write_bytes(b"initrd")
    (tmp_path / "root.img").write_bytes(bytes(8192))
    (tmp_path / "data.img").write_bytes(bytes(8192))
    return tmp_path


def full_config(files) -> dict:
    """Every section pyvmm supports, in a config file's shape."""
    return {
        "boot-source": {"kernel_image_path": str(files / "vmlinux"),
                        "initrd_path": str(files / "initrd"), "boot_args": "console=ttyS0"},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 512, "smt": False,
                           "track_dirty_pages": False, "huge_pages": "None"},
        "drives": [{"drive_id": "data", "path_on_host": str(files / "data.img"),
                    "is_root_device": False, "is_read_only": True},
                   {"drive_id": "rootfs", "path_on_host": str(files / "root.img"),
                    "is_root_device": True, "is_read_only": False}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                "guest_mac": "06:00:AC:10:00:02"}],
        "entropy": {},
        "vsock": {"guest_cid": 3, "uds_path": str(files / "v.sock")},
        "logger": {"log_path": str(files / "log"), "level": "Warning"},
        "metrics": {"metrics_path": str(files / "metrics")},
        "serial": {"serial_out_path": str(files / "console")},
        "balloon": None, "mmds-config": None, "cpu-config": None,
    }


def test_a_full_config_file_round_trips(files):
    spec = VmSpec.from_json(json.dumps(full_config(files)))
    out = spec.to_json()
    assert [d["drive_id"] for d in out["drives"]] == ["rootfs", "data"]    # root first
    assert out["logger"]["level"] == "Warning" and out["entropy"] == {}
    assert VmSpec.from_json(out).to_json() == out
    assert list(out)[:3] == ["balloon", "drives", "boot-source"]            # Firecracker's order


def test_what_the_builder_reads(files):
    spec = VmSpec.from_json(full_config(files))
    # boot_args replaces the default command line, as in Firecracker
    assert spec.kernel_args == "console=ttyS0"
    assert [name for name, _ in spec.virtio_devices()] == \
        ["drive:rootfs", "drive:data", "net:eth0", "entropy"]       # the root device is vda
    spec.check_startable()
    without_args = full_config(files)
    del without_args["boot-source"]["boot_args"]
    assert VmSpec.from_json(without_args).kernel_args == cfg.DEFAULT_BOOT_ARGS
    with pytest.raises(ConfigError, match="without a boot source"):
        VmSpec().check_startable()


@pytest.mark.parametrize("change, words", [
    (lambda c: c.pop("boot-source"), "missing section 'boot-source'"),
    (lambda c: c.update(extra={}), "unknown section 'extra'"),
    (lambda c: c.update(balloon={"amount_mib": 1, "deflate_on_oom": True}), "not supported yet"),
    (lambda c: c.update(drives={}), "must be an array"),
    (lambda c: c["drives"].append(dict(c["drives"][0])), "duplicate id 'data'"),
    (lambda c: c["drives"][0].update(is_root_device=True), "root device already exists"),
    (lambda c: c["machine-config"].update(vcpu_count=64), "out of range"),
    (lambda c: c["machine-config"].pop("mem_size_mib"), "missing field 'mem_size_mib'"),
    (lambda c: c["network-interfaces"][0].update(host_dev_name=""), "not a valid interface"),
    (lambda c: c["vsock"].update(guest_cid=True), "must be an integer"),
    (lambda c: c["logger"].update(level="Verbose"), "not one of"),
    (lambda c: c["boot-source"].update(kernel_image_path="/no/such"), "does not exist"),
])
def test_bad_config_files_are_refused_with_the_field_named(files, change, words):
    config = full_config(files)
    change(config)
    with pytest.raises(ConfigError, match=words):
        VmSpec.from_json(config)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        VmSpec.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        VmSpec.from_file(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        VmSpec.from_file(tmp_path / "list.json")


@pytest.mark.parametrize("vcpus, smt, ok", [
    (1, False, True), (32, False, True), (3, False, True), (0, False, False),
    (33, False, False), (2, True, False)])
def test_vcpu_count_rules(vcpus, smt, ok):
    """1 to 32; smt true is refused: not supported yet (it would need the CPU
    topology of two threads per core)."""
    body = {"vcpu_count": vcpus, "mem_size_mib": 128, "smt": smt}
    if ok:
        assert MachineConfig.from_json(body).vcpu_count == vcpus
    else:
        with pytest.raises(ConfigError):
            MachineConfig.from_json(body)


def test_build_is_the_same_model_as_a_config_file(files):
    spec = VmSpec.build(kernel=files / "vmlinux", initrd=files / "initrd", cmdline="quiet",
                        vcpus=2, mem_mib=512, drives=[{"drive_id": "rootfs", "is_root_device": True,
                                 "path_on_host": str(files / "root.img")}],
                        nets=[{"iface_id": "eth0", "host_dev_name": "tap0"}], rng=True)
    again = VmSpec.from_json(spec.to_json())
    assert again.to_json() == spec.to_json()
    assert spec.boot_source.boot_args == f"{cfg.DEFAULT_BOOT_ARGS} quiet"


json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | \
    st.text(max_size=8)
json_values = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
SECTION_NAMES = list(VmSpec.SECTIONS)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(SECTION_NAMES + ["junk"]), json_values, max_size=5))
def test_random_config_files_give_config_error_or_a_valid_model(body):
    try:
        spec = VmSpec.from_json(body)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert VmSpec.from_json(spec.to_json()).to_json() == spec.to_json()

"""The syntax of `pyvmm run --disk` and `--net`, parsed in the CLI layer into the model."""
from __future__ import annotations

import pytest

from pyvmm.cli import parse_disk, parse_net
from pyvmm.errors import PyvmmError


@pytest.fixture
def files(tmp_path):
    (tmp_path / "root.img").write_bytes(bytes(8192))
    (tmp_path / "data.img").write_bytes(bytes(8192))
    return tmp_path


def test_disk_and_net_flags_become_model_sections(files):
    drive = parse_disk(f"{files / 'root.img'},ro,root,id=rootfs", 0)
    assert (drive.drive_id, drive.is_read_only, drive.is_root_device) == ("rootfs", True, True)
    assert parse_disk(str(files / "data.img"), 3).drive_id == "drive3"
    net = parse_net("tap=tap7,mac=06:00:00:00:00:07", 1)
    assert (net.iface_id, net.host_dev_name, net.guest_mac) == ("eth1", "tap7",
                                                                "06:00:00:00:00:07")


@pytest.mark.parametrize("text", ["mac=06:00:00:00:00:07", "tap", "tap=t,speed=10",
                                  "tap=t,mac=01:00:00:00:00:00"])
def test_bad_net_flags_name_the_flag(text):
    with pytest.raises(PyvmmError, match="--net"):
        parse_net(text, 0)


def test_bad_disk_flags_name_the_option(files):
    with pytest.raises(PyvmmError, match="unknown option 'rw'"):
        parse_disk(f"{files / 'root.img'},rw", 0)
    with pytest.raises(PyvmmError, match="--disk .*does not exist"):
        parse_disk(f"{files / 'missing.img'}", 0)

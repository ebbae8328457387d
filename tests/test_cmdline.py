"""The kernel command line: a pure function of the configuration and the host facts."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.boot.cmdline import Cmdline, CmdlineError, build_cmdline, split_params
from pyvmm.config import DEFAULT_BOOT_ARGS, VmSpec
from pyvmm.layout import MAX_VIRTIO_DEVICES, VIRTIO_MMIO_BASE
from pyvmm.pvm import KERNEL_PARAMS


@pytest.fixture
def files(tmp_path):
    (tmp_path / "vmlinux").write_bytes(b"kernel")
    for name in ("root.img", "data.img"):
        (tmp_path / name).write_bytes(bytes(8192))
    return tmp_path


def spec(files, **kwargs) -> VmSpec:
    return VmSpec.build(kernel=files / "vmlinux", **kwargs)


def test_defaults_alone_without_devices(files):
    assert build_cmdline(spec(files), pvm=False) == DEFAULT_BOOT_ARGS


def test_pvm_params_devices_root_then_the_users_args(files):
    drives = [{"drive_id": "data", "path_on_host": str(files / "data.img"),
               "is_root_device": False},
              {"drive_id": "rootfs", "path_on_host": str(files / "root.img"),
               "is_root_device": True, "is_read_only": True}]
    line = build_cmdline(spec(files, drives=drives, rng=True, cmdline="quiet"), pvm=True)
    windows = [f"virtio_mmio.device=4K@{VIRTIO_MMIO_BASE + i * 0x1000:#x}:{irq}"
               for i, irq in enumerate((5, 6, 7))]
    assert line == " ".join([KERNEL_PARAMS, *windows, "root=/dev/vda ro", DEFAULT_BOOT_ARGS,
                             "quiet"])


def test_boot_args_replace_the_defaults(files):
    assert build_cmdline(spec(files, boot_args="console=ttyS0 init=/bin/sh"),
                         pvm=False) == "console=ttyS0 init=/bin/sh"


def test_a_root_drive_and_a_root_in_boot_args_conflict(files):
    drives = [{"drive_id": "rootfs", "path_on_host": str(files / "root.img"),
               "is_root_device": True}]
    with pytest.raises(CmdlineError, match="root=/dev/vdb.*root=/dev/vda"):
        build_cmdline(spec(files, drives=drives, cmdline="root=/dev/vdb"), pvm=False)
    # The same parameter again is harmless.
    assert "root=/dev/vda rw" in build_cmdline(spec(files, drives=drives,
                                                    cmdline="root=/dev/vda"), pvm=False)


def test_the_users_own_repeats_are_kept_for_the_kernel_to_resolve(files):
    line = build_cmdline(spec(files, cmdline="panic=1 console=tty0"), pvm=False)
    assert line.endswith("panic=-1 pci=off i8042.noaux i8042.nomux i8042.nopnp "
                         "i8042.dumbkbd panic=1 console=tty0")


def test_too_many_devices_and_too_long_a_line(files):
    build_cmdline(_with_entropy_and_drives(files, MAX_VIRTIO_DEVICES - 1), pvm=False)
    with pytest.raises(CmdlineError, match="too many"):
        build_cmdline(_with_entropy_and_drives(files, MAX_VIRTIO_DEVICES), pvm=False)
    line = Cmdline(capacity=16)
    line.add("console=ttyS0")
    with pytest.raises(CmdlineError, match="longer than 15 bytes"):
        line.add("quiet")
    assert str(line) == "console=ttyS0"


def _with_entropy_and_drives(files, drives: int) -> VmSpec:
    return spec(files, rng=True, drives=[{"drive_id": f"d{i}", "is_root_device": False,
                                          "path_on_host": str(files / "data.img")}
                                         for i in range(drives)])


def test_control_characters_and_quotes():
    line = Cmdline()
    for bad in ("a\x01b", "", "two words"):
        with pytest.raises(CmdlineError):
            line.add(bad)
    line.add_text('dyndbg="file foo.c +p" quiet')
    assert line.params == ['dyndbg="file foo.c +p"', "quiet"]
    with pytest.raises(CmdlineError, match="unterminated quote"):
        split_params('a="b')
    with pytest.raises(CmdlineError, match="NUL"):
        line.add_text("a\0b")


@given(st.lists(st.from_regex(r"[a-z_.]{1,6}(=[a-z0-9,/]{0,6})?", fullmatch=True),
                max_size=12))
def test_the_users_text_is_kept_whole_and_in_order(params):
    # Nothing of ours to conflict with: every parameter stays, repeats included.
    line = Cmdline()
    line.add_text(" ".join(params))
    assert split_params(str(line)) == params


def test_a_root_drive_with_partuuid_is_root_partuuid(tmp_path):
    """Firecracker's append_root_device_cmdline: root=PARTUUID=<uuid> ro|rw."""
    from pyvmm.boot.cmdline import build_cmdline
    from pyvmm.config import VmSpec
    for name in ("vmlinux", "root.img"):
        (tmp_path / name).write_bytes(bytes(4096))
    spec = VmSpec.build(kernel=tmp_path / "vmlinux", drives=[
        {"drive_id": "rootfs", "path_on_host": str(tmp_path / "root.img"),
         "is_root_device": True, "is_read_only": True, "partuuid": "0eaa91a0-01"}])
    line = build_cmdline(spec, pvm=False)
    assert "root=PARTUUID=0eaa91a0-01 ro" in line and "root=/dev/vda" not in line

"""The built-in guest's cache: each part keyed by its own inputs only, half builds never
found, the rootfs optional for find_guest.  No builds: the firmware scripts are replaced
by commands that write their outputs."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pyvmm import builtin_guest as bg

VERSIONS = {"linux-source-6.1": "6.1.1", "busybox-static": "1:1.35", "musl-tools": "1.2.3"}


@pytest.fixture
def versions() -> dict[str, str]:
    """The installed versions the keys see (a test may upgrade or remove one)."""
    return dict(VERSIONS)


@pytest.fixture
def firmware(tmp_path, monkeypatch, versions):
    """A copy of firmware/ that the test may edit, fake package versions, an empty cache."""
    copy = tmp_path / "firmware"
    shutil.copytree(bg.FIRMWARE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "agent").mkdir(exist_ok=True)
    (copy / "agent" / "main.c").write_text("int main(void) { return 0; }\n")
    monkeypatch.setattr(bg, "FIRMWARE_DIR", copy)
    monkeypatch.setattr(bg, "package_version", versions.get)
    monkeypatch.setattr(bg, "missing_packages", lambda: [])
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "cache"))
    return copy


def keys() -> dict[str, str]:
    return {name: bg.part_key(name) for name in bg.PARTS}


def changed_by(edit) -> set[str]:
    before = keys()
    edit()
    after = keys()
    return {name for name in bg.PARTS if before[name] != after[name]}


def append(path: Path, text: str = "\n# edited\n"):
    return lambda: path.write_text(path.read_text() + text)


def test_each_input_reaches_exactly_the_parts_built_from_it(firmware):
    agent_and_in = {"agent", "initramfs", "rootfs"}
    assert changed_by(append(firmware / "agent" / "main.c", "/* edited */\n")) == agent_and_in
    assert changed_by(append(firmware / "init")) == {"initramfs"}
    assert changed_by(append(firmware / "build-initramfs.sh")) == {"initramfs"}
    assert changed_by(append(firmware / "kernel" / "microvm.config")) == {"kernel"}
    assert changed_by(append(firmware / "build-kernel.sh")) == {"kernel"}
    patch = firmware / "kernel" / "patches" / "9999-new.patch"
    assert changed_by(lambda: patch.write_text("--- a\n+++ b\n")) == {"kernel"}
    assert changed_by(append(firmware / "rootfs" / "packages.txt", "jq\n")) == {"rootfs-tree",
                                                                               "rootfs"}
    assert changed_by(append(firmware / "build-rootfs.sh")) == {"rootfs-tree", "rootfs"}
    assert changed_by(append(firmware / "build-rootfs-image.sh")) == {"rootfs"}
    # files the recipe does not read change nothing (the package list is not the kernel's)
    assert changed_by(append(firmware / "apt-packages.txt", "jq\n")) == set()


def test_package_upgrades_reach_only_their_parts(firmware, versions):
    def upgrade(package):
        return lambda: versions.__setitem__(package, versions[package] + "+deb12u1")
    assert changed_by(upgrade("linux-source-6.1")) == {"kernel"}
    assert changed_by(upgrade("busybox-static")) == {"initramfs"}
    assert changed_by(upgrade("musl-tools")) == {"agent", "initramfs", "rootfs"}


def test_keys_name_their_cache_directories(firmware, tmp_path):
    key = bg.part_key("kernel")
    assert len(key) == 32 and bg.part_key("kernel") == key
    assert bg.part_dir("kernel") == tmp_path / "cache" / "guest" / f"kernel-{key}"
    assert bg.part_dir("rootfs-tree").name.startswith("rootfs-tree-")


def test_a_missing_source_package_is_one_clear_error_and_no_guest(firmware, versions):
    del versions["busybox-static"]
    with pytest.raises(bg.GuestBuildError, match="busybox-static is not installed: run "
                                                 "`apt-get install"):
        bg.part_key("initramfs")
    assert bg.part_key("kernel")            # the other parts still have keys
    assert bg.find_guest() is None


# -- building: fake scripts that write each part's outputs ----------------------------------

@pytest.fixture
def fake_build(firmware, monkeypatch):
    """build_part runs `sh -c` writing the part's outputs; records which parts it built.
    A part named in `fail` exits 1 after writing half its outputs."""
    built: list[str] = []
    fail: set[str] = set()

    def commands(name: str, out: Path) -> list[list[str]]:
        built.append(name)
        outputs = bg.PARTS[name].outputs
        if name in fail:
            return [["sh", "-c", f"echo half > '{out / outputs[0]}'; exit 1"]]
        writes = "; ".join(f"echo {name} > '{out / f}'" for f in outputs)
        return [["sh", "-c", writes]]
    monkeypatch.setattr(bg, "_build_commands", commands)
    return built, fail


def test_ensure_guest_builds_each_missing_part_once_and_finds_it_after(fake_build):
    built, _ = fake_build
    assert bg.find_guest() is None
    paths = bg.ensure_guest(progress=False)
    assert built == ["kernel", "agent", "initramfs", "rootfs-tree", "rootfs"]
    assert paths == bg.find_guest()
    assert paths.rootfs.read_text() == "rootfs\n" and paths.agent.read_text() == "agent\n"
    assert paths.vmlinux.parent == paths.bzimage.parent == bg.part_dir("kernel")
    assert (paths.bzimage.parent / "config").is_file()    # pyvmm.boot.initrd reads it
    assert paths.vmlinux_debug == paths.vmlinux.with_name("vmlinux.debug")   # for gdb
    assert paths.vmlinux_debug.read_text() == "kernel\n"
    built.clear()
    assert bg.ensure_guest(progress=False) == paths and built == []


def test_an_edited_init_rebuilds_only_the_initramfs(fake_build, firmware):
    built, _ = fake_build
    first = bg.ensure_guest(progress=False)
    built.clear()
    append(firmware / "init")()
    assert bg.find_guest() is None
    second = bg.ensure_guest(progress=False)
    assert built == ["initramfs"]
    assert second.initramfs != first.initramfs and second.vmlinux == first.vmlinux
    assert second.rootfs == first.rootfs


def test_an_edited_agent_rebuilds_the_image_but_not_the_debian_tree(fake_build, firmware):
    built, _ = fake_build
    bg.ensure_guest(progress=False)
    built.clear()
    append(firmware / "agent" / "main.c", "/* v2 */\n")()
    bg.ensure_guest(progress=False)
    assert built == ["agent", "initramfs", "rootfs"]


def test_the_rootfs_is_optional_for_find_guest_and_run(fake_build):
    built, _ = fake_build
    paths = bg.ensure_guest(progress=False, rootfs=False)
    assert built == ["kernel", "agent", "initramfs"] and paths.rootfs is None
    assert bg.find_guest() == paths and paths.exist()
    built.clear()
    assert bg.ensure_guest(progress=False).rootfs is not None    # `pyvmm guest build`
    assert built == ["rootfs-tree", "rootfs"]


def test_a_failed_build_leaves_nothing_that_is_found(fake_build, tmp_path):
    built, fail = fake_build
    fail.add("initramfs")
    with pytest.raises(bg.GuestBuildError, match="exit status 1"):
        bg.ensure_guest(progress=False)
    assert bg.find_guest() is None
    assert not bg.part_dir("initramfs").exists()
    guest_cache = tmp_path / "cache" / "guest"
    assert sorted(p.name.split("-")[0] for p in guest_cache.iterdir()) == ["agent", "kernel"]
    fail.clear()
    built.clear()
    assert bg.ensure_guest(progress=False, rootfs=False) is not None
    assert built == ["initramfs"]                # the finished parts were kept


def test_an_incomplete_part_directory_is_not_a_guest(fake_build):
    bg.ensure_guest(progress=False)
    (bg.part_dir("kernel") / "vmlinux").unlink()
    assert bg.find_guest() is None
    bg.ensure_guest(progress=False)
    (bg.part_dir("kernel") / "vmlinux.debug").unlink()      # a kernel cached before it existed
    assert bg.find_guest() is None
    (bg.part_dir("rootfs") / "rootfs.ext4").unlink()
    bg.ensure_guest(progress=False, rootfs=False)
    assert bg.find_guest().rootfs is None


def test_build_guest_rebuilds_every_part_in_place(fake_build):
    built, _ = fake_build
    first = bg.ensure_guest(progress=False)
    (first.initramfs.parent / "stale").write_text("x")
    built.clear()
    again = bg.build_guest(progress=False)
    assert built == ["kernel", "agent", "initramfs", "rootfs-tree", "rootfs"]
    assert again == first and not (first.initramfs.parent / "stale").exists()
    leftovers = [p.name for p in first.initramfs.parent.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_guest_paths_in_one_directory_and_positional_fields(tmp_path):
    paths = bg.GuestPaths.in_dir(tmp_path)
    assert paths.rootfs == tmp_path / "rootfs.ext4" and paths.agent == tmp_path / "pyvmm-agent"
    assert paths.vmlinux_debug == tmp_path / "vmlinux.debug"
    assert not paths.exist()
    for p in (paths.bzimage, paths.vmlinux, paths.initramfs):
        p.write_bytes(b"x")
    assert paths.exist()                                       # no rootfs needed
    four = bg.GuestPaths(paths.bzimage, paths.vmlinux, paths.initramfs, paths.system_map)
    assert four.rootfs is None and four.agent is None and four.vmlinux_debug is None


def test_the_real_recipe_has_every_input_each_part_names():
    for part in bg.PARTS.values():
        for pattern in part.inputs:
            assert list(bg.FIRMWARE_DIR.glob(pattern)), (part.name, pattern)
    wanted = bg.APT_PACKAGES.read_text().split()
    assert {"mmdebstrap", "e2fsprogs", "musl-tools", "busybox-static"} <= set(wanted)


def test_the_kernel_recipe_keeps_an_unstripped_vmlinux_with_dwarf():
    """gdb on the built-in guest: symbols and DWARF (vmlinux.debug), which `bt` unwinds
    through; no frame pointers, which would cost ~14% of a KVM PVM boot."""
    assert "vmlinux.debug" in bg.PARTS["kernel"].outputs
    script = (bg.FIRMWARE_DIR / "build-kernel.sh").read_text()
    assert 'cp vmlinux "$out/vmlinux.debug"' in script
    assert 'objcopy --strip-all vmlinux "$out/vmlinux"' in script       # what boots
    fragment = set((bg.FIRMWARE_DIR / "kernel" / "microvm.config").read_text().splitlines())
    assert "CONFIG_DEBUG_INFO_DWARF5=y" in fragment
    assert not {"CONFIG_FRAME_POINTER=y", "CONFIG_UNWINDER_FRAME_POINTER=y"} & fragment

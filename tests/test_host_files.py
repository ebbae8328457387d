"""Host paths as a VMM for untrusted guests must handle them: inputs are regular
files read with a bound, outputs never follow a symlink, the API socket is the
owner's alone."""
from __future__ import annotations

import os
import stat

import pytest

from pyvmm.api.http import HttpServer
from pyvmm.boot.errors import BootError
from pyvmm.boot.loader import load_linux
from pyvmm.config import BootSource, ConfigError, Logger, Metrics, SerialConfig
from pyvmm.host_files import HostFileError, open_output, read_regular_file
from pyvmm.memory import GuestMemory, MiB


def test_a_regular_file_is_read_whole_and_a_larger_one_refused(tmp_path):
    path = tmp_path / "kernel"
    path.write_bytes(b"k" * 5000)
    assert read_regular_file(path, "kernel", 5000) == b"k" * 5000
    with pytest.raises(HostFileError, match="larger than"):
        read_regular_file(path, "kernel", 4999)


def test_st_size_is_not_trusted():
    # procfs says 0 bytes and has more: the read follows the contents, within the bound.
    assert os.stat("/proc/self/status").st_size == 0
    assert b"Name:" in read_regular_file("/proc/self/status", "initrd", 1 << 20)
    with pytest.raises(HostFileError, match="larger than"):
        read_regular_file("/proc/self/status", "initrd", 16)


@pytest.mark.parametrize("path, words", [
    ("/dev/zero", "not a regular file"),              # endless
    ("/", "directory"),
    ("/no/such/kernel", "does not exist"),
])
def test_kernels_and_initrds_must_be_regular_files(path, words):
    with pytest.raises(HostFileError, match=words):
        read_regular_file(path, "kernel", 1 << 20)
    memory = GuestMemory.x86(32 * MiB)
    try:
        with pytest.raises(BootError, match=words):
            load_linux(memory, path, None, "", 1)
    finally:
        memory.close()


def test_the_model_refuses_a_block_device_or_special_file_as_kernel(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file"):
        BootSource.from_json({"kernel_image_path": "/dev/zero"})


@pytest.mark.parametrize("section, field", [(Logger, "log_path"), (Metrics, "metrics_path"),
                                            (SerialConfig, "serial_out_path")])
def test_outputs_are_never_reached_through_a_symlink(tmp_path, section, field):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "out"
    link.symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"):
        section.from_json({field: str(link)})
    with pytest.raises(HostFileError, match="symbolic link"):
        open_output(str(link))
    assert victim.read_bytes() == b"precious"


def test_outputs_may_be_files_or_fifos_only(tmp_path):
    fd = open_output(str(tmp_path / "new"))          # created
    os.close(fd)
    os.mkfifo(tmp_path / "fifo")
    fd = open_output(str(tmp_path / "fifo"))         # opened without a reader, no blocking
    os.close(fd)
    with pytest.raises(HostFileError, match="neither a regular file nor a FIFO"):
        open_output("/dev/null")


def test_the_api_socket_is_the_owners_alone(tmp_path):
    old = os.umask(0o000)                             # even with a permissive umask
    try:
        server = HttpServer(str(tmp_path / "api.sock"))
        server.bind()
    finally:
        os.umask(old)
    try:
        mode = stat.S_IMODE(os.stat(tmp_path / "api.sock").st_mode)
        assert mode == 0o600, oct(mode)
    finally:
        server.close()

"""`PUT /vsock` builds a real virtio-vsock device (KVM, the echo guest: no boot).

The echo guest has no vsock driver: the test checks what exists without one, the
device on the VM (its stats, its virtio-mmio window on the command line) and the
listening socket, which accepts a host program's CONNECT while the guest is not
ready (the REQUEST waits for the guest's RX buffers)."""
from __future__ import annotations

import socket

import pytest

from pyvmm.microvm import MicroVM
from pyvmm.api.server import ApiServer
from tests.framework.api import CheckedClient

pytestmark = pytest.mark.kvm


def test_put_vsock_builds_the_device(tmp_path, echo_kernel):
    uds = tmp_path / "v.sock"
    (tmp_path / "v.sock").write_bytes(b"")            # a stale non-socket is refused...
    vm = MicroVM.unconfigured()
    server = ApiServer(vm, str(tmp_path / "api.sock"))
    server.start()
    api = CheckedClient(server.path)
    try:
        api.call("PUT", "/boot-source", {"kernel_image_path": echo_kernel,
                                         "boot_args": "console=ttyS0"}, 204)
        api.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32}, 204)
        api.call("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(uds)}, 204)
        _, fault = api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 400)
        assert "not a socket" in fault["fault_message"]
        uds.unlink()                                  # ...a stale socket is replaced
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(uds))
        stale.close()
        api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
        stats = vm.stats
        assert stats["virtio"]["vsock"]["requests"] == 0
        assert "virtio_mmio.device=4K@0xd0000000:5" in vm._running_vm().cmdline
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect(str(uds))
        client.sendall(b"CONNECT 52\n")
        client.close()
    finally:
        api.close()
        server.close()
        vm.close()
    assert not uds.exists()                           # the device took its socket away

"""The API's test doubles and checks.

CheckedClient checks every exchange against pyvmm/api/openapi.json (the tests
of the API routes and HTTP, and of the API process on a real VM, use it).
FakeLinuxVm stands in for pyvmm.builder.LinuxVm behind MicroVM.vm_factory, so
that the API's lifecycle (InstanceStart, pause, resume, PATCH /drives after
start) is exercised without booting anything; serve() runs an ApiServer over
a MicroVM that builds fakes.  firecracker_python_api() loads a third-party
Firecracker client for the tests that drive `pyvmm api` the way it does.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest

from pyvmm.api.client import ApiClient
from pyvmm.api.schema import request_schema, response_schema, validate
from pyvmm.api.server import ApiServer
from pyvmm.microvm import MicroVM


def check_response(method: str, url: str, status: int, payload) -> None:
    """The status and body are what the OpenAPI document says this route answers."""
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


class CheckedClient(ApiClient):
    """An ApiClient whose every exchange is checked against the OpenAPI document:
    the request body (when the server accepted it), the status and the response."""

    def call(self, method: str, url: str, body=None, expect: int | None = None, raw=None):
        """(status, payload); expect: the status there must be."""
        status, payload = self.request(method, url, body, raw=raw)
        if expect is not None:
            assert status == expect, f"{method} {url} -> {status} {payload}"
        check_response(method, url, status, payload)
        if expect in (200, 204) and body is not None:
            schema = request_schema(method, url)
            assert schema is not None and not validate(body, schema), \
                f"a request the server accepted breaks the document: {validate(body, schema)}"
        return status, payload

    def payload(self, method: str, url: str, body=None, expect: int | None = None) -> Any:
        """call()'s payload alone."""
        return self.call(method, url, body, expect)[1]


class FakeResult:
    exit_code, reason, outcome = 0, "stopped by the host", None


class FakeLinuxVm:
    """Stands in for pyvmm.builder.LinuxVm: records calls, never touches KVM, writes
    no console output.  Built as MicroVM.vm_factory is called: (spec, console)."""
    instances: list["FakeLinuxVm"] = []

    def __init__(self, spec, console, mmds=None) -> None:
        self.spec = spec                      # the pyvmm.config.VmSpec it was built from
        self.console = console                # the pyvmm.console.ConsoleCapture
        self.mmds = mmds                      # the MicroVM's MMDS data store, if it serves one
        self.calls: list[str] = []
        self.pvm = False
        self.sent = b""
        self.drives: dict[str, Path] = {}
        self.limits: dict[tuple[str, str], object] = {}   # (device, limiter) -> PATCH update
        self._done = threading.Event()
        FakeLinuxVm.instances.append(self)

    def start(self): self.calls.append("start")
    def pause(self): self.calls.append("pause")
    def resume(self): self.calls.append("resume")
    def stop(self): self.calls.append("stop"); self._done.set()
    def send(self, data): self.sent += data
    def close(self): self.calls.append("close")
    def update_drive(self, drive_id, path): self.drives[drive_id] = path
    def update_rate_limiter(self, device, which, update): self.limits[device, which] = update
    def send_ctrl_alt_del(self): self.calls.append("ctrl-alt-del")

    def wait(self, timeout=None):
        return FakeResult() if self._done.wait(timeout) else None

    def stats(self):
        return {"vcpus": [{"IO": 3}], "devices": {"serial": 3, "i8042": 0},
                "unhandled": {"pio": 0, "mmio": 0}, "pvm_fixups": {}, "serial_tx_bytes": 3,
                "virtio": {"drive:rootfs": {"requests": 2, "bytes_read": 1024}}}


def serve(directory: Path, **options) -> tuple[MicroVM, ApiServer]:
    """An unconfigured MicroVM that builds FakeLinuxVms, served at directory/api.sock."""
    vm = MicroVM.unconfigured()
    vm.vm_factory = FakeLinuxVm
    server = ApiServer(vm, str(directory / "api.sock"), **options)
    server.start()
    return vm, server


def write_api_files(directory: Path) -> Path:
    """What the route tests configure: a kernel, an initrd and two disk images
    (their contents are never loaded: the VM is a FakeLinuxVm)."""
    (directory / "vmlinux").write_bytes(b"\x7fELF not really")
    (directory / "initrd").write_bytes(b"07070100")
    (directory / "rootfs.img").write_bytes(bytes(1 << 20))
    (directory / "data.img").write_bytes(bytes(1 << 20))
    return directory


def firecracker_python_api():
    """firecracker-python's API client (PyPI firecracker-python 0.0.5, installed by
    scripts/setup), unchanged: its `firecracker.api` module only, because importing the
    package runs its Firecracker-binary checks and pulls in docker and paramiko."""
    spec = importlib.util.find_spec("firecracker")
    if spec is None:
        pytest.fail("firecracker-python is not installed: run scripts/setup")
    package = types.ModuleType("firecracker")
    package.__path__ = list(spec.submodule_search_locations)
    # With its spec, a later find_spec("firecracker") answers instead of raising
    # "firecracker.__spec__ is None" (what CI hit when a second test module asked).
    package.__spec__ = spec
    sys.modules.setdefault("firecracker", package)
    return importlib.import_module("firecracker.api")

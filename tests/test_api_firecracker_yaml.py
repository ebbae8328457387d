"""Firecracker's own API document, walked: every path, method and request field.

tests/data/firecracker-openapi.yaml is Firecracker's swagger file (its header says
which commit).  For every operation this builds the smallest valid request from
the schema (its required fields), then one request per field, nested fields
included (a rate limiter's buckets, snapshot load's mem_backend and
network_overrides...), each with every valid value the schema allows (every enum
value, true and false...).  Each request goes to a fresh VM, in the state the
operation needs ("Not started", or started and paused with framework.api's
FakeLinuxVm: nothing boots), and must be either

- accepted, and then shown where Firecracker shows it: GET /vm/config for the
  configuration, the VM's state for actions, the request handed to the VM for
  snapshots; or
- refused with a 400 whose fault_message says "not supported yet" and names the
  field (or, for a route pyvmm does not implement, the route).

Nothing else passes: an unknown field, a value silently dropped, another error.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from pyvmm.api.http import Request
from pyvmm.api.server import ApiController
from pyvmm.microvm import MicroVM
from tests.framework.api import CheckedClient, FakeLinuxVm, write_api_files



class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true and false (1.1 would read the log level Off as false)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
DOC = yaml.load((Path(__file__).parent / "data" / "firecracker-openapi.yaml").read_text(),
                Loader=_Yaml12Loader)
DEFS = DOC["definitions"]
# MMDS's data is not configuration (GET /vm/config never shows it) and a PATCH before any
# PUT is refused, as Firecracker refuses it: tests/test_mmds_api.py checks its routes.
EXCLUDED_PATHS = {"/mmds": "MMDS's data (tests/test_mmds_api.py)"}
EXCLUDED_FIELDS: set[tuple[str, str]] = set()
IDS = {"drive_id": "d0", "iface_id": "eth0", "id": "p0"}
NOT_SUPPORTED = "not supported yet"

# Fields pyvmm needs beyond the document's required ones (a virtio-blk drive needs its
# image; a snapshot load needs its memory) and fields that exclude one another.
EXTRA_REQUIRED = {"Drive": ["path_on_host"], "SnapshotLoadParams": ["mem_backend"]}
EXCLUDES = {("SnapshotLoadParams", "mem_file_path"): "mem_backend"}


# -- values ------------------------------------------------------------------------------------

def scalar_values(name: str, ctx: dict[str, Path]) -> list[Any]:
    """Valid values of a string or integer field, by its name."""
    files, here = ctx["files"], ctx["here"]
    table: dict[str, list[Any]] = {
        "kernel_image_path": [str(files / "vmlinux")], "initrd_path": [str(files / "initrd")],
        "boot_args": ["console=ttyS0 reboot=k"], "path_on_host": [str(files / "data.img")],
        "partuuid": ["0eaa91a0-01"], "socket": [str(here / "vhost.sock")],
        "host_dev_name": ["tap0"], "guest_mac": ["06:00:AC:10:00:02"], "mtu": [1500],
        "guest_cid": [3], "uds_path": [str(here / "v.sock")], "vsock_id": ["vsock0"],
        "log_path": [str(here / "fc.log")], "module": ["api_server"],
        "metrics_path": [str(here / "metrics.json")],
        "serial_out_path": [str(here / "serial.out")],
        "vcpu_count": [2], "mem_size_mib": [256], "size": [1000], "refill_time": [100],
        "one_time_burst": [10], "snapshot_path": [str(here / "vm.state")],
        "mem_file_path": [str(here / "vm.mem")], "backend_path": [str(here / "vm.mem")],
        "amount_mib": [16], "stats_polling_interval_s": [1], "total_size_mib": [1024],
        "slot_size_mib": [128], "block_size_mib": [2], "requested_size_mib": [128],
        "index": [0], "flags": [0], "leaf": ["0x1"], "subleaf": ["0x0"], "addr": ["0x10"],
        "bitmap": ["0b1"], "network_interfaces": ["eth0"],
        "ipv4_address": ["169.254.169.254", "169.254.170.2"],
    }
    for ident in IDS:
        table[ident] = [IDS[ident]]
    return table.get(name, ["x"])


def resolve(schema: dict) -> tuple[str | None, dict]:
    """(definition name, schema) with $ref followed."""
    ref = schema.get("$ref")
    if ref is None:
        return None, schema
    name = ref.rsplit("/", 1)[1]
    return name, DEFS[name]


def values(name: str, schema: dict, ctx: dict) -> list[tuple[tuple[str, ...], Any]]:
    """(path of the field set inside the value, value): every way to give field `name`
    a valid value; the first is the plainest."""
    definition, schema = resolve(schema)
    if "properties" in schema:
        base = minimal(definition, schema, ctx)
        out: list[tuple[tuple[str, ...], Any]] = [((), base)]
        for sub, case in cases(definition, schema, ctx):
            out.append((sub, case))
        return out
    kind = schema.get("type")
    if kind == "array":
        return [(sub, [value]) for sub, value in values(name, schema["items"], ctx)]
    if "enum" in schema:
        return [((), value) for value in schema["enum"]]
    if kind == "boolean":
        return [((), True), ((), False)]
    if kind == "object":                         # a map (metrics' properties)
        return [((), {"owner": "tests"})]
    return [((), value) for value in scalar_values(name, ctx)]


def minimal(definition: str | None, schema: dict, ctx: dict) -> dict:
    required = schema.get("required", []) + EXTRA_REQUIRED.get(definition or "", [])
    return {name: values(name, schema["properties"][name], ctx)[0][1] for name in required}


def cases(definition: str | None, schema: dict, ctx: dict) \
        -> Iterator[tuple[tuple[str, ...], dict]]:
    """(field path, body): the minimal object with one field set, for every field and
    every value, nested fields included."""
    base = minimal(definition, schema, ctx)
    for name, prop in schema["properties"].items():
        if (definition, name) in EXCLUDED_FIELDS:
            continue
        for sub, value in values(name, prop, ctx):
            body = {**base, name: value}
            body.pop(EXCLUDES.get((definition or "", name), ""), None)
            yield (name, *sub), body


def operations() -> Iterator[tuple[str, str, str | None, dict | None]]:
    """(METHOD, path template, body definition, body schema) of every operation."""
    for template, item in DOC["paths"].items():
        for method, operation in item.items():
            body = next((p["schema"] for p in operation.get("parameters", [])
                         if p.get("in") == "body"), None)
            definition = resolve(body)[0] if body else None
            yield method.upper(), template, definition, body


def requests(ctx: dict) -> Iterator[tuple[str, str, tuple[str, ...], Any]]:
    """(METHOD, path template, field path, body) of every request the walk sends."""
    for method, template, definition, body in operations():
        if template in EXCLUDED_PATHS:
            continue
        if body is None:
            yield method, template, (), None
            continue
        definition, schema = resolve(body)
        yield method, template, (), minimal(definition, schema, ctx)
        for path, case in cases(definition, schema, ctx):
            yield method, template, path, case


# -- the VM each request meets -------------------------------------------------------------

AFTER_START = {("PATCH", "/drives/{drive_id}"), ("PATCH", "/network-interfaces/{iface_id}"),
               ("PATCH", "/vm"), ("PUT", "/snapshot/create")}


def needs(method: str, template: str, body: Any) -> str:
    """The VM state a request is sent in: new, configured (bootable), started, paused."""
    if template == "/actions":
        return "configured" if body["action_type"] == "InstanceStart" else "started"
    if (method, template) == ("PATCH", "/vm"):
        return "paused" if body["state"] == "Resumed" else "started"
    if template == "/snapshot/create":
        return "paused"
    if template == "/mmds/config":
        return "configured"                 # the interfaces it names must exist
    return "started" if (method, template) in AFTER_START else "new"


def prepare(api: CheckedClient, files: Path, state: str) -> None:
    if state == "new":
        return
    api.call("PUT", "/boot-source", {"kernel_image_path": str(files / "vmlinux")}, 204)
    api.call("PUT", "/drives/d0", {"drive_id": "d0", "path_on_host": str(files / "data.img"),
                                   "is_root_device": False}, 204)
    api.call("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"},
             204)
    if state in ("started", "paused"):
        api.call("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
    if state == "paused":
        api.call("PATCH", "/vm", {"state": "Paused"}, 204)


# -- what "accepted" must show -----------------------------------------------------------------

SECTIONS = {"/boot-source": "boot-source", "/machine-config": "machine-config",
            "/entropy": "entropy", "/vsock": "vsock", "/logger": "logger",
            "/metrics": "metrics", "/serial": "serial", "/mmds/config": "mmds-config"}
LISTS = {"/drives/{drive_id}": ("drives", "drive_id"),
         "/network-interfaces/{iface_id}": ("network-interfaces", "iface_id")}


def at(value: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        if isinstance(value, list):
            value = value[0] if value else None
        value = value.get(name) if isinstance(value, dict) else None
    return value


def shown_as_sent(shown: dict | None, body: dict, path: tuple[str, ...], schema: dict) -> bool:
    """The field (and what it holds) is shown as it was sent, or was sent at its
    default and is left out, as Firecracker leaves it out."""
    sent, seen = at(body, path[:1]), at(shown, path[:1])
    if sent == seen:
        return True
    prop = resolve(schema)[1].get("properties", {}).get(path[0], {})
    default = resolve(prop)[1].get("default")
    return seen is None and (sent in (False, {}, [], None) or sent == default)


def check_accepted(api: CheckedClient, vm, method: str, template: str,
                   path: tuple[str, ...], body: Any, schema: dict | None,
                   recorded: list) -> None:
    if not path:
        return
    config = api.payload("GET", "/vm/config", expect=200)
    if template in SECTIONS:
        assert shown_as_sent(config[SECTIONS[template]], body, path, schema), \
            (method, template, body, config[SECTIONS[template]])
    elif template in LISTS:
        key, ident = LISTS[template]
        item = next(i for i in config[key] if i[ident] == body[ident])
        assert shown_as_sent(item, body, path, schema), (method, template, body, item)
    elif template == "/actions":
        action = body["action_type"]
        fake = FakeLinuxVm.instances[-1] if FakeLinuxVm.instances else None
        assert {"InstanceStart": vm.state == "Running",
                "SendCtrlAltDel": fake is not None and "ctrl-alt-del" in fake.calls,
                "FlushMetrics": True}[action], action
    elif template == "/vm":
        assert vm.state == {"Paused": "Paused", "Resumed": "Running"}[body["state"]]
    elif template == "/snapshot/create":
        assert recorded == [(body["snapshot_path"], body["mem_file_path"],
                             body.get("snapshot_type", "Full"))]
    elif template == "/snapshot/load":
        check_load(recorded[0], body, path)
    else:
        raise AssertionError(f"{method} {template} was accepted: say where it shows")


def check_load(request, body: dict, path: tuple[str, ...]) -> None:
    """pyvmm.snapshot.LoadRequest holds what PUT /snapshot/load sent."""
    backend = body.get("mem_backend") or {"backend_type": "File",
                                          "backend_path": body.get("mem_file_path")}
    assert (request.snapshot_path, request.backend_type, request.backend_path) == \
        (body["snapshot_path"], backend["backend_type"], backend["backend_path"])
    assert request.track_dirty_pages == (body.get("track_dirty_pages", False)
                                         or body.get("enable_diff_snapshots", False))
    assert request.resume_vm == body.get("resume_vm", False)
    assert request.clock_realtime == body.get("clock_realtime", False)
    assert request.network_overrides == {o["iface_id"]: o["host_dev_name"]
                                         for o in body.get("network_overrides", [])}
    assert request.vsock_override == (body.get("vsock_override") or {}).get("uds_path")
    # huge_pages: Snapshot (the snapshot's: always none) and None both mean no huge
    # pages, which is all pyvmm has; the others are refused.
    assert path[0] != "huge_pages" or body["huge_pages"] in ("Snapshot", "None")


# -- the walk ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return write_api_files(tmp_path_factory.mktemp("fc-yaml-files"))


def url_of(template: str) -> str:
    for name, ident in IDS.items():
        template = template.replace("{" + name + "}", ident)
    return template


class InProcessClient(CheckedClient):
    """CheckedClient's checks on requests handed to the controller directly: the
    walk sends hundreds, each to a new VM, and an HTTP server for each would cost
    0.2 s to stop (the HTTP side is tested in test_api_http.py)."""

    def __init__(self, controller: ApiController) -> None:     # no socket
        self.controller = controller

    def request(self, method: str, url: str, body: Any = None,
                raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        response = self.controller.handle(Request(method, url, "HTTP/1.1", {}, data))
        return response.status, (json.loads(response.body) if response.body else None)

    def close(self) -> None:
        pass


def send(directory: Path, files: Path, method: str, template: str, path: tuple[str, ...],
         body: Any) -> tuple[int, Any]:
    """Send one request to a fresh VM in the state it needs and, if it is accepted,
    check that it shows: (status, payload)."""
    directory.mkdir()
    vm = MicroVM.unconfigured()
    vm.vm_factory = FakeLinuxVm
    api = InProcessClient(ApiController(vm))
    recorded: list = []
    try:
        state = needs(method, template, body)
        prepare(api, files, state)
        if template == "/snapshot/create":
            FakeLinuxVm.instances[-1].snapshot = lambda *args: recorded.append(args)
        vm.load_snapshot = recorded.append
        status, payload = api.call(method, url_of(template), body)
        if status < 300:
            schema = next((b for m, t, _, b in operations() if (m, t) == (method, template)))
            check_accepted(api, vm, method, template, path, body, schema, recorded)
        return status, payload
    finally:
        vm.close()


def test_every_route_and_field_is_served_or_refused_as_not_supported(tmp_path, files):
    placeholder = tmp_path / "each"          # each request's own directory, in the bodies
    seen_paths = set()
    outcomes: dict[str, list[str]] = {"accepted": [], "refused": []}
    walk = list(requests({"files": files, "here": placeholder}))
    for index, (method, template, path, body) in enumerate(walk):
        seen_paths.add(template)
        here = tmp_path / str(index)
        body = _rebase(body, placeholder, here)
        status, payload = send(here, files, method, template, path, body)
        what = f"{method} {template} {'.'.join(path) or '(minimal)'} = {body!r}"[:300]
        if status in (200, 204):
            outcomes["accepted"].append(what)
            continue
        message = payload["fault_message"] if isinstance(payload, dict) else payload
        assert status == 400 and NOT_SUPPORTED in message, (what, status, message)
        named = [name for name in path if name in message] or \
            ([url_of(template)] if url_of(template) in message else [])
        assert named, f"{what}: the refusal names neither the field nor the route: {message}"
        outcomes["refused"].append(what)
    assert seen_paths | set(EXCLUDED_PATHS) == set(DOC["paths"])
    assert len(outcomes["accepted"]) > 80 and len(outcomes["refused"]) > 40, outcomes


def _rebase(body: Any, old: Path, new: Path) -> Any:
    """body with paths under old (the walk's directory) moved under new."""
    if isinstance(body, dict):
        return {k: _rebase(v, old, new) for k, v in body.items()}
    if isinstance(body, list):
        return [_rebase(v, old, new) for v in body]
    if isinstance(body, str) and body.startswith(str(old) + "/"):
        return str(new / Path(body).relative_to(old))
    return body


def test_the_copy_is_firecrackers_document():
    assert DOC["swagger"] == "2.0" and DOC["info"]["title"] == "Firecracker API"
    assert DOC["info"]["version"].startswith("1.")

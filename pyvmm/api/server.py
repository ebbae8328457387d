"""Firecracker's REST API over a MicroVM.

Every route of Firecracker's API (v1.x) is answered: the ones pyvmm implements
as Firecracker does (204 with no body on PUT/PATCH success, 200 with JSON on
GET, 400 {"fault_message": ...} on any error), the others with a 400 whose
fault_message says they are not supported yet.  Requests Firecracker has no route
for are answered with its own words (pyvmm.api.routing).  The document describing
what is implemented is pyvmm/api/openapi.json.

Requests are handled one at a time (a lock), as Firecracker's API thread does;
a slow client only holds its own connection's thread.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any, Callable

from pyvmm.api.http import HttpServer, Request, Response, fault
from pyvmm.api.routing import Refused, firecracker_route, invalid_path_method, segments
from pyvmm.config import (BootSource, Drive, Entropy, Logger, MachineConfig,
                          Metrics, NetworkInterface, SerialConfig, Vsock)
from pyvmm.errors import PyvmmError
from pyvmm.microvm import BEFORE_START, MicroVM

APP_NAME = "pyvmm"
# GET /version's firecracker_version: the Firecracker API level pyvmm follows
# (clients such as Kata check it); pyvmm's own version is GET /'s vmm_version.
FIRECRACKER_API_VERSION = "1.7.0"
log = logging.getLogger("pyvmm.api")

# Routes of Firecracker's API that pyvmm does not implement yet.
NOT_SUPPORTED_ROUTES = [
    (re.compile(r"/balloon(/.*)?"), "the balloon device"),
    (re.compile(r"/cpu-config"), "custom CPU templates (cpu-config)"),
    (re.compile(r"/pmem/[^/]*"), "virtio-pmem devices"),
    (re.compile(r"/hotplug/memory"), "memory hot-plug"),
]


class ApiError(PyvmmError):
    pass


def _vm_version() -> str:
    try:
        from importlib.metadata import version
        return version("pyvmm")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0.1.0"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate field {key!r}")
        out[key] = value
    return out


def parse_body(body: bytes) -> Any:
    if not body.strip():
        raise ApiError("the request body is empty: send a JSON object")
    try:
        text = body.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant,
                          object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise ApiError("the request body is not UTF-8") from None
    except RecursionError:
        raise ApiError("the request body is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(f"the request body is not valid JSON: {exc}") from None


class ApiController:
    """Requests in, responses out; the HTTP transport is pyvmm.api.http."""

    def __init__(self, vm: MicroVM) -> None:
        self.vm = vm
        self.lock = threading.Lock()
        self._vmm_version: str | None = None
        R = self._route
        self.routes: list[tuple[re.Pattern, dict[str, Callable]]] = [
            R(r"/", GET=self.get_instance),
            R(r"/version", GET=self.get_version),
            R(r"/boot-source", PUT=self.put_boot_source),
            R(r"/machine-config", GET=self.get_machine_config, PUT=self.put_machine_config,
              PATCH=self.patch_machine_config),
            R(r"/drives/(?P<id>[^/]*)", PUT=self.put_drive, PATCH=self.patch_drive),
            R(r"/network-interfaces/(?P<id>[^/]*)", PUT=self.put_network_interface,
              PATCH=self.patch_network_interface),
            R(r"/entropy", PUT=self.put_entropy),
            R(r"/vsock", PUT=self.put_vsock),
            R(r"/actions", PUT=self.put_action),
            R(r"/mmds", GET=self.get_mmds, PUT=self.put_mmds, PATCH=self.patch_mmds),
            R(r"/mmds/config", PUT=self.put_mmds_config),
            R(r"/mmds/(?P<rest>[^/]+)", PUT=self.put_mmds_other),
            R(r"/vm", PATCH=self.patch_vm),
            R(r"/vm/config", GET=self.get_vm_config),
            R(r"/logger", PUT=self.put_logger),
            R(r"/metrics", PUT=self.put_metrics),
            R(r"/serial", PUT=self.put_serial),
            R(r"/snapshot/create", PUT=self.put_snapshot_create),
            R(r"/snapshot/load", PUT=self.put_snapshot_load),
            # pyvmm's own (Firecracker has no /pyvmm): `pyvmm stat` polls it.
            R(r"/pyvmm/stats", GET=self.get_pyvmm_stats),
        ]

    @staticmethod
    def _route(pattern: str, **methods: Callable) -> tuple[re.Pattern, dict[str, Callable]]:
        return re.compile(pattern), methods

    # -- dispatch ----------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        threading.current_thread().name = "fc_api"      # in log lines, as in Firecracker
        with self.lock:
            self.vm.api_counters["requests"] += 1
            response = self._dispatch(request)
            if response.status >= 400:
                self.vm.api_counters["errors"] += 1
        level = logging.INFO if response.status < 400 else logging.WARNING
        log.log(level, "%s %s -> %d%s", request.method, request.path, response.status,
                f" {response.body.decode(errors='replace')}" if response.status >= 400 else "")
        return response

    def _dispatch(self, request: Request) -> Response:
        method = request.method
        # Firecracker's routing (pyvmm.api.routing): a request it has no route for
        # gets its answer, word for word; the others, the path of their route here.
        path = firecracker_route(method, request.target, bool(request.body))
        if isinstance(path, Refused):
            return Response(400, fault(path.message))
        if method == "DELETE":          # DELETE /drives/{id} ...: hot-unplug
            return Response(400, fault(BEFORE_START if self.vm.state == "Not started" else
                                       f"DELETE {request.path}: hot-unplugging a device is "
                                       "not supported yet by pyvmm."))
        for pattern, methods in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            handler = methods.get(method)
            if handler is None:
                break
            try:
                args = match.groupdict()
                if method in ("PUT", "PATCH"):
                    args["body"] = parse_body(request.body)
                result = handler(**args)
            except PyvmmError as exc:
                # An error may carry its own status (MMDS's store limit is a 413).
                return Response(getattr(exc, "http_status", 400), fault(str(exc)))
            except OSError as exc:
                return Response(400, fault(f"{exc.strerror or exc}"
                                           f"{': ' + str(exc.filename) if exc.filename else ''}"))
            if result is None:
                return Response(204)
            return Response(200, json.dumps(result).encode())
        for pattern, what in NOT_SUPPORTED_ROUTES:
            if pattern.fullmatch(path):
                return Response(400, fault(f"{method} {request.path}: {what} is not supported "
                                           "yet by pyvmm."))
        return Response(400, fault(invalid_path_method(method, (segments(path) or [""])[0]).message))

    # -- handlers: each returns None (204) or a JSON value (200) -------------------------

    def get_instance(self) -> dict:
        return {"id": self.vm.vm_id, "state": self.vm.state,
                "vmm_version": self.vmm_version, "app_name": APP_NAME}

    @property
    def vmm_version(self) -> str:
        if self._vmm_version is None:         # importlib.metadata is slow to import
            self._vmm_version = _vm_version()
        return self._vmm_version

    def get_version(self) -> dict:
        return {"firecracker_version": FIRECRACKER_API_VERSION}

    def _configure(self, section: str, parse: Callable[[], Any]) -> None:
        """Every pre-boot PUT/PATCH: the state is checked before the body is parsed,
        so that a request after start is refused as such."""
        self.vm.configure(section, parse)

    def put_boot_source(self, body: Any) -> None:
        self._configure("boot_source", lambda: BootSource.from_json(body, "PUT /boot-source"))

    def get_machine_config(self) -> dict:
        return self.vm.spec.machine_config.to_json()

    def put_machine_config(self, body: Any) -> None:
        self._configure("machine_config",
                        lambda: MachineConfig.from_json(body, "PUT /machine-config"))

    def patch_machine_config(self, body: Any) -> None:
        self._configure("machine_config", lambda: MachineConfig.from_json(
            body, "PATCH /machine-config", base=self.vm.spec.machine_config))

    def put_drive(self, id: str, body: Any) -> None:  # noqa: A002 - the route's name
        self._configure("drive", lambda: Drive.from_json(body, f"PUT /drives/{id}", path_id=id))

    def patch_drive(self, id: str, body: Any) -> None:  # noqa: A002
        where = f"PATCH /drives/{id}"
        if self.vm.state == "Not started":
            raise ApiError(BEFORE_START)
        path, limiter = Drive.patch_from_json(body, where, id)
        self.vm.update_drive(id, path, rate_limiter=limiter)

    def put_network_interface(self, id: str, body: Any) -> None:  # noqa: A002
        self._configure("network_interface", lambda: NetworkInterface.from_json(
            body, f"PUT /network-interfaces/{id}", path_id=id))

    def patch_network_interface(self, id: str, body: Any) -> None:  # noqa: A002
        where = f"PATCH /network-interfaces/{id}"
        if self.vm.state == "Not started":
            raise ApiError(BEFORE_START)
        rx, tx = NetworkInterface.patch_from_json(body, where, id)
        self.vm.update_network_interface(id, rx_rate_limiter=rx, tx_rate_limiter=tx)

    def put_entropy(self, body: Any) -> None:
        self._configure("entropy", lambda: Entropy.from_json(body, "PUT /entropy"))

    def put_vsock(self, body: Any) -> None:
        self._configure("vsock", lambda: Vsock.from_json(body, "PUT /vsock"))

    def put_logger(self, body: Any) -> None:
        self._configure("logger", lambda: Logger.from_json(body, "PUT /logger"))

    def put_metrics(self, body: Any) -> None:
        self._configure("metrics", lambda: Metrics.from_json(body, "PUT /metrics"))

    def put_serial(self, body: Any) -> None:
        self._configure("serial", lambda: SerialConfig.from_json(body, "PUT /serial"))

    def put_action(self, body: Any) -> None:
        if not isinstance(body, dict) or set(body) - {"action_type"} or \
                not isinstance(body.get("action_type"), str):
            raise ApiError("PUT /actions: the body must be {\"action_type\": \"InstanceStart\"|"
                           "\"SendCtrlAltDel\"|\"FlushMetrics\"}")
        action = body["action_type"]
        if action == "InstanceStart":
            self.vm.start()
        elif action == "SendCtrlAltDel":
            self.vm.send_ctrl_alt_del()
        elif action == "FlushMetrics":
            self.vm.flush_metrics()
        else:
            raise ApiError(f"PUT /actions: unknown action_type {action!r}: use InstanceStart, "
                           "SendCtrlAltDel or FlushMetrics")

    # -- MMDS: the configuration before start; the data at any time ---------------------

    def put_mmds_config(self, body: Any) -> None:
        from pyvmm.mmds.config import MmdsConfig
        self._configure("mmds_config", lambda: MmdsConfig.from_json(body, "PUT /mmds/config"))

    def put_mmds_other(self, rest: str, body: Any) -> None:
        raise ApiError(f"Unrecognized PUT request path `{rest}`.")   # Firecracker's words

    def _mmds_store(self):
        store = self.vm.mmds_if_initialized()
        if store is None:
            raise ApiError("MMDS error: The MMDS data store is not initialized. (Configure "
                           "MMDS with PUT /mmds/config before InstanceStart.)")
        return store

    def get_mmds(self) -> Any:
        value = self._mmds_store().get()
        return {} if value is None else value       # Firecracker shows an empty store as {}

    def put_mmds(self, body: Any) -> None:
        self._mmds_call(lambda store: store.put(body))

    def patch_mmds(self, body: Any) -> None:
        self._mmds_call(lambda store: store.patch(body))

    def _mmds_call(self, call: Callable[[Any], None]) -> None:
        from pyvmm.mmds.config import MmdsError
        store = self._mmds_store()
        try:
            call(store)
        except MmdsError as exc:          # with Firecracker's status: 413 for the limit
            error = ApiError(str(exc))
            error.http_status = exc.status      # type: ignore[attr-defined]
            raise error from None

    def patch_vm(self, body: Any) -> None:
        if not isinstance(body, dict) or set(body) != {"state"} or \
                body["state"] not in ("Paused", "Resumed"):
            raise ApiError("PATCH /vm: the body must be {\"state\": \"Paused\"} or "
                           "{\"state\": \"Resumed\"}")
        if body["state"] == "Paused":
            self.vm.pause()
        else:
            self.vm.resume()

    def put_snapshot_create(self, body: Any) -> None:
        from pyvmm.snapshot import parse_create
        if self.vm.state == "Not started":
            raise ApiError(BEFORE_START)
        self.vm.snapshot(*parse_create(body))

    def put_snapshot_load(self, body: Any) -> None:
        from pyvmm.microvm import AFTER_START
        from pyvmm.snapshot import LoadRequest
        if self.vm.state != "Not started":
            raise ApiError(AFTER_START)
        self.vm.load_snapshot(LoadRequest.from_json(body))

    def get_pyvmm_stats(self) -> dict:
        """The exit and device counters (`pyvmm run --stats`'s), live, with the
        exits summed over vCPUs and the server's clock, so rates need no other clock."""
        from pyvmm.kvm import lib
        stats = self.vm.stats
        exits: dict[str, int] = {}
        for per_vcpu in stats.get("vcpus", []):
            for reason, count in per_vcpu.items():
                exits[reason] = exits.get(reason, 0) + count
        result = {"state": self.vm.state, "monotonic_ns": lib.pv_monotonic_ns(),
                  "exits": exits, "devices": stats.get("devices", {}), "stats": stats}
        tracer = getattr(self.vm, "tracer", None)
        if tracer is not None:
            result["trace"] = tracer.stats.as_json()
        return result

    def get_vm_config(self) -> dict:
        return self.vm.spec.to_json()


class ApiServer:
    """The API of one MicroVM on a Unix socket."""

    def __init__(self, vm: MicroVM, path: str | None = None, *, http: HttpServer | None = None,
                 **http_options: Any) -> None:
        """Serve on path, or through http: an HttpServer already bound (the CLI binds
        its socket before importing the rest of pyvmm, so that clients can connect
        sooner; their requests wait in the listen backlog until start())."""
        self.vm = vm
        self.controller = ApiController(vm)
        if http is None:
            if path is None:
                raise ValueError("ApiServer needs a path or an HttpServer")
            http = HttpServer(path, **http_options)
        http.handler = self.controller.handle
        self.http = http

    @property
    def path(self) -> str:
        return self.http.path

    def start(self) -> None:
        self.http.start()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "ApiServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ApiController", "ApiServer", "FIRECRACKER_API_VERSION"]

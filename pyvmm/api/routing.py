"""Which route a request is for, decided the way Firecracker's API server decides it.

Firecracker (src/firecracker/src/api_server/parsed_request.rs, ParsedRequest::try_from)
routes on the method, the first path segment and whether a body came; later segments
are read only where a route takes an id or a sub-resource, and are otherwise ignored
(`PUT /vsock/x` is `PUT /vsock`).  firecracker_route() returns the route's path in
pyvmm's route table (pyvmm.api.server), or the 400 fault_message Firecracker answers
with, word for word:

- a method micro_http does not parse (only GET, PUT, PATCH, DELETE exist there):
  "Invalid HTTP Method: Unsupported HTTP method."; a GET or DELETE with a body:
  "Invalid request.";
- a PUT or PATCH without a body: "Empty PUT request." / "Empty PATCH request.";
- an id segment missing or empty: "The ID cannot be empty."; not letters, digits and
  underscores: "API Resource IDs can only contain alphanumeric characters and underscores.";
- `PUT /snapshot`: "Missing snapshot operation type."; `PUT /snapshot/x`:
  "Invalid request method and/or path: PUT /snapshot/x.";
- anything else: "Invalid request method and/or path: {METHOD} {first segment}."
  (`GET /drives/x` is "... GET drives.", `DELETE /` is "... DELETE .").
"""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("GET", "PUT", "PATCH", "DELETE")
# First segments whose route ignores what follows, per method (Firecracker's match arms).
PLAIN = {
    "GET": ("version", "machine-config", "mmds"),
    "PUT": ("actions", "balloon", "boot-source", "cpu-config", "logger", "serial",
            "machine-config", "metrics", "vsock", "entropy"),
    "PATCH": ("machine-config", "mmds", "vm"),
}
# First segments followed by a resource id.
WITH_ID = {
    "PUT": ("drives", "pmem", "network-interfaces"),
    "PATCH": ("drives", "pmem", "network-interfaces"),
    "DELETE": ("drives", "pmem", "network-interfaces"),
}
EMPTY_ID = "The ID cannot be empty."
INVALID_ID = "API Resource IDs can only contain alphanumeric characters and underscores."


@dataclass(frozen=True)
class Refused:
    """Firecracker's answer to a request it has no route for: a 400 with this message."""
    message: str


def invalid_path_method(method: str, segment: str) -> Refused:
    """Firecracker's RequestError::InvalidPathMethod (the path is its first segment)."""
    return Refused(f"Invalid request method and/or path: {method} {segment}.")


def segments(target: str) -> list[str]:
    """Rust's `target.trim_start_matches('/').split_terminator('/')`."""
    text = target.lstrip("/")
    if not text:
        return []
    parts = text.split("/")
    return parts[:-1] if parts[-1] == "" else parts


def _checked_id(parts: list[str]) -> str | Refused:
    """Firecracker's checked_id() on the segment after the first."""
    ident = parts[1] if len(parts) > 1 else ""
    if not ident:
        return Refused(EMPTY_ID)
    if not all(c == "_" or c.isalnum() for c in ident):
        return Refused(INVALID_ID)
    return f"/{parts[0]}/{ident}"


def firecracker_route(method: str, target: str, has_body: bool) -> str | Refused:
    """The path of the route a request is for ("/drives/d0", "/vsock", ...), or the
    answer Firecracker gives when it has none."""
    if method not in METHODS:
        return Refused("Invalid HTTP Method: Unsupported HTTP method.")
    if has_body and method in ("GET", "DELETE"):
        return Refused("Invalid request.")
    parts = segments(target)
    first = parts[0] if parts else ""
    second = parts[1] if len(parts) > 1 else None
    if method == "PATCH" and first == "balloon":        # PATCH /balloon needs no body
        return "/" + "/".join(parts)
    if method in ("PUT", "PATCH") and not has_body:
        return Refused(f"Empty {method} request.")
    if first in PLAIN.get(method, ()):
        return f"/{first}"
    if first in WITH_ID.get(method, ()):
        return _checked_id(parts)
    routed = _sub_resource(method, first, second, parts)
    return routed if routed is not None else invalid_path_method(method, first)


def _sub_resource(method: str, first: str, second: str | None,
                  parts: list[str]) -> str | Refused | None:
    """The routes that read their second segment; None: no route."""
    if method == "GET" and first == "":
        return "/"
    if method == "GET" and first == "balloon":
        return "/" + "/".join(parts)
    if first == "hotplug" and second == "memory" and method in ("GET", "PUT", "PATCH"):
        return "/hotplug/memory"
    if method == "GET" and first == "vm" and second == "config":
        return "/vm/config"
    if method == "GET" and parts == ["pyvmm", "stats"]:      # pyvmm's own route
        return "/pyvmm/stats"
    if method == "PUT" and first == "mmds":
        return "/mmds" if second is None else f"/mmds/{second}"
    if method == "PUT" and first == "snapshot":
        if second is None:
            return Refused("Missing snapshot operation type.")
        if second not in ("create", "load"):
            return invalid_path_method("PUT", f"/snapshot/{second}")
        return f"/snapshot/{second}"
    return None


__all__ = ["Refused", "firecracker_route", "invalid_path_method", "segments"]

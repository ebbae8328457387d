"""Firecracker's REST API for pyvmm: HTTP/1.1 on a Unix socket (pyvmm.api.http),
the routes over a MicroVM (pyvmm.api.server), and the OpenAPI document of what is
implemented (openapi.json, next to this file)."""
from pathlib import Path

OPENAPI_PATH = Path(__file__).with_name("openapi.json")

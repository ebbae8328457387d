"""A minimal client for the API socket (standard library http.client)."""
from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from pyvmm.closing import Closeable


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class ApiClient(Closeable):
    """client.request("PUT", "/actions", {"action_type": "InstanceStart"}) -> (status, body)
    where body is the decoded JSON (None when empty).  One persistent connection."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._conn: _UnixConnection | None = None

    def request(self, method: str, url: str, body: Any = None,
                raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = _UnixConnection(self.path, self.timeout)
            try:
                headers = {"Content-Type": "application/json", "Accept": "application/json"}
                self._conn.request(method, url, body=data, headers=headers)
                response = self._conn.getresponse()
                payload = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()                 # a closed keep-alive connection: retry once
                if attempt:
                    raise
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        return response.status, (json.loads(payload) if payload else None)

    def get(self, url: str) -> tuple[int, Any]:
        return self.request("GET", url)

    def put(self, url: str, body: Any) -> tuple[int, Any]:
        return self.request("PUT", url, body)

    def patch(self, url: str, body: Any) -> tuple[int, Any]:
        return self.request("PATCH", url, body)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


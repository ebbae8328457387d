"""A small HTTP/1.1 server on a Unix socket, standard library only.

Just what Firecracker's clients need: persistent connections, Content-Length
bodies, `Connection: close`, `Expect: 100-continue`.  Everything malformed is
answered with a 400 (or the connection is closed) and never blocks the server:

- a request line or headers over MAX_HEAD bytes, a body over max_body bytes,
  a bad or conflicting Content-Length, chunked bodies: 400, then close;
- a client that stops half-way through a request: closed after request_timeout;
- an idle persistent connection: closed after idle_timeout;
- more than max_connections at once: the extra ones are closed at once.

Each connection has its own thread; the handler is called with the complete
request, and is expected to serialize its own work.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import socketserver
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pyvmm import seccomp

MAX_HEAD = 16 * 1024              # request line + headers
MAX_HEADERS = 64
MAX_DRAIN = 1 << 20               # an oversized body up to this is read (and dropped)
DEFAULT_MAX_BODY = 51200          # Firecracker's default --http-api-max-payload-size
REASONS = {100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           413: "Payload Too Large", 500: "Internal Server Error"}
TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                        "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)   # lower-case names
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"


class BadRequest(Exception):
    """The bytes on the wire are not a request we accept; the connection closes
    (after reading and dropping `drain` bytes of body, so that the client, still
    sending, sees the answer rather than a broken pipe)."""

    def __init__(self, message: str, status: int = 400, drain: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.drain = drain


class _Closed(Exception):
    """The peer closed the connection, or timed out between requests."""


def fault(message: str) -> bytes:
    """Firecracker's error body."""
    return json.dumps({"fault_message": message}).encode()


Handler = Callable[[Request], Response]
ErrorBody = Callable[[str], bytes]


class Connection:
    def __init__(self, sock: socket.socket, server: "HttpServer") -> None:
        self.sock = sock
        self.server = server
        self.buf = bytearray()

    def _recv(self, deadline: float | None, idle: bool) -> None:
        timeout = self.server.idle_timeout if deadline is None else deadline - time.monotonic()
        if timeout <= 0:
            raise BadRequest("the request was not received in time", 408)
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            if idle:
                raise _Closed() from None
            raise BadRequest("the request was not received in time", 408) from None
        except OSError:
            raise _Closed() from None
        if not data:
            raise _Closed()
        self.buf += data

    def read_request(self) -> Request:
        # The head: wait as long as the idle timeout for its first byte, then at most
        # request_timeout for the whole request.
        deadline = None
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buf) > MAX_HEAD:
                raise BadRequest(f"the request head is longer than {MAX_HEAD} bytes")
            if deadline is None and self.buf:           # pipelined: already here
                deadline = time.monotonic() + self.server.request_timeout
            self._recv(deadline, idle=not self.buf)
            if deadline is None:
                deadline = time.monotonic() + self.server.request_timeout
        if deadline is None:
            deadline = time.monotonic() + self.server.request_timeout
        if end > MAX_HEAD:
            raise BadRequest(f"the request head is longer than {MAX_HEAD} bytes")
        head = bytes(self.buf[:end])
        del self.buf[:end + 4]
        request = self._parse_head(head)
        length = self._content_length(request)
        if length and request.headers.get("expect", "").lower() == "100-continue":
            self._send_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(self.buf) < length:
            self._recv(deadline, idle=False)
        request.body = bytes(self.buf[:length])
        del self.buf[:length]
        return request

    def _parse_head(self, head: bytes) -> Request:
        try:
            text = head.decode("ascii")
        except UnicodeDecodeError:
            raise BadRequest("the request head is not ASCII") from None
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0] or not set(parts[0]) <= TOKEN_CHARS \
                or not parts[1].startswith("/") or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
            raise BadRequest(f"bad request line {lines[0][:80]!r}")
        request = Request(parts[0], parts[1], parts[2])
        if len(lines) - 1 > MAX_HEADERS:
            raise BadRequest(f"more than {MAX_HEADERS} headers")
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or not set(name) <= TOKEN_CHARS:
                raise BadRequest(f"bad header line {line[:80]!r}")
            name, value = name.lower(), value.strip(" \t")
            if name in request.headers:
                if name == "content-length":
                    if request.headers[name] != value:
                        raise BadRequest("conflicting Content-Length headers")
                    continue
                value = request.headers[name] + ", " + value
            request.headers[name] = value
        return request

    def _content_length(self, request: Request) -> int:
        if "transfer-encoding" in request.headers:
            raise BadRequest("Transfer-Encoding is not supported: send a Content-Length")
        text = request.headers.get("content-length")
        if text is None:
            return 0
        if not text.isdigit() or not text.isascii() or len(text) > 18:
            raise BadRequest(f"bad Content-Length {text[:40]!r}")
        length = int(text)
        if length > self.server.max_body:
            raise BadRequest(f"the request body is larger than {self.server.max_body} bytes",
                             413, drain=length if length <= MAX_DRAIN else 0)
        return length

    def _drain(self, length: int) -> None:
        deadline = time.monotonic() + self.server.request_timeout
        try:
            while len(self.buf) < length:
                self._recv(deadline, idle=False)
                if len(self.buf) >= length:
                    break
                length -= len(self.buf)
                self.buf.clear()
        except (BadRequest, _Closed):
            pass
        self.buf.clear()

    def _send_raw(self, data: bytes) -> None:
        self.sock.settimeout(self.server.request_timeout)
        self.sock.sendall(data)

    def send(self, response: Response, close: bool) -> None:
        head = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
                "Server: pyvmm API", f"Content-Length: {len(response.body)}",
                "Connection: close" if close else "Connection: keep-alive"]
        if response.body:
            head.append(f"Content-Type: {response.content_type}")
        self._send_raw(("\r\n".join(head) + "\r\n\r\n").encode() + response.body)

    def serve(self) -> None:
        while True:
            try:
                request = self.read_request()
            except _Closed:
                return
            except BadRequest as exc:
                # Firecracker answers 400 to everything it cannot parse.
                status = 400 if exc.status in (408, 413) else exc.status
                try:
                    self._drain(exc.drain)
                    self.send(Response(status, self.server.error_body(str(exc))), close=True)
                except OSError:
                    pass
                return
            connection = request.headers.get("connection", "").lower()
            close = "close" in connection or \
                (request.version == "HTTP/1.0" and "keep-alive" not in connection)
            try:
                response = self.server.handler(request)
            except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the server
                response = Response(400, self.server.error_body(
                    f"internal error while handling the request: {exc!r}"))
            try:
                self.send(response, close)
            except OSError:
                return
            if close:
                return


class _SocketServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: str, owner: "HttpServer") -> None:
        self.owner = owner
        self.slots = threading.BoundedSemaphore(owner.max_connections)
        super().__init__(path, _RequestHandler, bind_and_activate=False)

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)          # too many connections: drop this one
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore
        # Started by the server thread: it has that thread's "api" filter already.
        seccomp.enter_thread("api", None, "api-conn")
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        pass                                        # a client going away is not news


class _RequestHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        Connection(self.request, self.server.owner).serve()  # type: ignore[attr-defined]


class HttpServer:
    def __init__(self, path: str, handler: Handler | None = None,
                 error_body: ErrorBody = fault, *,
                 max_body: int = DEFAULT_MAX_BODY, request_timeout: float = 10.0,
                 idle_timeout: float = 600.0, max_connections: int = 64) -> None:
        self.path = str(path)
        self.handler = handler
        self.error_body = error_body
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._server: _SocketServer | None = None
        self._thread: threading.Thread | None = None
        # The "api" filter the server thread (and so every connection thread it
        # starts) runs under; the CLI sets it, in-process servers run without.
        self.seccomp: seccomp.Policy | None = None

    def bind(self) -> None:
        """Bind and listen; a stale socket file (nobody listening) is replaced."""
        _remove_stale_socket(self.path)
        server = _SocketServer(self.path, self)
        try:
            # The socket controls the VM: only its owner may connect (mode 0600, as
            # the file is created, so that there is no moment it is open to others).
            previous = os.umask(0o177)
            try:
                server.server_bind()
            finally:
                os.umask(previous)
            server.server_activate()
        except BaseException:
            server.server_close()
            raise
        self._server = server

    def start(self) -> None:
        """bind() if needed, then serve in a background thread."""
        if self._server is None:
            self.bind()
        assert self._server is not None
        self._thread = threading.Thread(target=self._serve, name="api-server",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        seccomp.enter_thread("api", self.seccomp)
        assert self._server is not None
        self._server.serve_forever(poll_interval=0.2)

    def close(self) -> None:
        if self._server is None:
            return
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)                          # nobody listens: a leftover
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another process is serving on {path}", path)

"""The REST API's HTTP transport on its Unix socket, without KVM: keep-alive,
pipelining, Expect: 100-continue, malformed requests, size and time limits,
connection limits, the socket file, and hypothesis on raw bytes."""
from __future__ import annotations

import json
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.api.client import ApiClient
from pyvmm.api.server import ApiServer
from pyvmm.microvm import MicroVM
from tests.framework.api import serve

# -- HTTP on the wire --------------------------------------------------------------------------

def raw_exchange(path: str, data: bytes, timeout: float = 5.0, read_all: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                return out
            if not chunk:
                return out
            out += chunk
            if not read_all:
                return out


def test_get_with_content_length_zero_and_connection_close(api):
    reply = raw_exchange(api.path, b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
                                   b"Connection: close\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head
    assert json.loads(body)["state"] == "Not started"         # and the server closed it


def test_keep_alive_pipelined_requests(api):
    one = b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /machine-config HTTP/1.1\r\nConnection: close\r\n\r\n"
    reply = raw_exchange(api.path, one * 3 + last)
    assert reply.count(b"HTTP/1.1 200 OK") == 4


def test_put_with_expect_100_continue(api, api_files):
    body = json.dumps({"vcpu_count": 2, "mem_size_mib": 256}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(api.path)
        sock.sendall(b"PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(1000).startswith(b"HTTP/1.1 204 ")


@pytest.mark.parametrize("request_bytes", [
    b"garbage\r\n\r\n",
    b"GET /\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
    b"PUT /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"PUT /vm HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n",
    b"PUT /vm HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"PUT /vm HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
    b"G\xc3\xa9T / HTTP/1.1\r\n\r\n",
    b"\x00\x01\x02\r\n\r\n",
], ids=["no-version-garbage", "http09", "http2", "bad-header", "negative-length",
        "bad-length", "conflicting-lengths", "chunked", "huge-length", "huge-head",
        "non-ascii", "binary"])
def test_malformed_requests_get_400_and_the_server_lives(api, request_bytes):
    reply = raw_exchange(api.path, request_bytes)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b"fault_message" in reply
    assert api.call("GET", "/", expect=200)


def test_a_body_over_the_limit_is_refused(api):
    raw = json.dumps({"kernel_image_path": "x" * 60000}).encode()
    status, fault = api.request("PUT", "/boot-source", raw=raw)
    assert status == 400 and "larger than" in fault["fault_message"]
    assert api.call("GET", "/", expect=200)


def test_a_slow_client_is_cut_off_and_others_are_served_meanwhile(api):
    """request_timeout is 1 s here: a client that stops half-way gets a 400 and a
    closed connection, and never blocks anyone else."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.settimeout(10)
        slow.connect(api.path)
        slow.sendall(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu")
        started = time.monotonic()
        assert api.call("GET", "/", expect=200)         # served while the slow one waits
        reply = slow.recv(1000)
        assert reply.startswith(b"HTTP/1.1 400 ") and b"in time" in reply
        assert slow.recv(1000) == b""                    # closed
        assert time.monotonic() - started < 5
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dribble:
        dribble.settimeout(10)
        dribble.connect(api.path)
        started = time.monotonic()
        try:
            for _ in range(40):                          # a byte every 0.1 s never ends
                dribble.sendall(b"G")
                time.sleep(0.1)
        except OSError:
            pass                                         # cut off: good
        assert time.monotonic() - started < 3.5
        assert dribble.recv(1000).startswith(b"HTTP/1.1 400 ")


def test_too_many_connections_are_dropped_not_queued(api_files):
    vm, server = serve(api_files, max_connections=4, idle_timeout=30)
    socks = []
    try:
        for _ in range(4):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(server.path)
            socks.append(sock)
        time.sleep(0.2)
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.settimeout(5)
        extra.connect(server.path)
        assert extra.recv(100) == b""                    # dropped at once
        extra.close()
        socks.pop().close()                              # a slot frees up
        time.sleep(0.2)
        with ApiClient(server.path) as client:
            assert client.get("/")[0] == 200
    finally:
        for sock in socks:
            sock.close()
        server.close()
        vm.close()


def test_a_stale_socket_file_is_replaced_and_a_live_one_is_not(api_files):
    path = api_files / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()                                        # the file stays, nobody listens
    vm, server = serve(api_files)
    try:
        with pytest.raises(OSError, match="another process"):
            ApiServer(MicroVM.unconfigured(), str(path)).start()
        assert ApiClient(str(path)).get("/")[0] == 200
    finally:
        server.close()
        vm.close()
    assert not path.exists()                             # removed at close


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_on_the_wire_never_hang_or_kill_the_server(shared_api, data):
    client, _ = shared_api
    reply = raw_exchange(client.path, data + b"\r\n\r\n", timeout=5.0)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 "), reply[:100]
    assert client.get("/")[0] == 200



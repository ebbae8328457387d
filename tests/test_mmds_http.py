"""MMDS as the guest sees it: HTTP requests into Mmds.handle(), responses out.

The expectations come from Firecracker's own tests where it has them
(src/vmm/src/mmds/mod.rs, data_store.rs, token.rs; micro-http's request.rs).
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.mmds import MAX_REQUEST_BYTES, DataStore, HttpReply, Mmds, MmdsConfig
from pyvmm.mmds import service
from pyvmm.mmds.service import (INVALID_TOKEN, METHOD_NOT_ALLOWED, NO_TOKEN_PROVIDED,
                                NO_TTL_PROVIDED, UNSUPPORTED_VALUE_TYPE)

# mod.rs's populate_mmds().
DATA = {"name": {"first": "John", "second": "Doe"}, "age": 43,
        "phones": {"home": {"RO": "+401234567", "UK": "+441234567"}, "mobile": "+442345678"}}
DATA_JSON = (b'{"age":43,"name":{"first":"John","second":"Doe"},"phones":{"home":'
             b'{"RO":"+401234567","UK":"+441234567"},"mobile":"+442345678"}}')


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Reply:
    def __init__(self, reply: HttpReply) -> None:
        head, _, self.body = reply.response.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status_line = lines[0]
        self.version, code, self.reason = lines[0].split(" ", 2)
        self.status = int(code)
        self.headers = dict(line.split(": ", 1) for line in lines[1:])
        self.close = reply.close
        self.consumed = reply.consumed
        assert int(self.headers["Content-Length"]) == len(self.body)
        assert self.headers["Connection"] == ("close" if reply.close else "keep-alive")

    @property
    def text(self) -> str:
        return self.body.decode()


def make(version: str = "V1", imds_compat: bool = False, data=DATA,
         clock: Clock | None = None) -> Mmds:
    mmds = Mmds(MmdsConfig(version=version, network_interfaces=["eth0"],
                           imds_compat=imds_compat), clock=clock or Clock())
    if data is not None:
        mmds.store.put(data)
    return mmds


def request(mmds: Mmds, raw: bytes | str) -> Reply:
    raw = raw.encode() if isinstance(raw, str) else raw
    reply = mmds.handle(raw)
    assert reply is not None
    assert reply.consumed == len(raw)
    return Reply(reply)


def get(mmds: Mmds, path: str, *headers: str, version: str = "HTTP/1.1") -> Reply:
    return request(mmds, f"GET {path} {version}\r\n" + "".join(h + "\r\n" for h in headers)
                   + "\r\n")


def new_token(mmds: Mmds, ttl: int | str = 60,
              header: str = "X-metadata-token-ttl-seconds") -> str:
    reply = request(mmds, f"PUT /latest/api/token HTTP/1.1\r\n{header}: {ttl}\r\n\r\n")
    assert reply.status == 200, reply.text
    assert reply.headers["Content-Type"] == "text/plain"
    return reply.text


# -- V1 and the output formats ------------------------------------------------------------

def test_v1_get_json() -> None:
    reply = get(make(), "http://169.254.169.254/", "Accept: application/json",
                version="HTTP/1.0")
    assert (reply.version, reply.status) == ("HTTP/1.0", 200)
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.body == DATA_JSON


@pytest.mark.parametrize("accept", [None, "Accept:", "Accept: */*", "Accept: text/plain",
                                    "Accept: application/json, text/plain"])
def test_v1_get_imds_listing_unless_json_is_asked(accept) -> None:
    """mod.rs: test_request_accept_header.  Objects list their keys, sorted, "/" after
    objects; only exactly "application/json" asks for JSON."""
    reply = get(make(), "/", *([accept] if accept else []))
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/plain"
    assert reply.text == "age\nname/\nphones/"


def test_imds_leaves_and_paths() -> None:
    """data_store.rs: test_get_value, in both formats."""
    data = {"name": {"first": "John", "second": "Doe"}, "age": 43,
            "phones": ["+401234567", "+441234567"], "member": False,
            "shares_percentage": 12.12, "balance": -24,
            "json_string": "{\n  \"hello\": \"world\"\n}", "empty": {}, "nothing": None}
    mmds = make(data=data)
    assert get(mmds, "/name").text == "first\nsecond"
    assert get(mmds, "/name", "Accept: application/json").text == \
        '{"first":"John","second":"Doe"}'
    assert get(mmds, "/name/first").text == "John"
    assert get(mmds, "/json_string").text == "{\n  \"hello\": \"world\"\n}"
    assert get(mmds, "/json_string", "Accept: application/json").text == \
        '"{\\n  \\"hello\\": \\"world\\"\\n}"'
    assert get(mmds, "/phones/0/").text == "+401234567"
    assert get(mmds, "/phones/0", "Accept: application/json").text == '"+401234567"'
    assert get(mmds, "/empty").text == ""
    for path in ("/age", "/phones", "/phones/", "/member", "/shares_percentage", "/balance",
                 "/nothing"):
        reply = get(mmds, path)
        assert (reply.status, reply.text) == (501, UNSUPPORTED_VALUE_TYPE)
        assert not reply.close
    json_of = {"/age": "43", "/phones/": '["+401234567","+441234567"]', "/member": "false",
               "/shares_percentage": "12.12", "/balance": "-24", "/nothing": "null"}
    for path, text in json_of.items():
        assert get(mmds, path, "Accept: application/json").text == text


def test_imds_compat_ignores_accept() -> None:
    reply = get(make(imds_compat=True), "/name", "Accept: application/json")
    assert reply.text == "first\nsecond"
    assert reply.headers["Content-Type"] == "text/plain"
    reply = get(make(imds_compat=True), "/age", "Accept: application/json")
    assert (reply.status, reply.text) == (501, UNSUPPORTED_VALUE_TYPE)


def test_not_found_names_the_path_as_sent() -> None:
    mmds = make()
    for path in ("/invalid", "/name//missing", "/name/first/x", "/phones/home/RO/0",
                 "/name?x=1", "/n%61me", "/name/..", "/phones/01"):
        reply = get(mmds, path)
        assert (reply.status, reply.text) == (404, f"Resource not found: {path}.")
        assert reply.headers["Content-Type"] == "text/plain"
        assert not reply.close


def test_paths_as_firecracker_reads_them() -> None:
    """Runs of "/" are one; one trailing "/" is ignored; the http:// absolute form
    works; no percent-decoding, no query stripping, ".." is a key; RFC 6901 escapes."""
    mmds = make(data={"a": {"b": "c"}, "x/y": "slash", "t~": "tilde", "..": "dots",
                      "q?": "query", "l": ["zero", "one"]})
    assert get(mmds, "//a///b").text == "c"
    assert get(mmds, "/a/b/").text == "c"
    assert get(mmds, "http://169.254.169.254:80//a/b").text == "c"
    assert get(mmds, "/x~1y").text == "slash"
    assert get(mmds, "/t~0").text == "tilde"
    assert get(mmds, "/..").text == "dots"
    assert get(mmds, "/q?").text == "query"
    assert get(mmds, "/l/1").text == "one"
    for path in ("/l/01", "/l/+1", "/l/2", "/l/-1", "/l/x"):
        assert get(mmds, path).status == 404


def test_invalid_uri() -> None:
    """mod.rs: test_convert_to_response_negative (a target without an absolute path)."""
    for target in ("http://", "http://169.254.169.254", "*", "latest"):
        reply = get(make(), target)
        assert (reply.status, reply.text) == (400, "Invalid URI.")


def test_store_changes_are_seen_at_once_and_null_store() -> None:
    mmds = make(data=None)
    assert get(mmds, "/", "Accept: application/json").text == "null"
    assert get(mmds, "/").status == 501
    assert get(mmds, "/a").status == 404
    mmds.store.put({"a": "1"})
    assert get(mmds, "/a").text == "1"
    mmds.store.patch({"a": None, "b": {"c": "2"}})
    assert get(mmds, "/").text == "b/"


def test_shared_store() -> None:
    store = DataStore()
    mmds = Mmds(MmdsConfig(network_interfaces=["eth0"]), store)
    assert mmds.store is store
    store.put({"k": "v"})
    assert get(mmds, "/k").text == "v"


def test_v1_takes_tokens_but_needs_none() -> None:
    """mod.rs: test_respond_to_request_mmdsv1; the metrics count what V2 would refuse."""
    mmds = make()
    assert get(mmds, "/name/first").text == "John"
    assert get(mmds, "/name/first", "X-metadata-token: INVALID_TOKEN").text == "John"
    token = new_token(mmds)
    assert get(mmds, "/name/first", f"X-metadata-token: {token}").text == "John"
    assert mmds.counters["rx_no_token"] == 1
    assert mmds.counters["rx_invalid_token"] == 1


# -- V2 tokens --------------------------------------------------------------------------------

@pytest.mark.parametrize("ttl_header, token_header", [
    ("X-metadata-token-ttl-seconds", "X-metadata-token"),
    ("X-aws-ec2-metadata-token-ttl-seconds", "X-aws-ec2-metadata-token"),
    ("x-METADATA-token-TTL-seconds", "x-aws-EC2-metadata-TOKEN"),
])
def test_v2_token_flow(ttl_header, token_header) -> None:
    mmds = make("V2")
    reply = request(mmds, f"PUT /latest/api/token HTTP/1.1\r\n{ttl_header}: 21600\r\n\r\n")
    assert reply.status == 200
    assert reply.headers[ttl_header] == "21600"            # echoed as the guest spelled it
    token = reply.text
    assert len(token) == 48                               # as Firecracker's: 36 bytes, base64
    assert get(mmds, "/name/first", f"{token_header}: {token}").text == "John"
    reply = get(mmds, "/", "Accept: application/json", f"{token_header}:{token}")
    assert reply.body == DATA_JSON


def test_v2_missing_or_invalid_token_401() -> None:
    mmds = make("V2")
    reply = get(mmds, "/")
    assert (reply.status, reply.text) == (401, NO_TOKEN_PROVIDED)
    assert reply.headers["Content-Type"] == "text/plain"
    assert not reply.close
    token = new_token(mmds)
    bad = [
        "INVALID_TOKEN", "", token[:-1], token + "=", token[:-2] + ("AA" if token[-2:] != "AA"
                                                                      else "BB"),
        token * 2, "é" * 48, "A" * 71,
    ]
    for wrong in bad:
        reply = get(mmds, "/", f"X-metadata-token: {wrong}")
        assert (reply.status, reply.text) == (401, INVALID_TOKEN), wrong
    assert mmds.counters["rx_no_token"] == 1
    assert mmds.counters["rx_invalid_token"] == len(bad)


def test_v2_token_expires_after_its_ttl() -> None:
    clock = Clock()
    mmds = make("V2", clock=clock)
    token = new_token(mmds, ttl=1)
    clock.now += 0.999
    assert get(mmds, "/name/first", f"X-metadata-token: {token}").status == 200
    clock.now += 0.001                   # expiry > now, in ms, as token.rs: now it is not
    reply = get(mmds, "/name/first", f"X-metadata-token: {token}")
    assert (reply.status, reply.text) == (401, INVALID_TOKEN)
    long = new_token(mmds, ttl=21600)
    clock.now += 21599
    assert get(mmds, "/", f"X-metadata-token: {long}").status == 200
    clock.now += 1
    assert get(mmds, "/", f"X-metadata-token: {long}").status == 401


def test_tokens_die_with_the_instance() -> None:
    """A restored VM has a new Mmds, hence a new key: its predecessor's tokens fail."""
    store = DataStore()
    store.put(DATA)
    first = Mmds(MmdsConfig(version="V2", network_interfaces=["eth0"]), store)
    token = new_token(first)
    second = Mmds(first.config, store)
    assert get(second, "/", f"X-metadata-token: {token}").status == 401
    assert get(first, "/", f"X-metadata-token: {token}").status == 200


def test_tokens_differ() -> None:
    mmds = make("V2")
    assert len({new_token(mmds) for _ in range(20)}) == 20


@pytest.mark.parametrize("value, ttl", [("1", 1), ("21600", 21600), ("+5", 5), ("00060", 60)])
def test_ttl_values_accepted(value, ttl) -> None:
    """As Rust's u32::from_str: a leading "+" and zeros are fine; the echo is the number."""
    reply = request(make("V2"), f"PUT /latest/api/token HTTP/1.1\r\n"
                                f"X-metadata-token-ttl-seconds: {value}\r\n\r\n")
    assert reply.status == 200
    assert reply.headers["X-metadata-token-ttl-seconds"] == str(ttl)


@pytest.mark.parametrize("value", ["0", "21601", "4294967295"])
def test_ttl_out_of_range(value) -> None:
    """mod.rs: test_respond_to_put_request."""
    reply = request(make("V2"), f"PUT /latest/api/token HTTP/1.1\r\n"
                                f"X-metadata-token-ttl-seconds: {value}\r\n\r\n")
    assert (reply.status, reply.text) == (
        400, f"Invalid time to live value provided for token: {value}. Please provide a value "
             "between 1 and 21600.")
    assert not reply.close


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "", "4294967296", "1.5", "٣",
                                   "1_000", "application/json"])
def test_ttl_not_a_number(value) -> None:
    for header in ("X-metadata-token-ttl-seconds", "X-aws-ec2-metadata-token-ttl-seconds"):
        reply = request(make("V1"), f"PUT /latest/api/token HTTP/1.1\r\n{header}: {value}"
                                    "\r\n\r\n")
        assert (reply.status, reply.text) == (
            400, f"Invalid header. Reason: Invalid value. Key:{header}; Value:{value}")


def test_ttl_missing() -> None:
    reply = request(make("V2"), "PUT /latest/api/token HTTP/1.1\r\n\r\n")
    assert (reply.status, reply.text) == (400, NO_TTL_PROVIDED)
    reply = request(make("V2"), "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token: x\r\n\r\n")
    assert (reply.status, reply.text) == (400, NO_TTL_PROVIDED)


def test_ttl_ignored_on_get() -> None:
    """mod.rs: an invalid TTL header on a GET is no error."""
    mmds = make("V2")
    token = new_token(mmds)
    reply = get(mmds, "/", f"X-metadata-token: {token}",
                "X-metadata-token-ttl-seconds: application/json")
    assert reply.status == 200


def test_duplicated_ttl_headers_the_last_wins() -> None:
    reply = request(make("V2"), "PUT /latest/api/token HTTP/1.1\r\n"
                                "X-metadata-token-ttl-seconds: 0\r\n"
                                "X-metadata-token-ttl-seconds: 5\r\n\r\n")
    assert reply.status == 200


@pytest.mark.parametrize("header", ["X-Forwarded-For", "x-forwarded-for", "X-fOrWaRdEd-FoR"])
def test_x_forwarded_for_refused_on_token_put(header) -> None:
    """mod.rs: test_respond_to_put_request (checked before the path, too)."""
    for path in ("/latest/api/token", "/elsewhere"):
        reply = request(make("V2"), f"PUT {path} HTTP/1.1\r\n{header}: 203.0.113.195\r\n"
                                    "X-metadata-token-ttl-seconds: 60\r\n\r\n")
        assert (reply.status, reply.text) == (
            400, f"Invalid header. Reason: Unsupported header name. Key: {header}")


def test_x_forwarded_for_is_fine_on_get() -> None:
    assert get(make(), "/name/first", "X-Forwarded-For: 10.0.0.1").status == 200


def test_put_elsewhere_404() -> None:
    mmds = make("V2")
    for path in ("/token", "/latest/api/token/", "/latest/api/token?x", "/"):
        reply = request(mmds, f"PUT {path} HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n")
        assert (reply.status, reply.text) == (404, f"Resource not found: {path}.")
    assert request(mmds, "PUT //latest//api///token HTTP/1.1\r\n"
                         "X-metadata-token-ttl-seconds: 60\r\n\r\n").status == 200


# -- methods, versions, connections -----------------------------------------------------------

@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
def test_other_known_methods_405_with_allow(method) -> None:
    reply = request(make("V2"), f"{method} http://169.254.169.255/ HTTP/1.0\r\n\r\n")
    assert (reply.status, reply.text) == (405, METHOD_NOT_ALLOWED)
    assert reply.headers["Allow"] == "GET, PUT"


@pytest.mark.parametrize("method", ["POST", "HEAD", "OPTIONS", "get", "TRACE"])
def test_unknown_methods_501(method) -> None:
    reply = request(make(), f"{method} / HTTP/1.1\r\n\r\n")
    assert (reply.status, reply.text) == (501, "Unsupported HTTP method.")
    assert reply.version == "HTTP/1.1"
    assert reply.close


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9", "http/1.1", "HTTP/1.1 x"])
def test_unknown_versions_501(version) -> None:
    reply = request(make(), f"GET / {version}\r\n\r\n")
    assert (reply.status, reply.text) == (501, "Unsupported HTTP version.")


def test_response_head_shape() -> None:
    """micro-http's Response::write_all: Server, Connection, custom headers,
    Content-Type, Content-Length, in that order."""
    reply = make("V2").handle(b"PUT /latest/api/token HTTP/1.1\r\n"
                              b"X-metadata-token-ttl-seconds: 60\r\n\r\n")
    head = reply.response.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 200 OK"
    assert [line.split(b":")[0] for line in head[1:]] == [
        b"Server", b"Connection", b"X-metadata-token-ttl-seconds", b"Content-Type",
        b"Content-Length"]


def test_connection_close_and_http10() -> None:
    mmds = make()
    assert get(mmds, "/age").close is False
    assert get(mmds, "/name/first", "Connection: close").close is True
    assert get(mmds, "/name/first", "connection: Keep-Alive, Close").close is True
    reply = get(mmds, "/name/first", version="HTTP/1.0")
    assert (reply.version, reply.close) == ("HTTP/1.0", True)
    assert get(mmds, "/name/first", "Connection: keep-alive", version="HTTP/1.0").close is False


def test_pipelined_requests() -> None:
    mmds = make("V2")
    token = new_token(mmds)
    first = f"GET /name/first HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n".encode()
    second = f"GET /name/second HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n".encode()
    third = b"GET /age HTT"
    buf = first + second + third
    reply = mmds.handle(buf)
    assert reply.consumed == len(first) and Reply(reply).text == "John"
    buf = buf[reply.consumed:]
    reply = mmds.handle(buf)
    assert reply.consumed == len(second) and Reply(reply).text == "Doe"
    assert mmds.handle(buf[reply.consumed:]) is None


def test_partial_request_waits() -> None:
    mmds = make()
    raw = b"GET /name/first HTTP/1.1\r\nAccept: text/plain\r\n\r\n"
    for n in range(len(raw)):
        assert mmds.handle(raw[:n]) is None, raw[:n]
    assert Reply(mmds.handle(raw)).text == "John"


def test_request_size_bound() -> None:
    mmds = make()
    # The largest request that fits is answered...
    pad = MAX_REQUEST_BYTES - len("GET / HTTP/1.1\r\nX-Pad: \r\n\r\n")
    raw = f"GET / HTTP/1.1\r\nX-Pad: {'p' * pad}\r\n\r\n".encode()
    assert len(raw) == MAX_REQUEST_BYTES
    assert Reply(mmds.handle(raw)).status == 200
    # ...one that has not ended within MAX_REQUEST_BYTES is refused, and closes.
    assert mmds.handle(raw[:-1]) is None
    big = raw[:-4] + b"x\r\n\r\n"
    reply = mmds.handle(big[:MAX_REQUEST_BYTES])
    assert reply is not None and reply.close
    assert Reply(reply).status == 413
    huge = b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n"
    reply = Reply(mmds.handle(huge))
    assert (reply.status, reply.close) == (413, True)


# -- malformed requests: answered as micro_http does, then the connection closes ----------------

@pytest.mark.parametrize("raw, status, message", [
    (b"GET / HTTP/1.1\n\n", 400, "Invalid request."),                 # no CRLF
    (b"GET / HTTP/1.1\r\nA: b\n\n", 400, "Invalid request."),          # LF LF ends it
    (b"GET /\r\n\r\n", 400, "Invalid request."),                       # too short
    (b"GET/ab/cd/HTTP/1.1\r\n\r\n", 400, "Invalid request."),          # no spaces
    (b"GET  HTTP/1.1 x\r\n\r\n", 400, "Empty URI not allowed."),
    (b"GET /\xff HTTP/1.1\r\n\r\n", 400, "Cannot parse URI as UTF-8."),
    (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400,
     "Invalid header. Reason: Header is incorrectly formatted. Key: NoColon"),
    (b"GET / HTTP/1.1\r\nA: \xff\r\n\r\n", 400, "Invalid request."),
    (b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400,
     "Invalid header. Reason: Invalid value. Key:Content-Length; Value: abc"),
    (b"GET / HTTP/1.1\r\nContent-Length: 4\r\n\r\n", 400, "Invalid request."),
    (b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 2\r\n\r\n", 400, "Invalid request."),
    (b"GET / HTTP/1.1\r\nAccept-Encoding:\r\n\r\n", 400, "Invalid request."),
    (b"GET / HTTP/1.1\r\nAccept-Encoding: gzip, identity;q=0\r\n\r\n", 400,
     "Invalid header. Reason: Invalid value. Key:Accept-Encoding; Value: identity;q=0"),
    (b"GET / HTTP/1.1\r\nAccept-Encoding: *;q=0\r\n\r\n", 400,
     "Invalid header. Reason: Invalid value. Key:Accept-Encoding; Value:*;q=0"),
])
def test_malformed_requests(raw, status, message) -> None:
    reply = request(make(), raw)
    assert (reply.status, reply.text, reply.close) == (status, message, True)
    assert reply.version == "HTTP/1.1"
    assert reply.headers["Content-Type"] == "text/plain"


def test_headers_micro_http_accepts() -> None:
    mmds = make()
    ok = ["Content-Length: 0", "Content-Length: +0", "Content-Type: whatever",
          "Expect: 100-continue", "Server: x", "Accept-Encoding: gzip",
          "Accept-Encoding: identity, *;q=0", "Transfer-Encoding: identity",
          "X-Empty:", "Last-Modified: Tue, 15 Nov 1994 12:45:26 GMT", "  Spaced  :  v  "]
    for header in ok:
        assert get(mmds, "/name/first", header).status == 200, header


def test_chunked_is_refused() -> None:
    reply = request(make(), "PUT /latest/api/token HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                            "X-metadata-token-ttl-seconds: 60\r\n\r\n")
    assert (reply.status, reply.close) == (400, True)


# -- no input breaks it ------------------------------------------------------------------------

VALID = [
    b"GET /name/first HTTP/1.1\r\nAccept: application/json\r\n\r\n",
    b"PUT /latest/api/token HTTP/1.0\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
    b"GET http://169.254.169.254/phones/ HTTP/1.1\r\nX-aws-ec2-metadata-token: abc\r\n"
    b"Connection: close\r\n\r\n",
]


def check(mmds: Mmds, buf: bytes) -> None:
    """_handle (without handle()'s last-resort net) returns None or a well-formed reply."""
    reply = mmds._handle(buf)
    if reply is None:
        assert len(buf) < MAX_REQUEST_BYTES
        return
    assert 0 < reply.consumed <= len(buf)
    parsed = Reply(reply)
    assert parsed.status in service.REASONS
    if parsed.status in (400, 413, 501) and parsed.version == "HTTP/1.1" and reply.close:
        return
    assert parsed.status in (200, 400, 401, 404, 405, 501)


@settings(max_examples=300, deadline=None)
@given(buf=st.binary(max_size=400))
def test_random_bytes(buf) -> None:
    for version in ("V1", "V2"):
        check(make(version), buf)


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, len(VALID) - 1), data=st.data())
def test_mutated_requests(index, data) -> None:
    raw = bytearray(VALID[index])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = data.draw(st.sampled_from([0, 9, 10, 13, 32, 58, 47, 126, 128, 255, 0xC3]))
        if action == "insert":
            raw.insert(pos, byte)
        elif pos < len(raw):
            if action == "delete":
                del raw[pos]
            else:
                raw[pos] = byte
    for version in ("V1", "V2"):
        check(make(version, imds_compat=data.draw(st.booleans())), bytes(raw))


@settings(max_examples=100, deadline=None)
@given(headers=st.lists(st.tuples(
    st.sampled_from(["X-metadata-token", "x-aws-ec2-metadata-token", "Accept", "Connection",
                     "X-metadata-token-ttl-seconds", "X-Forwarded-For", "Content-Length",
                     "Accept-Encoding", "Transfer-Encoding", "Host"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)),
    max_size=8),
    method=st.sampled_from(["GET", "PUT"]))
def test_random_headers_and_duplicates(headers, method) -> None:
    raw = (f"{method} /latest/api/token HTTP/1.1\r\n"
           + "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n")
    check(make("V2"), raw.encode("utf-8"))


@pytest.mark.parametrize("raw", VALID)
def test_every_prefix(raw) -> None:
    mmds = make("V2")
    for n in range(len(raw) + 1):
        check(mmds, raw[:n])


def test_handle_never_raises() -> None:
    mmds = make()
    mmds.store.current = None        # break the service: the guest still gets an answer
    reply = mmds.handle(b"GET / HTTP/1.1\r\n\r\n")
    assert Reply(reply).status == 500 and reply.close

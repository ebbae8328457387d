"""The guest's side of MMDS: HTTP requests in, HTTP responses out.

The TCP stack (pyvmm.mmds.netstack) hands Mmds.handle() the bytes a connection
has received and not yet consumed; handle() answers one request at a time, as
Firecracker does with its micro_http parser behind its dumbo TCP endpoint.  What
is matched, and where it comes from in Firecracker's source:

- the end of a request: the first "\\n\\n" or "\\n\\r\\n", at most
  MAX_REQUEST_BYTES in (src/vmm/src/dumbo/tcp/endpoint.rs: receive_segment);
  requests have no body;
- the request line and headers, their errors and the status of each (micro-http
  src/request.rs, src/common/headers.rs; endpoint.rs: parse_request_bytes);
- GET for data, PUT only for /latest/api/token, PATCH and DELETE 405 with
  `Allow: GET, PUT`, other methods and HTTP versions 501; JSON pointers from the
  path with "//" collapsed and one trailing "/" ignored; the JSON and IMDS
  output formats; V1 answering with or without a token, V2 only with a valid
  one; token TTLs and X-Forwarded-For (src/vmm/src/mmds/mod.rs, data_store.rs,
  token.rs, token_headers.rs);
- the response head's shape and order (micro-http src/response.rs).

Where pyvmm differs, on purpose: a malformed request is answered and the
connection closed (Firecracker answers and goes on parsing what follows, which
after a request with a body is the body); `Connection: close` and HTTP/1.0
without keep-alive close the connection after the answer (Firecracker keeps every
connection); a request that fills MAX_REQUEST_BYTES without ending gets a 413
(Firecracker resets the connection); status lines carry a reason phrase and
error bodies say text/plain (micro_http leaves the first empty and labels the
second application/json); with imds_compat, the Content-Type is text/plain
whatever the Accept header (Firecracker's swagger says so, its code echoes the
Accept type); the server's name is pyvmm's.

Session tokens: Firecracker seals the expiry with AES-256-GCM under a key drawn
at start, so it keeps no token state and a restored VM (a new key) refuses old
tokens.  The standard library has no AEAD, so a token here is the expiry in the
clear, a random nonce and an HMAC-SHA256 tag (truncated to GCM's 16 bytes) under
a per-instance key: the same size (36 bytes, 48 base64 characters), the same
statelessness, the same death with the instance.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pyvmm.mmds.config import MmdsConfig
from pyvmm.mmds.store import DataStore, encode

log = logging.getLogger("pyvmm.mmds")

# Firecracker's RCV_BUF_MAX_SIZE (src/vmm/src/dumbo/tcp/endpoint.rs), "plenty for
# imaginable regular MMDS requests": a request is a line and a few headers (a
# token is 48 characters; curl or the AWS SDKs send under 500 bytes), and keys of
# the data store long enough to need more are unusable in Firecracker too.  It
# bounds everything a request costs: header count and length, parsing time.
MAX_REQUEST_BYTES = 2500

# src/vmm/src/mmds/token.rs
PATH_TO_TOKEN = "/latest/api/token"
MIN_TOKEN_TTL_SECONDS = 1
MAX_TOKEN_TTL_SECONDS = 21600
TOKEN_LENGTH_LIMIT = 70                   # longer tokens are refused unread
IV_LEN, PAYLOAD_LEN, TAG_LEN, KEY_LEN = 12, 8, 16, 32
MILLISECONDS_PER_SECOND = 1000

# src/vmm/src/mmds/token_headers.rs (compared ignoring ASCII case)
X_FORWARDED_FOR = "x-forwarded-for"
X_METADATA_TOKEN = "x-metadata-token"
X_AWS_EC2_METADATA_TOKEN = "x-aws-ec2-metadata-token"
X_METADATA_TOKEN_TTL_SECONDS = "x-metadata-token-ttl-seconds"
X_AWS_EC2_METADATA_TOKEN_TTL_SECONDS = "x-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADERS = (X_METADATA_TOKEN, X_AWS_EC2_METADATA_TOKEN)
TTL_HEADERS = (X_METADATA_TOKEN_TTL_SECONDS, X_AWS_EC2_METADATA_TOKEN_TTL_SECONDS)

# VmmMmdsError's messages (src/vmm/src/mmds/mod.rs)
INVALID_TOKEN = "MMDS token not valid."
INVALID_URI = "Invalid URI."
METHOD_NOT_ALLOWED = "Not allowed HTTP method."
NO_TOKEN_PROVIDED = ("No MMDS token provided. Use `X-metadata-token` or "
                     "`X-aws-ec2-metadata-token` header to specify the session token.")
NO_TTL_PROVIDED = ("Token time to live value not found. Use `X-metadata-token-ttl-seconds` or "
                   "`X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's "
                   "lifetime.")
# MmdsDatastoreError::UnsupportedValueType (data_store.rs)
UNSUPPORTED_VALUE_TYPE = "Cannot retrieve value. The value has an unsupported type."
# micro-http's RequestError::InvalidRequest
INVALID_REQUEST = "Invalid request."

PLAIN, JSON = "text/plain", "application/json"
SERVER = "pyvmm API"          # micro_http's default is "Firecracker API"; pyvmm's API says this
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 413: "Payload Too Large", 500: "Internal Server Error",
           501: "Not Implemented"}
METHODS = ("GET", "PUT", "PATCH", "DELETE")        # micro-http's Method
VERSIONS = ("HTTP/1.0", "HTTP/1.1")                # micro-http's Version
MIN_REQUEST_LINE = len("GET") + 1 + len("HTTP/1.0") + 2      # RequestLine::min_len
U32_MAX = (1 << 32) - 1
_REQUEST_END = re.compile(rb"\n\r?\n")
_U32 = re.compile(r"\+?[0-9]+")        # what Rust's u32::from_str takes (ASCII digits only)
_INDEX = re.compile(r"0|[1-9][0-9]*")  # serde_json's pointer array index
_SLASHES = re.compile(r"/{2,}")
_TOKEN_TEXT = re.compile(r"[A-Za-z0-9+/]{%d}" % ((IV_LEN + PAYLOAD_LEN + TAG_LEN) // 3 * 4))
# Rust's str::trim removes Unicode White_Space, which is not Python's str.isspace().
_WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_MISSING = object()


@dataclass
class HttpReply:
    """One request's answer: `consumed` bytes of the connection's input were that
    request, `response` goes back to the guest, then the connection closes if `close`."""
    consumed: int
    response: bytes
    close: bool


class _Malformed(Exception):
    """micro_http could not parse the request (endpoint.rs: parse_request_bytes)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Request:
    method: str
    path: str                      # Uri::get_abs_path: "" when there is none
    version: str
    accept_json: bool = False
    # micro_http keeps the headers it does not know by name, trimmed, as sent.
    custom: list[tuple[str, str]] = field(default_factory=list)
    chunked: bool = False

    def header(self, names: tuple[str, ...]) -> tuple[str, str] | None:
        """The (name as sent, value) of the last header called one of names.
        micro_http keeps them in a HashMap and takes whichever it meets first; the
        last one is pyvmm's deterministic choice."""
        for name, value in reversed(self.custom):
            if _ascii_lower(name) in names:
                return name, value
        return None

    @property
    def keep_alive(self) -> bool:
        found = self.header(("connection",))
        options = {_trim(o).lower() for o in found[1].split(",")} if found else set()
        if self.version == "HTTP/1.0":
            return "keep-alive" in options
        return "close" not in options


def _trim(text: str) -> str:
    return text.strip(_WHITE_SPACE)


def _ascii_lower(text: str) -> str:
    # Rust's make_ascii_lowercase: "\u212a" (Kelvin) must not become "k".
    return text.encode("utf-8", "surrogatepass").lower().decode("utf-8", "surrogatepass")


def _parse_u32(text: str) -> int | None:
    if not _U32.fullmatch(text):
        return None
    value = int(text)
    return value if value <= U32_MAX else None


# -- parsing, as micro-http's Request::try_from ---------------------------------------------

def find_request_end(buf: bytes) -> int | None:
    """Where the first request in buf ends (endpoint.rs: a "\\n\\n" or "\\n\\r\\n";
    it looks only once there are more than 2 bytes)."""
    if len(buf) <= 2:
        return None
    match = _REQUEST_END.search(buf)
    return match.end() if match else None


def parse_request(head: bytes) -> _Request:
    line_end = head.find(b"\r\n")
    if line_end < 0 or line_end < MIN_REQUEST_LINE:
        raise _Malformed(400, INVALID_REQUEST)
    line = head[:line_end]
    first = line.find(b" ")
    second = line.find(b" ", first + 1) if first >= 0 else -1
    if second < 0:
        raise _Malformed(400, INVALID_REQUEST)
    method, uri, version = line[:first], line[first + 1:second], line[second + 1:]
    # Checked in this order: RequestLine::try_from builds method, uri, version.
    if method.decode("latin-1") not in METHODS:
        raise _Malformed(501, "Unsupported HTTP method.")
    if not uri:
        raise _Malformed(400, "Empty URI not allowed.")
    try:
        uri_text = uri.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(400, "Cannot parse URI as UTF-8.") from None
    if version.decode("latin-1") not in VERSIONS:
        raise _Malformed(501, "Unsupported HTTP version.")
    request = _Request(method.decode(), abs_path(uri_text), version.decode())
    headers_end = head.find(b"\r\n\r\n", line_end)
    if headers_end < 0:
        raise _Malformed(400, INVALID_REQUEST)
    content_length = 0
    if headers_end > line_end:
        content_length = _parse_headers(request, head[line_end + 2:headers_end])
    if content_length:
        # micro_http wants the body in the same bytes, and the endpoint never
        # passes it any: every request with a body is invalid.
        raise _Malformed(400, INVALID_REQUEST)
    if request.chunked:
        # micro_http ignores it, and would read the body as the next request.
        raise _Malformed(400, "Chunked requests are not supported: MMDS requests have no body.")
    return request


def _parse_headers(request: _Request, block: bytes) -> int:
    """Headers::try_from; returns the Content-Length."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(400, INVALID_REQUEST) from None
    content_length = 0
    for line in text.split("\r\n"):
        if not line:
            break
        name, colon, value = line.partition(":")
        if not colon:
            raise _Malformed(400, "Invalid header. Reason: Header is incorrectly formatted. "
                                  f"Key: {line}")
        key = _trim(_ascii_lower(name))
        if key == "content-length":
            length = _parse_u32(_trim(value))
            if length is None:
                raise _Malformed(400, f"Invalid header. Reason: Invalid value. Key:{name}; "
                                      f"Value:{value}")
            content_length = length
        elif key == "accept":
            # Anything but these two is ignored (UnsupportedValue), the last valid one wins.
            media = _trim(value)
            if media in (PLAIN, JSON):
                request.accept_json = media == JSON
        elif key == "transfer-encoding":
            request.chunked = request.chunked or _trim(value) == "chunked"
        elif key == "accept-encoding":
            _check_accept_encoding(_trim(value))
        elif key in ("content-type", "expect", "server"):
            pass                                    # checked, and then ignored, by micro_http
        else:
            request.custom.append((_trim(name), _trim(value)))
    return content_length


def _check_accept_encoding(value: str) -> None:
    """micro-http's Encoding::try_from: refuses a client that refuses identity."""
    if not value:
        raise _Malformed(400, INVALID_REQUEST)
    for encoding in value.split(","):
        token = _trim(encoding)
        if token == "identity;q=0" or (token == "*;q=0" and "identity" not in value):
            raise _Malformed(400, "Invalid header. Reason: Invalid value. Key:Accept-Encoding; "
                                  f"Value:{encoding}")


def abs_path(uri: str) -> str:
    """micro-http's Uri::get_abs_path: the path of an origin-form or http://
    absolute-form target, query included; "" when there is none."""
    scheme = "http://"
    if uri.startswith(scheme):
        rest = uri[len(scheme):]
        slash = rest.find("/")
        return rest[slash:] if slash >= 0 else ""
    return uri if uri.startswith("/") else ""


def sanitize_uri(path: str) -> str:
    """mod.rs's sanitize_uri: every run of slashes becomes one."""
    return _SLASHES.sub("/", path)


def json_pointer(root: Any, path: str) -> Any:
    """serde_json's Value::pointer (RFC 6901, no percent-decoding); _MISSING when
    nothing is there.  A path ending in "/" names what the path without it names."""
    pointer = path[:-1] if path.endswith("/") else path
    if pointer == "":
        return root
    if not pointer.startswith("/"):
        return _MISSING
    node = root
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(token, _MISSING)
        elif isinstance(node, list):
            if not _INDEX.fullmatch(token) or int(token) >= len(node):
                return _MISSING
            node = node[int(token)]
        else:
            return _MISSING
        if node is _MISSING:
            return _MISSING
    return node


def format_imds(value: Any) -> str | None:
    """data_store.rs's format_imds: an object lists its keys (objects with a "/"),
    a string is itself; anything else cannot be shown (None)."""
    if isinstance(value, dict):
        return "\n".join(key + "/" if isinstance(value[key], dict) else key
                         for key in sorted(value))
    if isinstance(value, str):
        return value
    return None


# -- tokens (token.rs) ------------------------------------------------------------------------

class TokenAuthority:
    """Issues and checks session tokens; keeps no state but its key."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._key = os.urandom(KEY_LEN)
        self._clock = clock

    def _now_ms(self) -> int:
        return max(0, int(self._clock() * MILLISECONDS_PER_SECOND))

    def _tag(self, iv: bytes, payload: bytes) -> bytes:
        return hmac.new(self._key, iv + payload, hashlib.sha256).digest()[:TAG_LEN]

    def generate(self, ttl_seconds: int) -> str:
        """The caller has checked MIN_TOKEN_TTL_SECONDS <= ttl_seconds <= MAX_TOKEN_TTL_SECONDS."""
        expiry = self._now_ms() + ttl_seconds * MILLISECONDS_PER_SECOND
        iv = os.urandom(IV_LEN)
        payload = expiry.to_bytes(PAYLOAD_LEN, "little")
        return base64.b64encode(iv + payload + self._tag(iv, payload)).decode("ascii")

    def is_valid(self, token: str) -> bool:
        if len(token) > TOKEN_LENGTH_LIMIT:
            return False
        # Rust's base64 STANDARD engine decodes only canonical base64, and the token
        # must be 36 bytes: 48 characters, no padding (Python's decoder is laxer).
        if not _TOKEN_TEXT.fullmatch(token):
            return False
        raw = base64.b64decode(token)
        iv, payload, tag = raw[:IV_LEN], raw[IV_LEN:IV_LEN + PAYLOAD_LEN], raw[-TAG_LEN:]
        if not hmac.compare_digest(tag, self._tag(iv, payload)):
            return False
        return int.from_bytes(payload, "little") > self._now_ms()


# -- the service ------------------------------------------------------------------------------

class Mmds:
    """One VM's metadata service: its configuration, its data store, its token key."""

    def __init__(self, config: MmdsConfig, store: DataStore | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.store = store if store is not None else DataStore()
        self.tokens = TokenAuthority(clock)
        # Named as Firecracker's mmds metrics where it has them.
        self.counters = {"rx_count": 0, "rx_bad_requests": 0, "rx_no_token": 0,
                         "rx_invalid_token": 0, "tokens_issued": 0}

    def handle(self, buf: bytes) -> HttpReply | None:
        """Answer the first request in buf, or None while it is incomplete."""
        try:
            return self._handle(buf)
        except Exception:  # noqa: BLE001 - guest bytes must never stop the I/O thread
            log.exception("MMDS: internal error on a %d-byte request", len(buf))
            return HttpReply(len(buf), _response("HTTP/1.1", 500, b"Internal error.", PLAIN,
                                                 close=True), True)

    def _handle(self, buf: bytes) -> HttpReply | None:
        window = bytes(buf[:MAX_REQUEST_BYTES])
        end = find_request_end(window)
        if end is None:
            if len(buf) < MAX_REQUEST_BYTES:
                return None
            self.counters["rx_bad_requests"] += 1
            message = (f"Request too large: no end of headers in its first {MAX_REQUEST_BYTES} "
                       "bytes.").encode()
            return HttpReply(len(buf), _response("HTTP/1.1", 413, message, PLAIN, close=True),
                             True)
        self.counters["rx_count"] += 1
        try:
            request = parse_request(window[:end])
        except _Malformed as exc:
            self.counters["rx_bad_requests"] += 1
            # endpoint.rs answers these with micro_http's default version, HTTP/1.1.
            return HttpReply(end, _response("HTTP/1.1", exc.status, exc.message.encode(), PLAIN,
                                            close=True), True)
        status, body, content_type, extra = self._respond(request)
        close = not request.keep_alive
        return HttpReply(end, _response(request.version, status, body, content_type, close,
                                        extra), close)

    # -- mod.rs: convert_to_response ------------------------------------------------------

    def _respond(self, request: _Request) -> tuple[int, bytes, str, list[str]]:
        if not request.path:
            return 400, INVALID_URI.encode(), PLAIN, []
        if request.method == "GET":
            if self.config.version == "V2":
                refusal = self._check_token(request, required=True)
                if refusal is not None:
                    return refusal
            else:
                self._check_token(request, required=False)
            return self._get(request)
        if request.method == "PUT":
            return self._put(request)
        return 405, METHOD_NOT_ALLOWED.encode(), PLAIN, ["Allow: GET, PUT"]

    def _check_token(self, request: _Request,
                     required: bool) -> tuple[int, bytes, str, list[str]] | None:
        """V2 refuses a request without a valid token; V1 only counts them."""
        found = request.header(TOKEN_HEADERS)
        if found is None:
            self.counters["rx_no_token"] += 1
            return (401, NO_TOKEN_PROVIDED.encode(), PLAIN, []) if required else None
        if not self.tokens.is_valid(found[1]):
            self.counters["rx_invalid_token"] += 1
            return (401, INVALID_TOKEN.encode(), PLAIN, []) if required else None
        return None

    def _get(self, request: _Request) -> tuple[int, bytes, str, list[str]]:
        value = json_pointer(self.store.current(), sanitize_uri(request.path))
        if value is _MISSING:
            return 404, f"Resource not found: {request.path}.".encode(), PLAIN, []
        if request.accept_json and not self.config.imds_compat:
            return 200, encode(value), JSON, []
        text = format_imds(value)
        if text is None:
            return 501, UNSUPPORTED_VALUE_TYPE.encode(), PLAIN, []
        return 200, text.encode("utf-8", "surrogatepass"), PLAIN, []

    def _put(self, request: _Request) -> tuple[int, bytes, str, list[str]]:
        forwarded = request.header((X_FORWARDED_FOR,))
        if forwarded is not None:
            # An X-Forwarded-For means a proxy: tokens are for the guest itself.
            return (400, f"Invalid header. Reason: Unsupported header name. Key: "
                         f"{forwarded[0]}".encode(), PLAIN, [])
        if sanitize_uri(request.path) != PATH_TO_TOKEN:
            return 404, f"Resource not found: {request.path}.".encode(), PLAIN, []
        found = request.header(TTL_HEADERS)
        if found is None:
            return 400, NO_TTL_PROVIDED.encode(), PLAIN, []
        name, value = found
        ttl = _parse_u32(value)
        if ttl is None:
            return (400, f"Invalid header. Reason: Invalid value. Key:{name}; "
                         f"Value:{value}".encode(), PLAIN, [])
        if not MIN_TOKEN_TTL_SECONDS <= ttl <= MAX_TOKEN_TTL_SECONDS:
            return (400, f"Invalid time to live value provided for token: {ttl}. Please provide "
                         f"a value between {MIN_TOKEN_TTL_SECONDS} and "
                         f"{MAX_TOKEN_TTL_SECONDS}.".encode(), PLAIN, [])
        self.counters["tokens_issued"] += 1
        # The TTL header comes back as the guest spelled it (an ASCII name: it matched).
        return 200, self.tokens.generate(ttl).encode(), PLAIN, [f"{name}: {ttl}"]


def _response(version: str, status: int, body: bytes, content_type: str, close: bool,
              extra: list[str] | None = None) -> bytes:
    """micro-http's Response::write_all, header for header."""
    head = [f"{version} {status} {REASONS[status]}", f"Server: {SERVER}",
            "Connection: close" if close else "Connection: keep-alive", *(extra or []),
            f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8", "surrogatepass") + body

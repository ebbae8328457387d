"""The MMDS data store: one JSON value, replaced by PUT /mmds, merged into by
PATCH /mmds (RFC 7396 JSON merge patch), read by GET /mmds and by the guest.

As Firecracker's Mmds (src/vmm/src/mmds/data_store.rs):

- any JSON value is accepted, not only objects (its API parses the body into a
  serde_json::Value and stores it as is); a PATCH whose body is not an object
  replaces the whole value, as RFC 7396 says;
- the size checked against the limit is the length of the compact serialization
  of the whole value after the change (serde_json::to_vec), and a change that
  does not fit leaves the store as it was;
- PATCH before the first PUT is refused: the store is "not initialized";
- GET /mmds answers {} while the store holds null (parsed_request.rs:
  success_response_with_mmds_value).

The API thread writes while the I/O thread answers the guest, so writers hold a
lock and never change a stored value in place: a new value is built (a merge
patch copies the path it changes, and shares the rest) and the root reference is
swapped.  A reader takes the root reference once and walks it without the lock.
"""
from __future__ import annotations

import json
import threading
from typing import Any

from pyvmm.mmds.config import MmdsError, MmdsLimitError

# Firecracker's HTTP_MAX_PAYLOAD_SIZE (src/vmm/src/lib.rs): --mmds-size-limit
# defaults to --http-api-max-payload-size, whose default this is
# (src/firecracker/src/main.rs).
DEFAULT_SIZE_LIMIT = 51200
# serde_json's deserializer starts with a recursion budget of 128
# (serde_json src/de.rs: remaining_depth) and fails when it reaches 0, so
# Firecracker's API refuses a body nested more than 127 arrays/objects deep.
MAX_DEPTH = 127
# Firecracker's messages: VmmActionError::MmdsLimitExceeded and ::Mmds
# (src/vmm/src/rpc_interface.rs) around MmdsDatastoreError's.
LIMIT_EXCEEDED = "MMDS limit exceeded error: The MMDS patch request doesn't fit."
NOT_INITIALIZED = "MMDS error: The MMDS data store is not initialized."


def encode(value: Any) -> bytes:
    """The compact UTF-8 JSON of value, keys sorted as serde_json's map (a
    BTreeMap: byte order of UTF-8, which is code point order) sorts them."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True,
                      allow_nan=False).encode("utf-8")


def _encode_checked(value: Any, what: str) -> bytes:
    try:
        data = encode(value)
    except RecursionError:
        raise MmdsError(f"the MMDS {what} is nested more than {MAX_DEPTH} levels deep") from None
    except UnicodeEncodeError:
        raise MmdsError(f"the MMDS {what} has a string that is not valid Unicode (a lone "
                        "surrogate)") from None
    except (TypeError, ValueError) as exc:
        # Python values only (the API's parser never produces them): a set, NaN, a cycle...
        raise MmdsError(f"the MMDS {what} is not a JSON value: {exc}") from None
    return data


def depth(value: Any) -> int:
    """How many arrays/objects deep value is (a scalar: 0).  Iterative: the value
    comes from the API and may be deeper than Python's recursion limit."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children
                     if isinstance(child, (dict, list)))
    return deepest


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 section 2's MergePatch(Target, Patch), without changing target:
    the objects on the patched paths are copied, the rest is shared.  Recursion
    is as deep as patch, which the callers keep within MAX_DEPTH."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


class DataStore:
    """The JSON value the guest reads through MMDS."""

    def __init__(self, size_limit: int = DEFAULT_SIZE_LIMIT) -> None:
        if isinstance(size_limit, bool) or not isinstance(size_limit, int) or size_limit < 0:
            raise MmdsError(f"the MMDS size limit must be a number of bytes, not {size_limit!r}")
        self.size_limit = size_limit
        self._lock = threading.Lock()
        self._value: Any = None          # never changed in place (see the module's docstring)
        self._encoded = b"null"
        self._initialized = False

    @property
    def initialized(self) -> bool:
        """Whether a PUT has stored a value (PATCH needs one)."""
        return self._initialized

    @property
    def size(self) -> int:
        """The serialized size the limit applies to."""
        return len(self._encoded)

    def put(self, value: Any) -> None:
        """PUT /mmds: replace the whole value."""
        new = self._copy(value, "data")
        with self._lock:
            self._store(new)
            self._initialized = True

    def patch(self, value: Any) -> None:
        """PATCH /mmds: apply an RFC 7396 merge patch."""
        patch = self._copy(value, "patch")
        with self._lock:
            if not self._initialized:
                raise MmdsError(f"{NOT_INITIALIZED} PUT /mmds first; PATCH only changes "
                                "stored data")
            self._store(merge_patch(self._value, patch))

    def get(self) -> Any:
        """GET /mmds's answer: a copy of the value, {} while it is null."""
        encoded = self._encoded
        return {} if encoded == b"null" else json.loads(encoded)

    def current(self) -> Any:
        """The stored value itself, for readers that only read it (the guest's
        requests): it is never changed in place, only replaced."""
        return self._value

    def clear(self) -> None:
        """Back to the state of a new VM (the data does not survive a snapshot)."""
        with self._lock:
            self._value, self._encoded, self._initialized = None, b"null", False

    # -- internals --------------------------------------------------------------------

    def _copy(self, value: Any, what: str) -> Any:
        """A private copy of value, made of JSON types only, checked for depth."""
        encoded = _encode_checked(value, what)
        copy = json.loads(encoded)
        if depth(copy) > MAX_DEPTH:
            raise MmdsError(f"the MMDS {what} is nested more than {MAX_DEPTH} levels deep")
        return copy

    def _store(self, new: Any) -> None:
        """Called with the lock held."""
        encoded = _encode_checked(new, "data")
        if len(encoded) > self.size_limit:
            raise MmdsLimitError(f"{LIMIT_EXCEEDED} The data would take {len(encoded)} bytes "
                                 f"of JSON; the limit is {self.size_limit} bytes.")
        self._value, self._encoded = new, encoded

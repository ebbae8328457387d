"""Reading saved device state back, as hostile input.

save() methods return plain JSON-able dicts (ints, bools, strings, lists;
bytes as base64), which snapshots write to a file.  A snapshot file may be
corrupt or crafted, so restore() reads every field through StateReader: the
wrong type, a value out of range or a missing key is a StateError that names
the field, and a device applies nothing until all of its state has been read.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any

from pyvmm.errors import PyvmmError

U16_MAX = (1 << 16) - 1
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


class StateError(PyvmmError):
    """Saved device state that cannot be restored."""


def encode_bytes(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(data).decode("ascii")


class StateReader:
    """Typed, range-checked access to one saved-state dict; `what` names it in errors."""

    def __init__(self, state: object, what: str) -> None:
        if not isinstance(state, dict):
            raise StateError(f"the saved {what} is {_kind(state)}, not an object")
        self._state: dict[Any, Any] = state
        self.what = what

    def _get(self, key: str) -> object:
        if key not in self._state:
            raise StateError(f"the saved {self.what} has no {key!r}")
        return self._state[key]

    def _fail(self, key: str, wanted: str, value: object) -> StateError:
        return StateError(f"the saved {self.what}'s {key!r} is {_kind(value)}, not {wanted}")

    def number(self, key: str, maximum: int) -> int:
        """An integer in [0, maximum]."""
        value = self._get(key)
        # bool is an int in Python; a saved flag is never a valid count or address.
        if type(value) is not int or not 0 <= value <= maximum:
            raise self._fail(key, f"an integer from 0 to {maximum:#x}", value)
        return value

    def optional_number(self, key: str, maximum: int) -> int | None:
        return None if self._get(key) is None else self.number(key, maximum)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if type(value) is not bool:
            raise self._fail(key, "true or false", value)
        return value

    def text(self, key: str) -> str:
        value = self._get(key)
        if type(value) is not str:
            raise self._fail(key, "a string", value)
        return value

    def optional_text(self, key: str) -> str | None:
        return None if self._get(key) is None else self.text(key)

    def blob(self, key: str, max_length: int) -> bytes:
        """Bytes saved as base64, at most max_length of them."""
        value = self.text(key)
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self._fail(key, "base64", value) from None
        if len(data) > max_length:
            raise StateError(f"the saved {self.what}'s {key!r} holds {len(data)} bytes, "
                             f"more than the {max_length} it can")
        return data

    def optional_blob(self, key: str, max_length: int) -> bytes | None:
        return None if self._get(key) is None else self.blob(key, max_length)

    def items(self, key: str, length: int) -> list[object]:
        """A list of exactly `length` entries."""
        value = self._get(key)
        if type(value) is not list or len(value) != length:
            raise self._fail(key, f"a list of {length}", value)
        return value

    def record(self, key: str) -> object:
        """A nested state, for its own StateReader."""
        return self._get(key)


def _kind(value: object) -> str:
    """How an error message describes a value that may be huge or deeply nested."""
    if value is None or type(value) is bool:
        return repr(value)
    if type(value) is int:
        return f"the integer {value}" if value.bit_length() < 70 else "a huge integer"
    if isinstance(value, (str, list, dict)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"

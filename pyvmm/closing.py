"""Closeable: the context-manager protocol for everything that owns host resources."""
from __future__ import annotations

from typing import TypeVar

Self = TypeVar("Self", bound="Closeable")


class Closeable:
    """`with thing:` closes it at the end, whatever happens inside."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

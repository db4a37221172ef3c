"""A named registry of pluggable pieces (grow criteria, distributions, drop-fraction decays).

One implementation of "register under a unique name, list in registration order, look up with an
error naming the valid choices", so every kind of piece behaves the same way.
"""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Pieces of one kind by name.

    Args:
        kind: what the pieces are called in messages (``"grow criterion"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name``; a name already taken is a ``ValueError``."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._items)

    def get(self, name: str) -> T:
        """The piece registered as ``name``; ``ValueError`` naming the valid ones otherwise."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._items)}") from None

    def snapshot(self) -> dict[str, T]:
        """A copy of the current contents (for :meth:`restore`, e.g. in tests that register pieces)."""
        return dict(self._items)

    def restore(self, snapshot: dict[str, T]) -> None:
        """Return to the contents of an earlier :meth:`snapshot`."""
        self._items = dict(snapshot)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def items(self) -> Iterator[tuple[str, T]]:
        """``(name, piece)`` pairs in registration order."""
        return iter(self._items.items())


__all__ = ["Registry"]

"""A named registry of pluggable pieces: methods, models, datasets, criteria, distributions, decays.

One implementation of "register under a unique name, list, look up with an error naming the valid
choices", so every kind of piece behaves the same way:

* names are listed sorted (whatever the order the modules registering them were imported in);
* an unknown name is ``ValueError("unknown <kind> 'x'; valid: a, b, c")``;
* a name taken twice is ``ValueError("<kind> 'x' is already registered")``;
* each entry may carry a one-line description, for listings (``granet methods``).
"""
from __future__ import annotations

from typing import Callable, Generic, Iterable, Iterator, Optional, TypeVar

#: The type of the entries of a :class:`Registry`.
T = TypeVar("T")


def unknown_name(kind: str, name: object, valid: Iterable[str]) -> str:
    """The message for an unknown name: ``unknown <kind> 'x'; valid: a, b, c``.

    For checks that span several registries (``granet train --method`` takes a sparsifier preset or
    a training procedure) and raise their own error type with the same text.
    """
    return f"unknown {kind} {name!r}; valid: {', '.join(valid)}"


def first_doc_line(obj: object) -> str:
    """The first line of ``obj``'s docstring, or ``""`` (the default description of a builder)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


class Registry(Generic[T]):
    """Pieces of one kind by name.

    Args:
        kind: what the pieces are called in messages (``"grow criterion"``).
        normalise: maps a name to its key, applied on registration and look-up (datasets accept
            ``Fashion-MNIST`` for ``fashion_mnist``); names are used as given without it.
    """

    def __init__(self, kind: str, normalise: Optional[Callable[[str], str]] = None) -> None:
        self.kind = kind
        self._normalise = normalise
        self._items: dict[str, tuple[T, str]] = {}

    def _key(self, name: object) -> Optional[str]:
        if not isinstance(name, str):
            return None
        return self._normalise(name) if self._normalise is not None else name

    def require_new(self, name: object) -> str:
        """The key ``name`` would be registered under; ``ValueError`` if it is not a free, non-empty name."""
        key = self._key(name)
        if key is None or not key.strip():
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if key in self._items:
            raise ValueError(f"{self.kind} {key!r} is already registered")
        return key

    def register(self, name: str, item: T, description: str = "") -> T:
        """Add ``item`` under ``name`` with a one-line ``description``; a name already taken is a ``ValueError``."""
        if not isinstance(description, str) or "\n" in description.strip():
            raise ValueError(f"the description of {self.kind} {name!r} must be one line of text, got {description!r}")
        self._items[self.require_new(name)] = (item, description.strip())
        return item

    def names(self) -> tuple[str, ...]:
        """The registered names, sorted."""
        return tuple(sorted(self._items))

    def key(self, name: object) -> str:
        """The registered name ``name`` stands for; ``ValueError`` naming the valid ones otherwise."""
        key = self._key(name)
        if key is None or key not in self._items:
            raise ValueError(unknown_name(self.kind, name, self.names()))
        return key

    def get(self, name: object) -> T:
        """The piece registered as ``name``; ``ValueError`` naming the valid ones otherwise."""
        return self._items[self.key(name)][0]

    def describe(self, name: object) -> str:
        """The one-line description of ``name`` (``""`` if it was registered without one)."""
        return self._items[self.key(name)][1]

    def snapshot(self) -> dict[str, tuple[T, str]]:
        """A copy of the current contents (for :meth:`restore`, e.g. in tests that register pieces)."""
        return dict(self._items)

    def restore(self, snapshot: dict[str, tuple[T, str]]) -> None:
        """Return to the contents of an earlier :meth:`snapshot`."""
        self._items = dict(snapshot)

    def __contains__(self, name: object) -> bool:
        key = self._key(name)
        return key is not None and key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        """``(name, piece)`` pairs, sorted by name."""
        return iter([(name, self._items[name][0]) for name in self.names()])

    def descriptions(self) -> Iterator[tuple[str, str]]:
        """``(name, description)`` pairs, sorted by name (what a listing prints)."""
        return iter([(name, self._items[name][1]) for name in self.names()])

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


__all__ = ["Registry", "first_doc_line", "unknown_name"]

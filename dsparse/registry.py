"""Name -> entry registries (tasks, methods, criteria, converters): one implementation
of registering, refusing duplicates and failing on unknown names with the known ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """A dict of registered entries; ``kind`` names them in error messages."""

    def __init__(self, kind: str, plural: str | None = None):
        super().__init__()
        self.kind, self.plural = kind, plural or f"{kind}s"

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding its argument under ``name`` (and setting a class's ``name``).

        Raises:
            ValueError: if ``name`` is already registered.
        """

        def decorate(entry: T) -> T:
            self.refuse_taken(name)
            if isinstance(entry, type):
                entry.name = name
            self[name] = entry
            return entry

        return decorate

    def refuse_taken(self, name: str) -> None:
        """Raise ValueError if ``name`` is registered (before a registrant's own checks)."""
        if name in self:
            owner = getattr(self[name], "__name__", self[name])
            raise ValueError(f"{self.kind} {name!r} is already registered by {owner}")

    def lookup(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            ValueError: for an unknown name, listing the known ones.
        """
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.plural}: {sorted(self)}")
        return self[name]

"""A small generic registry: methods, models, targets and compilers are found by name."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from edgetune.errors import ConfigError

T = TypeVar("T")

# Kinds that `edgetune list <what>` shows: an unknown name points there.
LISTED = {"model": "models", "method": "methods", "target": "targets", "corruption": "corruptions"}


class Registry(Generic[T]):
    """Maps names to entries; unknown names fail with the known ones and a did-you-mean."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@METHODS.register("tent")`` adds the decorated entry under ``name``."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ConfigError(f"{self.kind}: {name!r} is registered twice; pick another name")
            self._entries[name] = entry
            return entry

        return add

    def add(self, name: str, entry: T) -> None:
        """Register ``entry`` under ``name`` (for entries that are data, not classes)."""
        self.register(name)(entry)

    def get(self, name: str) -> T:
        """Return the entry called ``name``.

        Raises:
            ConfigError: the name is unknown (the message lists the known names).
        """
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=1)
            known = ", ".join(self._entries)
            listing = (f"see `edgetune list {LISTED[self.kind]}`" if self.kind in LISTED
                       else "use one of the known names")
            fix = f"did you mean {close[0]!r}? ({listing})" if close else listing
            raise ConfigError(f"{self.kind}: unknown name {name!r} (known: {known}); {fix}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

"""Name → entry registries, in the spirit of timm's model registry.

A YAML value such as ``metric: cosine`` selects an entry by name. An unknown
name fails at once, suggests the nearest one and lists the valid ones, so
``wsss validate`` can check a search space before any GPU time is spent.

Two kinds of registry share this class. The *name tables* of the schema
(`training.config.names`) hold what a config may say and the facts about each
name; they import neither torch nor timm. The *implementation* registries beside
the code (``training.losses.METRICS``…) are created with ``names=`` their table:
registering a name the table does not know is a bug, and a test checks that
every name of a table has an implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from training.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of interchangeable implementations (or facts) of one role.

    Args:
        kind: what the entries are, used in error messages ("alignment level").
        names: the name table this registry implements; registering any other
            name raises.
    """

    def __init__(self, kind: str, *, names: Registry[Any] | None = None) -> None:
        self.kind = kind
        self.table = names
        self._entries: dict[str, T] = {}

    @classmethod
    def of(cls, kind: str, entries: Mapping[str, T]) -> Registry[T]:
        """A registry holding ``entries`` (a name table written as one mapping)."""
        registry: Registry[T] = cls(kind)
        for name, entry in entries.items():
            registry.register(name)(entry)
        return registry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds an entry under ``name``; duplicate or untabled names are a bug."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if self.table is not None and name not in self.table:
                raise ValueError(f"{self.kind} {name!r} is not in its name table; add it to training.config.names")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str, *, field: str | None = None) -> T:
        """Return the entry for ``name`` or raise ConfigError listing valid names.

        Args:
            name: the registered name.
            field: the config field the name came from, quoted in the error.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            where = f"{field}: " if field else ""
            raise ConfigError(
                f"{where}unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}; "
                f"valid: {', '.join(sorted(self._entries))}"
            ) from None

    def check(self, name: str, *, field: str | None = None) -> str:
        """Validate ``name`` without using the entry; returns it unchanged."""
        self.get(name, field=field)
        return name

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:  # an unhashable YAML value (a list) is no name
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

"""Name → function registries, in the spirit of timm's model registry.

A YAML value such as ``metric: cosine`` selects a function by name. An unknown
name fails at once and lists the valid ones, so ``wsss validate`` can check a
search space before any GPU time is spent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from training.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of interchangeable implementations of one role.

    Args:
        kind: what the entries are, used in error messages ("alignment level").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds an entry under ``name``; duplicate names are a bug."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
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
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

"""One small name -> item registry, behind every extension point (adapters, block IO, CP / TP plans,
policies, calibrators), so that all six are declared, listed, checked and replaced the same way.

Each registration is recorded against its owner: the plugin whose hook is running (`current_owner`,
set by cachedit.plugins around every plugin hook) or None for the core and user code. A registration
by another owner stacks on the one it replaces, so `forget(owner)` (a plugin failed or went away)
brings back what was there before. The registry imports nothing of cachedit: whoever must run before
a lookup (cachedit.plugins loading plugins' models) is handed in as `before_lookup`.
"""

from __future__ import annotations

import contextvars
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

current_owner: contextvars.ContextVar[str | None] = contextvars.ContextVar("cachedit_current_owner", default=None)


class UnknownName(KeyError, ValueError):
    """A name no one registered; a KeyError for mapping-style callers, a ValueError for user-input ones."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """`kind`: what the items are, for messages ("cache policy"). `check(name, item)` raises TypeError for
    an item of the wrong kind. `before_lookup()` runs before every read (`get`, `in`, `names`, iteration)."""

    def __init__(self, kind: str, *, check: Callable[[str, T], None] | None = None,
                 before_lookup: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self.check = check
        self.before_lookup = before_lookup
        self._entries: dict[str, list[tuple[str | None, T]]] = {}  # name -> [(owner, item)], the last one serves

    def register(self, name: str, item: T) -> None:
        """Declare (or replace) `name`; recorded against the running plugin, if any."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} names are non-empty strings, got {name!r}")
        if self.check is not None:
            self.check(name, item)
        owner = current_owner.get()
        stack = self._entries.setdefault(name, [])
        if stack and stack[-1][0] == owner:
            stack.pop()  # the same owner replaces its own entry; another owner's stays underneath
        stack.append((owner, item))

    def unregister(self, name: str) -> None:
        """Remove `name` and everything it replaced."""
        if name not in self._entries:
            raise self._unknown(name)
        del self._entries[name]

    def forget(self, owner: str) -> None:
        """Drop every registration `owner` made; what each one replaced serves again."""
        for name in list(self._entries):
            self._entries[name] = [e for e in self._entries[name] if e[0] != owner]
            if not self._entries[name]:
                del self._entries[name]

    def owner(self, name: str) -> str | None:
        """The plugin whose registration of `name` serves (None: the core or user code)."""
        self._lookup()
        if name not in self._entries:
            raise self._unknown(name)
        return self._entries[name][-1][0]

    def get(self, name: str) -> T:
        """The item registered as `name`; `UnknownName` (a KeyError and ValueError) listing the names otherwise."""
        self._lookup()
        if name not in self._entries:
            raise self._unknown(name)
        return self._entries[name][-1][1]

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        self._lookup()
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._lookup()
        return [(name, stack[-1][1]) for name, stack in self._entries.items()]

    def __contains__(self, name: object) -> bool:
        self._lookup()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    def _lookup(self) -> None:
        if self.before_lookup is not None:
            self.before_lookup()

    def _unknown(self, name: object) -> UnknownName:
        allowed = ", ".join(repr(n) for n in self._entries) or "none registered"
        return UnknownName(f"{self.kind} {name!r} is not registered; allowed values: {allowed}")


def functions_returning(what: str) -> Callable[[str, object], None]:
    """A `check` for registries of builders: each item must be a function of the module returning `what`."""

    def check(name: str, build) -> None:
        if not callable(build):
            raise TypeError(f"the {what} for {name!r} must be a function of the module returning it")
    return check


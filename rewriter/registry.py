"""Registries of named classes (passes, targets), filled by decorators and by entry points.

Built-in passes and targets register through the same entry-point groups a third-party package uses
(``evo_rewrite.passes``, ``evo_rewrite.targets``); :meth:`Registry.all` imports every entry point of its
group once, so the CLI can run a plugin's pass without any change to evo-rewrite.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from .errors import PipelineError

__all__ = ["Registry"]

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes of one ``base`` by their kebab-case ``name``."""

    def __init__(self, kind: str, base: type, group: str, listing_flag: str,
                 check: Callable[[type], None] | None = None):
        self.kind, self.base, self.group, self.listing_flag, self.check = kind, base, group, listing_flag, check
        self._classes: dict[str, T] = {}
        self._loaded: set[str] = set()

    def register(self, cls: T) -> T:
        """The decorator: validates ``cls`` and adds it (registering the same class twice is a no-op)."""
        if not isinstance(cls, type) or not issubclass(cls, self.base):
            raise TypeError(f"register_{self.kind} takes a {self.base.__name__} subclass, not {cls!r}")
        if not cls.name or cls.name != cls.name.lower() or "_" in cls.name:
            raise ValueError(f"{self.kind} names are kebab-case: {cls.name!r}")
        old = self._classes.get(cls.name)
        if old is not None and old is not cls:
            raise ValueError(f"{self.kind} {cls.name!r} registered twice ({old.__module__} and {cls.__module__})")
        if self.check is not None:
            self.check(cls)
        self._classes[cls.name] = cls
        return cls

    def all(self) -> dict[str, T]:
        """Every class: the built-in ones and any installed package's, through the entry-point group."""
        self._load_entry_points()
        return dict(sorted(self._classes.items()))

    def get(self, name: str) -> T:
        reg = self.all()
        if name not in reg:
            close = difflib.get_close_matches(name, reg, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise PipelineError(f"unknown {self.kind} '{name}'.{hint} Known {self.kind}s: {', '.join(reg) or '(none)'} "
                                f"(evo-rewrite {self.listing_flag} shows their options)")
        return reg[name]

    def _load_entry_points(self) -> None:
        """Import every entry point of the group once. A plugin that fails to import, or whose entry-point
        name is not its class's name, is a PipelineError naming it, instead of hiding every other class."""
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            if ep.value in self._loaded:
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - a plugin's import error, reported with its source
                dist = getattr(getattr(ep, "dist", None), "name", "?")
                raise PipelineError(f"entry point {ep.name} = {ep.value} (group {self.group}, package {dist}) failed "
                                    f"to load: {type(exc).__name__}: {exc}") from None
            self._loaded.add(ep.value)
            if not (isinstance(obj, type) and issubclass(obj, self.base)):
                continue
            if obj.name != ep.name:
                raise PipelineError(f"entry point {ep.name} = {ep.value} (group {self.group}) names a class called "
                                    f"{obj.name!r}; the entry point's name must be the {self.kind}'s name")
            try:
                self.register(obj)  # a no-op when its module's decorator registered it already
            except ValueError as exc:
                raise PipelineError(f"entry point {ep.name} = {ep.value} (group {self.group}): {exc}") from None

"""A small generic registry, in the spirit of timm's `register_model` / `list_models`.

Names are lower-case and stable. Entries may belong to groups (e.g. ``coreset``, ``distill``);
an entry in the group ``test`` is a tiny CI variant and is never part of ``all``.
Selections accept comma lists of names, groups, ``all`` and shell-style globs.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Generic, Iterable, TypeVar

from bench.errors import BenchError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    groups: tuple[str, ...] = ()
    help: str = ""


@dataclass
class Registry(Generic[T]):
    kind: str  # "method", "dataset", "encoder": used in error messages
    _entries: dict[str, Entry[T]] = field(default_factory=dict)

    def register(self, name: str, obj: T | None = None, *, groups: Iterable[str] = (), help: str = ""):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lower-case letters, digits, '_' or '-'")

        def add(o: T) -> T:
            if name in self._entries:
                first = getattr(self._entries[name].obj, "__module__", None)
                by = f" (by {first})" if first else ""
                raise ValueError(f"{self.kind} {name!r} is already registered{by}; choose another name")
            doc = help or (getattr(o, "__doc__", None) or "").strip().splitlines()[0:1]
            text = doc if isinstance(doc, str) else (doc[0] if doc else "")
            self._entries[name] = Entry(name, o, tuple(groups), text)
            return o

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (plugins unloading in a long-lived process, e.g. tests calling ``main``)."""
        self._entries.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self, pattern: str = "*", include_test: bool = True) -> list[str]:
        out = [n for n, e in self._entries.items()
               if fnmatch.fnmatchcase(n, pattern) and (include_test or "test" not in e.groups)]
        return sorted(out)

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise BenchError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names()) or '(none)'}") from None

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def groups(self) -> list[str]:
        return sorted({g for e in self._entries.values() for g in e.groups})

    def select(self, spec: str) -> list[str]:
        """Expand ``'all'``, groups, globs and comma lists into registered names (in order, unique)."""
        out: list[str] = []
        for part in [p.strip().lower() for p in spec.split(",") if p.strip()]:
            if part == "all":
                found = [n for n in self.names(include_test=False) if "reference" not in self._entries[n].groups]
            elif part in self.groups() and part not in self._entries:
                found = [n for n, e in sorted(self._entries.items()) if part in e.groups]
            elif any(c in part for c in "*?["):
                found = self.names(part)
            else:
                found = [self.entry(part).name]
            if not found:
                raise BenchError(f"no {self.kind} matches {part!r}; available: {', '.join(self.names())}")
            out.extend(n for n in found if n not in out)
        if not out:
            raise BenchError(f"no {self.kind} selected; available: {', '.join(self.names())}")
        return out

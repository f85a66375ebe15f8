"""A name -> object table with one error message for unknown names: every pluggable part registers in one."""


class Registry:
    """Maps names to constructors (classes or functions). `register` works as a decorator or a plain call."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries = {}

    def register(self, name: str, obj=None):
        """Register `obj` under `name`; used bare it returns a decorator. A name is registered once."""
        def add(target):
            if name in self._entries and self._entries[name] is not target:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = target
            return target
        return add if obj is None else add(obj)

    def get(self, name: str):
        """The entry registered as `name`, or a ValueError listing the known names."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def build(self, name: str, **kwargs):
        """Call the entry registered as `name` with kwargs."""
        return self.get(name)(**kwargs)

    def names(self) -> list:
        return sorted(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

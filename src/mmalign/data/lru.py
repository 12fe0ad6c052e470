"""A least-recently-used memory of values bounded by their total size in bytes (the encoding caches use it)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class ByteLRU:
    """Values keyed by hashable keys; once their sizes (``size_of``) pass ``max_bytes``, the least recently used go.
    A value larger than the whole budget is never held."""

    def __init__(self, max_bytes: int, size_of: Callable[[Any], int]) -> None:
        self._max_bytes = max_bytes
        self._size_of = size_of
        self._bytes = 0
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def peek(self, key: Hashable) -> Any:
        """The value of ``key`` (None if absent), without counting it as used."""
        return self._items.get(key)

    def get(self, key: Hashable) -> Any:
        """The value of ``key`` (None if absent), now the most recently used."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        """Hold ``value`` as the most recently used, dropping the least recently used ones beyond the budget."""
        size = self._size_of(value)
        if size > self._max_bytes:
            return
        self._items[key] = value
        self._bytes += size
        while self._bytes > self._max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= self._size_of(old)

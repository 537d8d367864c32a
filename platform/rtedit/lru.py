"""The counting, byte-bounded LRU core the PromptCache and the K/V store share: a hit returns the very same object.

Entries have an `nbytes`; subclasses decide what to store and when to evict (prompts also bound the entry count,
the K/V store remembers what it evicted).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CountingLRU(Generic[K, V]):
    """An OrderedDict of entries, oldest first, with their total bytes and hit/miss/eviction counters."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def _replace(self, key: K, entry: V) -> None:
        """Stores `entry` under `key` as the newest (the caller holds the lock and evicts after)."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[key] = entry
        self._bytes += entry.nbytes

    def _evict_oldest(self) -> K:
        key, entry = self._entries.popitem(last=False)
        self._bytes -= entry.nbytes
        self.evictions += 1
        return key

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def counters(self) -> dict:
        total = self.hits + self.misses
        return {"entries": len(self._entries), "bytes": self._bytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "hit_rate": self.hits / total if total else 0.0}

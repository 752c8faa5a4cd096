"""The engine's loaded adapters: a byte-bounded LRU shared by the request threads and the scheduler."""

from __future__ import annotations

import threading
from collections import OrderedDict

from sbora_core.method.adapter import SparseAdapter


class AdapterCache:
    """Loaded adapters, least recently used evicted first once their bytes pass the capacity."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.entries: OrderedDict[str, SparseAdapter] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.lock = threading.Lock()

    def get(self, key: str) -> SparseAdapter | None:
        with self.lock:
            adapter = self.entries.get(key)
            if adapter is None:
                self.misses += 1
                return None
            self.hits += 1
            self.entries.move_to_end(key)
            return adapter

    def put(self, key: str, adapter: SparseAdapter) -> None:
        with self.lock:
            if key in self.entries:
                self.bytes -= self.entries.pop(key).nbytes()
            self.entries[key] = adapter
            self.bytes += adapter.nbytes()
            while self.bytes > self.capacity_bytes and len(self.entries) > 1:
                _, evicted = self.entries.popitem(last=False)
                self.bytes -= evicted.nbytes()
                self.evictions += 1

    def __contains__(self, key: str) -> bool:
        return key in self.entries

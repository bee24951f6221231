"""A model's adapters by name, loaded once and kept in an LRU cache bounded in bytes.

Names resolve through model/lora_catalog.py's folders (LATENTD_LORA_DIR, then the model's own
loras/) on every lookup, so a file added there is usable without a restart; a file that changed
(mtime or size) is loaded again. `resolve(names and scales)` gives what GenerationRequest.loras
takes. `loads` and `hits` count for the worker's metrics.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

from latentd.model import lora_catalog
from latentd.model.lora_catalog import UnknownAdapter  # noqa: F401  (callers catch it from here)

DEFAULT_CACHE_MB = 1024


class LoraLibrary:
    def __init__(self, pipe, model_dir: str | None = None, lora_dir: str | None = None,
                 cache_mb: float | None = None):
        """model_dir: the model's folder (its loras/ is searched after LATENTD_LORA_DIR)."""
        self.pipe = pipe
        self.dirs = lora_catalog.folders(model_dir, lora_dir)
        mb = cache_mb if cache_mb is not None else float(os.environ.get("LATENTD_LORA_CACHE_MB", DEFAULT_CACHE_MB))
        self.budget = int(mb * 1024 * 1024)
        self._cache: OrderedDict[tuple, object] = OrderedDict()      # (path, mtime, size) -> LoraAdapter
        self._bytes = 0
        self._lock = threading.Lock()
        self.loads = 0
        self.hits = 0
        self.load_seconds = 0.0

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def get(self, name_or_path: str):
        name, path = lora_catalog.locate(name_or_path, self.dirs)
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        t0 = time.perf_counter()
        adapter = self.pipe.load_lora(path, name)
        with self._lock:
            self.loads += 1
            self.load_seconds += time.perf_counter() - t0
            for old in [k for k in self._cache if k[0] == key[0]]:     # an older version of the file
                self._bytes -= self._cache.pop(old).nbytes
            self._cache[key] = adapter
            self._bytes += adapter.nbytes
            while self._bytes > self.budget and len(self._cache) > 1:
                _, evicted = self._cache.popitem(last=False)
                self._bytes -= evicted.nbytes
        return adapter

    def resolve(self, loras) -> tuple:
        """((name or path, scale), ...) -> ((LoraAdapter, scale), ...) for GenerationRequest.loras."""
        return tuple((self.get(name), float(scale)) for name, scale in loras)

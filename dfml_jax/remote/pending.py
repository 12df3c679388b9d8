"""The client's pending cache: chunks the server answered (and billed) for a query that failed.

:class:`~dfml_jax.remote.client.OIPClient` keeps here the answered chunks of a query that then
failed for good, and takes them back when the same query is retried, so they are delivered
without being bought again (the billing rules are in :mod:`dfml_jax.remote`). Chunks are keyed by
:meth:`PendingCache.key`, a SHA-256 of the teacher's description and the chunk's bytes. With a
``cache_dir`` every chunk is also written there as ``pending-<key>.npy`` (atomically), and the
chunks found there at start are served too: a resumed process re-buys nothing.

Example:
  >>> import numpy as np
  >>> cache = PendingCache()
  >>> chunk = np.ones((2, 3), np.float32)
  >>> key = PendingCache.key({"name": "t1", "output": "logits", "num_classes": 4}, chunk)
  >>> cache.has_pending(), len(key)
  (False, 64)
  >>> cache.put(key, np.zeros((2, 4), np.float32))
  >>> cache.has_pending(), cache.samples
  (True, 2)
  >>> cache.take(key).shape, cache.take(key), cache.samples
  ((2, 4), None, 0)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from typing import Dict, Mapping, Optional

import numpy as np

__all__ = ["PendingCache"]


class PendingCache:
    """Answered-but-undelivered chunks, in memory and optionally on disk; thread-safe.

    Args:
      cache_dir: directory of the on-disk copy (created if missing; ``pending-<key>.npy`` files
        already there are served too). None: in memory only.
    """

    def __init__(self, cache_dir: Optional[str] = None):
        self.cache_dir = cache_dir
        self._lock = threading.Lock()
        self._memory: Dict[str, np.ndarray] = {}
        self._disk_keys: set = set()   # pending chunks on disk (from this or an earlier process)
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            self._disk_keys = {f[len("pending-"):-len(".npy")] for f in os.listdir(cache_dir)
                               if f.startswith("pending-") and f.endswith(".npy")}

    @staticmethod
    def key(info: Optional[Mapping], chunk: np.ndarray) -> str:
        """The cache key of a chunk of inputs for a teacher.

        Args:
          info: the teacher's description (:meth:`OIPClient.info`; its ``name``, ``output``,
            ``num_classes`` and ``decimals`` enter the key).
          chunk: the inputs of one request.

        Returns:
          A SHA-256 hex digest of the description, the chunk's shape and its bytes.
        """
        info = info or {}
        h = hashlib.sha256()
        h.update(json.dumps([info.get("name"), info.get("output"), info.get("num_classes"),
                             info.get("decimals"), list(chunk.shape)]).encode())
        h.update(chunk.tobytes())
        return h.hexdigest()

    def has_pending(self) -> bool:
        """Whether any chunk is pending (in memory or on disk)."""
        with self._lock:
            return bool(self._memory or self._disk_keys)

    @property
    def samples(self) -> int:
        """Samples pending in memory (answered in this process and not yet delivered)."""
        with self._lock:
            return int(sum(len(v) for v in self._memory.values()))

    def _path(self, key: str) -> str:
        return os.path.join(self.cache_dir, f"pending-{key}.npy")

    def put(self, key: str, a: np.ndarray) -> None:
        """Keep an answered chunk (and write it to ``cache_dir``, atomically, if set)."""
        with self._lock:
            self._memory[key] = a
        if self.cache_dir:
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, a)
                os.replace(tmp, self._path(key))
                with self._lock:
                    self._disk_keys.add(key)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise

    def take(self, key: str) -> Optional[np.ndarray]:
        """The pending answer for ``key``, or None; removed from memory (its file stays until
        :meth:`drop_file`, i.e. until the query that took it succeeded)."""
        with self._lock:
            a = self._memory.pop(key, None)
        if a is None and self.cache_dir and key in self._disk_keys:
            try:
                a = np.load(self._path(key))
            except FileNotFoundError:      # delivered by another client on the same cache
                with self._lock:
                    self._disk_keys.discard(key)
        return a

    def drop_file(self, key: str) -> None:
        """Forget the on-disk copy of a delivered chunk (no-op without ``cache_dir``)."""
        if self.cache_dir:
            with self._lock:
                self._disk_keys.discard(key)
            try:
                os.remove(self._path(key))
            except FileNotFoundError:
                pass

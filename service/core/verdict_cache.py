"""Verdict cache: the model's score of a (policy, text) pair kept so a repeated text is not scored again.

A chat client resends the whole conversation every turn, so without it turn *k* costs *k*
texts and a 20-turn chat 210 scorings instead of 20. The engine asks this cache before it
builds a job for the batcher (``service.core.engine``); only the pairs it misses are
tokenised and queued, and a request whose every pair is cached never reaches the queue.

* **Key**: a digest of (model version, policy description hash, normalised text hash).
  The model part (``model_key``) covers the model file, the manifest (input template,
  window length and stride) and the precision and provider it runs with; the policy part is
  the description's sha256 (what the model reads; the id and thresholds are not part of it);
  the text part is the sha256 of the exact query texts the encoder feeds the tokenizer (the
  prompt Unicode-normalised, then every readable base64 payload it hides), so two spellings
  that the model sees identically share an entry, and nothing that the model sees
  differently does. Only digests are kept: no text, no policy.
* **Value**: the highest raw (uncalibrated) unsafe probability over the pair's windows and
  the window count; calibration and the threshold are applied on every answer, so a
  threshold override applies to cached scores as to fresh ones.
* **Bounds**: least recently used first out, past ``max_entries`` entries or
  ``max_bytes`` bytes (each entry is counted at ``ENTRY_BYTES``, its measured footprint:
  key, value and the dict's bookkeeping). Emptied when a reload switches the model or the
  policies (``service.core.runtime``).
* **Thread-safe**: the engine reads and fills it from the event loop and, for big
  requests, from a worker thread.

Two identical requests arriving together both miss and are both scored (no coalescing):
the cache saves repeated work across requests, it does not serialise them.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

# The key is a 16-byte blake2b digest: collisions are out of reach (2^64 work for a birthday
# attack on a fixed model and policy) and the entry stays small.
KEY_BYTES = 16
# A cached entry's memory: the 16-byte key (49 B as a bytes object), the (score, windows)
# tuple with its float (80 B), and the OrderedDict's slot and link node (about 100 B).
# Measured with tracemalloc on CPython 3.11 (``measured_entry_bytes``): 236 B per entry.
ENTRY_BYTES = 240


class CacheObserver(Protocol):
    """Where the cache reports its traffic (``service.core.metrics.Metrics`` implements it)."""

    def observe_cache(self, hits: int, misses: int) -> None: ...

    def observe_cache_evictions(self, count: int) -> None: ...

    def observe_cache_size(self, entries: int, size_bytes: int) -> None: ...


CachedScore = tuple[float, int]  # (highest raw unsafe probability over the windows, window count)


def prepared_digest(prepared: Any) -> bytes:
    """sha256 of what the model reads of one prompt: its query-side token ids (the normalised
    prompt and each decoded payload), as ``InputEncoder.prepare`` built them."""
    h = hashlib.sha256()
    for ids in prepared.queries:
        data = ids.tobytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def pair_key(prefix: bytes, policy_sha256: str, text: bytes) -> bytes:
    """The cache key of one (model, policy, text) triple: digests in, digest out."""
    h = hashlib.blake2b(prefix, digest_size=KEY_BYTES)
    h.update(bytes.fromhex(policy_sha256))
    h.update(text)
    return h.digest()


def model_prefix(model_key: str) -> bytes:
    """The model part of every key (``model_key``: what identifies the scores a model gives)."""
    return hashlib.sha256(model_key.encode()).digest()


class VerdictCache:
    """Bounded LRU of (key -> cached score); see the module docstring."""

    def __init__(self, max_entries: int, max_bytes: int, observer: CacheObserver | None = None) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("cache bounds must be >= 0")
        self.max_entries = min(max_entries, max_bytes // ENTRY_BYTES)
        self.observer = observer
        self._data: OrderedDict[bytes, CachedScore] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size_bytes(self) -> int:
        return len(self._data) * ENTRY_BYTES

    def get_many(self, keys: Sequence[bytes]) -> list[CachedScore | None]:
        """Each key's score (moved to the most recently used end) or None; counts hits and misses."""
        out: list[CachedScore | None] = []
        data = self._data
        with self._lock:
            for key in keys:
                value = data.get(key)
                if value is not None:
                    data.move_to_end(key)
                out.append(value)
        hits = sum(v is not None for v in out)
        if self.observer is not None and keys:
            self.observer.observe_cache(hits, len(keys) - hits)
        return out

    def put_many(self, items: Sequence[tuple[bytes, CachedScore]]) -> None:
        """Store scores, evicting the least recently used entries beyond the bounds."""
        if not self.enabled or not items:
            return
        evicted = 0
        data = self._data
        with self._lock:
            for key, value in items:
                data[key] = value
                data.move_to_end(key)
            while len(data) > self.max_entries:
                data.popitem(last=False)
                evicted += 1
            size = len(data)
        if self.observer is not None:
            if evicted:
                self.observer.observe_cache_evictions(evicted)
            self.observer.observe_cache_size(size, size * ENTRY_BYTES)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
        if self.observer is not None:
            self.observer.observe_cache_size(0, 0)


def measured_entry_bytes(n: int = 100_000) -> float:
    """Bytes per entry as allocated (how ENTRY_BYTES was measured; used by a test)."""
    import tracemalloc

    cache = VerdictCache(n, n * 10_000)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    keys = (hashlib.blake2b(i.to_bytes(8, "little"), digest_size=KEY_BYTES).digest() for i in range(n))
    cache.put_many([(key, (i / n, 1)) for i, key in enumerate(keys)])
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / len(cache)

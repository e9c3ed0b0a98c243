"""KV caches as tensors: read a cache's per-layer (keys, values), point it at others, copy a prefix; and
:class:`PreallocatedCache`, the cache the environment's episodes run on, written in place.

The episode's full-rank reference starts from a copy of the warm-up prefix, and benchmarks replay a plain
``DynamicCache`` forward as a CUDA graph by pointing the cache back at its prefix; both work on the (keys, values)
pairs. The episodes' own cache keeps its tensors in buffers allocated once (see :class:`PreallocatedCache`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

KVTensors = list[tuple[torch.Tensor, torch.Tensor]]  # (keys, values) per layer, each (B, H_kv, L, d)


def kv_tensors(cache: Cache) -> KVTensors:
    return [(layer.keys, layer.values) for layer in cache.layers]


def point_cache(cache: DynamicCache, tensors: KVTensors) -> None:
    """Make ``cache``'s layers hold ``tensors`` (no copy)."""
    for layer, (keys, values) in zip(cache.layers, tensors, strict=True):
        layer.keys, layer.values = keys, values


def cache_prefix(cache: Cache, length: int, config: PretrainedConfig) -> DynamicCache:
    """A new cache holding copies of the first ``length`` positions of ``cache``.

    Built layer by layer rather than with ``DynamicCache.crop``, whose meaning changed across transformers releases.
    """
    prefix = DynamicCache(config=config)
    for index, layer in enumerate(cache.layers):
        prefix.update(layer.keys[..., :length, :].clone(), layer.values[..., :length, :].clone(), index)
    return prefix


class PreallocatedLayer(CacheLayerMixin):
    """One layer of :class:`PreallocatedCache`: keys and values in fixed (B, H_kv, capacity, d) buffers.

    ``keys`` and ``values`` are views of the buffers' first positions: those written, plus, while a forward is
    reserved (:meth:`PreallocatedCache.reserved`), the positions that forward will write. ``update`` copies the new
    states into the last of them and returns the views, as a ``DynamicLayer`` returns its concatenation.
    """

    is_compileable = False  # (what generate() reads to compile a decode step; the env compiles its own step)
    is_croppable = False
    is_sliding = False

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.reserved = capacity, 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def start(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold a copy of ``keys`` and ``values`` (B, H_kv, L, d) as the first L positions; the buffers are allocated
        on the first call and kept while the batch, heads, widths, dtype and device stay the same."""
        length = keys.shape[2]
        if length > self.capacity:
            raise ValueError(f"{length} positions do not fit a cache of capacity {self.capacity}")
        if self.key_buffer is None or not _fits(self.key_buffer, keys) or not _fits(self.value_buffer, values):
            # One position more than the capacity, never shown: no view is then the whole, contiguous buffer.
            # Compiled code specialises on contiguity, so a full cache (the last segment) would compile again.
            padded = self.capacity + 1
            self.key_buffer = keys.new_zeros(*keys.shape[:2], padded, keys.shape[3])
            self.value_buffer = values.new_zeros(*values.shape[:2], padded, values.shape[3])
            self.device, self.dtype = keys.device, keys.dtype
        self.key_buffer[:, :, :length].copy_(keys)
        self.value_buffer[:, :, :length].copy_(values)
        self._show(length)
        self.reserved, self.is_initialized = 0, True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a PreallocatedCache layer must be started with a prefix. Fix: call "
                           "PreallocatedCache.start(kv) before the first forward.")

    def reserve(self, count: int) -> None:
        """Extend the views over the next ``count`` positions, which the next forward writes."""
        written = self.get_seq_length()
        if written + count > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions, {written} are written and {count} more were "
                             "asked for. Fix: create the PreallocatedCache with a capacity of the whole sequence.")
        self._show(written + count)
        self.reserved = count

    def release(self, written: bool) -> None:
        """End a reservation: its positions count as written, or (``written=False``) are dropped from the views."""
        if not written:
            self._show(self.get_seq_length())
        self.reserved = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new (B, H_kv, T, d) states at the reserved positions (or, outside a reservation, at the next T);
        returns every visible position's keys and values (views of the buffers)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new, unreserved = key_states.shape[2], not self.reserved
        if unreserved:
            self.reserve(new)
        elif self.reserved != new:
            raise ValueError(f"{self.reserved} positions are reserved, but the forward brings {new}. Fix: reserve "
                             "the forward's token count.")
        # A slice of the views, written in place: under torch.compile only these T positions are written, where a
        # concatenation would copy all L visible ones (the views' key axis stays symbolic; drrl_gym.episode).
        self.keys[:, :, -new:].copy_(key_states)
        self.values[:, :, -new:].copy_(value_states)
        if unreserved:
            self.release(written=True)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Positions written (a reservation's are not yet)."""
        return 0 if self.keys is None else self.keys.shape[-2] - self.reserved

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.capacity

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a PreallocatedCache does not reorder rows. Fix: copy it into a DynamicCache "
                                  "(drrl_gym.kv_cache.cache_prefix) and reorder that.")

    def _show(self, length: int) -> None:
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]


class PreallocatedCache(Cache):
    """A KV cache whose tensors never move: per layer, buffers of ``capacity`` positions, allocated at the first
    :meth:`start` and written in place.

    Why: a ``DynamicCache`` concatenates every layer's keys and values on each forward, a copy of all L visible
    positions (on an H200, about 2 ms of a 64-env step that the plain model's in-place StaticCache does not spend);
    here a forward writes only its T new positions. And because the buffers stay put, CUDA graphs read and write the
    cache at fixed addresses, with no copying in or pointing at a graph's outputs.

    Unlike a StaticCache, a layer hands attention only the positions written so far (views of the buffers), so the
    attention's work grows with the sequence. A forward over T tokens either runs inside ``reserved(T)``, which
    leaves the cache's Python state unchanged during the forward (so a CUDA graph capture may run it twice), or
    without it, appending like a ``DynamicCache``. Rows cannot be reordered or repeated: copy a prefix into a
    ``DynamicCache`` for that (:func:`cache_prefix`).
    """

    def __init__(self, num_layers: int, capacity: int) -> None:
        if num_layers < 1 or capacity < 1:
            raise ValueError(f"num_layers and capacity must be >= 1, got {num_layers} and {capacity}")
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])

    def start(self, tensors: KVTensors) -> None:
        """Hold a copy of ``tensors`` (per layer (keys, values), (B, H_kv, L, d)) as the first L positions."""
        if len(tensors) != len(self.layers):
            raise ValueError(f"{len(tensors)} layers of keys and values for a cache of {len(self.layers)} layers")
        for layer, (keys, values) in zip(self.layers, tensors, strict=True):
            layer.start(keys, values)

    @contextmanager
    def reserved(self, count: int) -> Iterator[PreallocatedCache]:
        """Inside: the views cover the next ``count`` positions, which a forward writes (any number of times: it
        writes the same positions). On exit they count as written; if the body raised, they are dropped."""
        for layer in self.layers:
            layer.reserve(count)
        written = False
        try:
            yield self
            written = True
        finally:
            for layer in self.layers:
                layer.release(written)


def _fits(buffer: torch.Tensor, states: torch.Tensor) -> bool:
    """Whether ``buffer`` can hold ``states``: same batch, heads and width, dtype and device."""
    return (buffer.shape[:2] == states.shape[:2] and buffer.shape[3] == states.shape[3]
            and buffer.dtype == states.dtype and buffer.device == states.device)

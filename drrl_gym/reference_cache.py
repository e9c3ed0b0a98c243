"""What a reset computes that does not depend on the agent, kept per train sequence across episodes.

A reset runs the warm-up segment at full rank (its KV cache and statistics) and the full-rank reference trajectory of
the remaining segments (what fidelity compares with; with ``bound_source="reference"`` also its bound tables, which the
mask reads). Both are functions of the sequence alone, so an episode on a
sequence seen before needs no forward at all: :class:`ReferenceCache` keeps them, keyed by the train sequence index,
on the model's device, least recently used first out, within a memory budget (``EnvConfig.reference_cache_gib``;
docs/env.md, "Reference cache"). One entry of SmolLM2-135M with ``fidelity="attention_cosine"`` at 1024 tokens is
about 38 MB (the reference's attention outputs, 31 MB, dominate); with ``"kl"`` or ``"hidden_cosine"`` about 7 MB.

The cache stores an entry as a fixed list of tensors whose leading axis is the batch row (:class:`EpisodeStart`
flattens its structures into one), in one slab per tensor that grows by doubling up to the budget, so a lookup of B
rows is one ``index_select`` per tensor.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from drrl_gym.kv_cache import KVTensors
from drrl_gym.lowrank import SegmentStats
from drrl_gym.reward import Captured

GIB = 2**30
# SegmentStats fields a reset may have recorded besides the Grams (selection mode, the attention signals)
OPTIONAL_STATS = ("selection_bound", "entropy", "signal_mass", "signal_margin")
REFERENCE_BOUND = "reference_bound"  # the layout's name for EpisodeStart.reference_bound


@dataclass
class EpisodeStart:
    """What a reset computes for B rows that does not depend on the agent: the warm-up segment's KV cache and
    statistics (full rank, every key) and the full-rank reference of the remaining segments."""

    kv: KVTensors  # per layer (keys, values), each (B, H_kv, segment_len, d)
    stats: SegmentStats
    reference: Captured
    # bound_source="reference": the reference's bound table per remaining segment, (B, segments, layers, H_kv, n_ranks,
    # n_keeps)
    reference_bound: torch.Tensor | None = None

    def rows(self) -> list[torch.Tensor]:
        """Every tensor, leading axis the row: keys and values per layer, the Grams, the optional statistics that
        were recorded (:data:`OPTIONAL_STATS`, in that order), the reference's bound tables (if computed), its hidden
        states and attention outputs (if recorded)."""
        stats, reference = self.stats, self.reference
        optional = [self.reference_bound if name == REFERENCE_BOUND else getattr(stats, name)
                    for name in self.optional_stats()]
        return ([t for pair in self.kv for t in pair] + [stats.query_gram, stats.key_gram, *optional, reference.hidden]
                + list(reference.attention or []))

    def optional_stats(self) -> tuple[str, ...]:
        """The names of the optional statistics this start holds, then :data:`REFERENCE_BOUND` if it holds the
        reference's bound tables (what :meth:`from_rows` needs to read it back)."""
        bound = () if self.reference_bound is None else (REFERENCE_BOUND,)
        return tuple(name for name in OPTIONAL_STATS if getattr(self.stats, name) is not None) + bound

    @classmethod
    def from_rows(cls, rows: Sequence[torch.Tensor], num_layers: int, optional_stats: Sequence[str],
                  attention_outputs: bool) -> EpisodeStart:
        """The inverse of :meth:`rows`, given :meth:`optional_stats` (the attention mode, the observation's
        feature groups and the fidelity metric fix the layout)."""
        kv = [(rows[2 * layer], rows[2 * layer + 1]) for layer in range(num_layers)]
        query_gram, key_gram, *rest = rows[2 * num_layers:]
        optional = dict(zip(optional_stats, rest, strict=False))
        hidden, *attention = rest[len(optional):]
        bound = optional.pop(REFERENCE_BOUND, None)
        length = kv[0][0].shape[2]  # the warm-up segment: its queries are its keys
        stats = SegmentStats(query_gram, key_gram, length, length, **optional)
        return cls(kv, stats, Captured(hidden, attention if attention_outputs else None), bound)


class ReferenceCache:
    """Rows of a fixed list of tensors, keyed by an int (the train sequence), LRU within ``budget_bytes``.

    ``lookup(keys)`` says which keys are held and where; ``gather(slots)`` returns their rows; ``store(keys, rows)``
    adds rows (evicting the least recently used entries). A budget smaller than one entry stores nothing.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes={budget_bytes}: must be >= 0. Fix: pass 0 to disable the cache.")
        self.budget_bytes = int(budget_bytes)
        self._slots: OrderedDict[int, int] = OrderedDict()  # key -> slot, least recently used first
        self._slabs: list[torch.Tensor] | None = None
        self._capacity = 0  # entries the budget allows (known once the first entry's size is)
        self.hits = self.misses = 0
        self.layout: tuple[str, ...] | None = None  # what the rows hold besides the fixed ones (set by the first store)

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def entry_bytes(self) -> int | None:
        """Bytes of one entry (None before the first store)."""
        return None if self._slabs is None else sum(s[0].numel() * s.element_size() for s in self._slabs)

    @property
    def allocated_bytes(self) -> int:
        return 0 if self._slabs is None else sum(s.numel() * s.element_size() for s in self._slabs)

    def lookup(self, keys: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(held (B,) bool, slot (B,) int64; -1 where not held) for ``keys``; marks the held ones recently used."""
        slots = np.array([self._slots.get(int(k), -1) for k in keys], dtype=np.int64)
        for key, slot in zip(keys, slots, strict=True):
            if slot >= 0:
                self._slots.move_to_end(int(key))
        held = slots >= 0
        self.hits += int(held.sum())
        self.misses += int((~held).sum())
        return held, slots

    def gather(self, slots: np.ndarray) -> list[torch.Tensor]:
        """The rows in ``slots`` (from :meth:`lookup`), one new tensor per stored tensor."""
        index = torch.as_tensor(slots, dtype=torch.long, device=self._slabs[0].device)
        return [slab.index_select(0, index) for slab in self._slabs]

    def merged(self, held: np.ndarray, slots: np.ndarray, computed: Sequence[torch.Tensor] | None
               ) -> list[torch.Tensor]:
        """Rows for a whole batch: the cached ones where ``held`` (at ``slots``, from :meth:`lookup`), the rows of
        ``computed`` (one per row not held, in order) elsewhere."""
        if held.all():
            return self.gather(slots)
        if not held.any():
            return list(computed)
        device = computed[0].device
        where_held = torch.from_numpy(np.flatnonzero(held)).to(device)
        where_computed = torch.from_numpy(np.flatnonzero(~held)).to(device)
        rows = []
        for cached, fresh in zip(self.gather(slots[held]), computed, strict=True):
            row = fresh.new_empty((len(held), *fresh.shape[1:]))
            rows.append(row.index_copy_(0, where_held, cached).index_copy_(0, where_computed, fresh))
        return rows

    def store(self, keys: Sequence[int], rows: Sequence[torch.Tensor], layout: tuple[str, ...] = ()) -> None:
        """Keep row b of every tensor in ``rows`` under ``keys[b]`` (keys already held or repeated are skipped).

        ``layout`` names what the rows hold beyond a fixed part (for the env, :meth:`EpisodeStart.optional_stats`);
        a cache holds one layout, so whoever reads it back (also another env handed this cache) knows it."""
        if self.layout is None:
            self.layout = tuple(layout)
        elif self.layout != tuple(layout):
            raise ValueError(f"this cache holds rows of layout {self.layout}, not {tuple(layout)}. Fix: give each "
                             "environment configuration (attention mode, observation features, fidelity) its own cache.")
        if self._slabs is None:
            per_entry = sum(r[0].numel() * r.element_size() for r in rows)
            self._capacity = self.budget_bytes // per_entry if per_entry else 0
            if self._capacity == 0:
                return
            self._slabs = [torch.empty((0, *r.shape[1:]), dtype=r.dtype, device=r.device) for r in rows]
        if self._capacity == 0:
            return
        new: dict[int, int] = {}
        for b, key in enumerate(int(k) for k in keys):
            if key not in self._slots and key not in new:
                new[key] = b
        chosen = list(new.items())[-self._capacity:]  # more new keys than the whole budget: keep the last ones
        if not chosen:
            return
        slots = []
        for key, _ in chosen:
            slots.append(self._free_slot())
            self._slots[key] = slots[-1]
        index = torch.as_tensor(slots, dtype=torch.long, device=self._slabs[0].device)
        source = torch.as_tensor([b for _, b in chosen], dtype=torch.long, device=rows[0].device)
        for slab, row in zip(self._slabs, rows, strict=True):
            slab.index_copy_(0, index, row.index_select(0, source))

    def _free_slot(self) -> int:
        """A slot for a new entry: an unused one (growing the slabs by doubling, within the capacity), else the
        least recently used entry's."""
        used, allocated = len(self._slots), self._slabs[0].shape[0]
        if used < allocated:
            taken = set(self._slots.values())
            return next(s for s in range(allocated) if s not in taken)
        if allocated < self._capacity:
            grown = min(self._capacity, max(1, 2 * allocated))
            for i, slab in enumerate(self._slabs):  # one tensor at a time: the old and new copies of one slab at most
                self._slabs[i] = torch.cat([slab, slab.new_empty((grown - allocated, *slab.shape[1:]))])
                del slab
            return allocated
        _, slot = self._slots.popitem(last=False)
        return slot

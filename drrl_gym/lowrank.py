"""Dynamic-rank attention, registered through transformers' ``AttentionInterface`` (no model class is patched).

For layer l and KV head g with orthonormal basis P (d x d, columns ordered by energy) and rank r, the scores are

    S_r = (Q P_r)(K P_r)^T * scaling            (scaling stays the model's 1/sqrt(d), whatever r)

so a rank is a prefix of the basis: changing it is slicing, and the QK^T work falls from 2*T*L*d to 2*T*L*r per
head. That is ``approximation="lowrank_scores"`` (the default, DR-RL's method). With ``approximation="select"`` the
same rank-r scores only *choose* which keys each query attends to (a ``keep`` fraction of the visible keys per
(layer, KV head), plus sink and recent tokens), and attention over the chosen keys is exact
(``drrl_gym.selection``, docs/selection.md). With ``cache_projected_keys`` (deployed models, ``drrl_gym.export``) the keys are projected once, at full
width, when they enter, and kept beside the KV cache together with a running key Gram, so a segment projects and
accumulates only its T new keys instead of all L visible ones; without it (the environment, whose CUDA graphs need fixed buffers) every forward re-projects them. In ``"select"`` mode
with cached projected keys, one decoded token on CUDA (``DECODE_KERNEL_DEVICES``) runs through
``drrl_gym.selection_decode.selection_decode`` over that cache, which reads only the keys it chooses; longer forwards,
the CPU and the environment run the dense reference. q and k arrive post-RoPE, so the projection happens after the rotation. When the ranks of one layer differ
across KV heads or batch rows, the prefix is taken at the largest of them and the extra columns of q are zeroed: the
result is the same as slicing each head separately; FLOPs are accounted per head (``drrl_gym.flops``).

One :class:`DynamicRankAttention` holds the state of one model: bases and current ranks. What a forward pass
should leave behind (the second moments in the basis that spectra and bounds are computed from, ``drrl_gym.spectra``,
``drrl_gym.bounds``; the attention outputs that fidelity compares) is asked for with :meth:`recording`, a context
that hands back a :class:`Recording` and forgets the request on exit, so no caller has a flag to reset.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from drrl_gym.attention_signals import attention_signals
from drrl_gym.backbone import AttentionGeometry
from drrl_gym.bases import BASIS_MODES, exact_basis
from drrl_gym.grouped_attention import grouped_sdpa_forward
from drrl_gym.rotated_cache import rotate_precisely
from drrl_gym.selection import (
    DEFAULT_RECENT_TOKENS,
    DEFAULT_SINK_TOKENS,
    dropped_mass_bound_table,
    rotate,
    selection_attention,
)
from drrl_gym.selection_decode import selection_decode

ATTENTION_NAME = "drrl_dynamic_rank"
APPROXIMATIONS = ("lowrank_scores", "select")
# Devices on which one decoded token with cached projected keys goes through selection_decode (a kernel that reads
# only the chosen keys) instead of the dense reference; elsewhere the reference runs, as in the environment.
DECODE_KERNEL_DEVICES = ("cuda",)


def attention_modules(model: PreTrainedModel, num_layers: int) -> list[torch.nn.Module]:
    """The self-attention modules of ``model`` (those with a ``layer_idx``), checked to be ``num_layers`` of them:
    where an attention function is attached (:class:`DynamicRankAttention`, ``drrl_gym.press``)."""
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and "Attention" in type(m).__name__]
    if len(layers) != num_layers:
        raise ValueError(
            f"found {len(layers)} attention modules with a layer_idx in {type(model).__name__}, expected "
            f"{num_layers}: this architecture is not supported (Llama-family and GPT-2 are)."
        )
    return layers


def validate_rank_choices(rank_choices: Sequence[int], head_dim: int) -> tuple[int, ...]:
    """Return ``rank_choices`` as a tuple after checking it is non-empty, strictly increasing and within [1, head_dim]."""
    choices = tuple(int(r) for r in rank_choices)
    if not choices:
        raise ValueError(f"rank_choices is empty. Fix: give at least one rank in [1, {head_dim}], e.g. (16, 32, 48, {head_dim}).")
    if any(r < 1 or r > head_dim for r in choices):
        raise ValueError(f"rank_choices {choices} must lie in [1, head_dim={head_dim}]. Fix: drop or clip the ranks outside it.")
    if any(a >= b for a, b in zip(choices, choices[1:])):
        raise ValueError(f"rank_choices {choices} must be strictly increasing. Fix: pass sorted(set(rank_choices)).")
    return choices


@dataclass
class SegmentStats:
    """Second moments, in each (layer, KV head)'s basis, of the last forward pass.

    query_gram[b, l, g] = sum over the group's query heads and the T new queries of (q P)^T (q P)   (d x d)
    key_gram[b, l, g]   = sum over the L visible keys of (k P)^T (k P)                               (d x d)
    Their diagonals are the per-direction energies e_j (``drrl_gym.spectra``).
    """

    query_gram: torch.Tensor  # (B, num_layers, num_kv_heads, d, d), float32
    key_gram: torch.Tensor  # (B, num_layers, num_kv_heads, d, d), float32
    num_queries: int  # T: new tokens per sequence in the segment
    num_keys: int  # L: keys visible to the last query
    # Selection mode: mean over each KV group's query rows of the dropped-mass bound for every candidate setting,
    # (B, num_layers, num_kv_heads, n_ranks, n_keeps) float64 (drrl_gym.selection.dropped_mass_bound_table)
    selection_bound: torch.Tensor | None = None
    # With recording(signal_queries=m): drrl_gym.attention_signals.attention_signals of the last m queries, stacked over
    # layers: entropy (B, num_layers, num_kv_heads); in selection mode the estimated dropped mass and the score margin
    # of every candidate setting, (B, num_layers, num_kv_heads, n_ranks, n_keeps) float32.
    entropy: torch.Tensor | None = None
    signal_mass: torch.Tensor | None = None
    signal_margin: torch.Tensor | None = None


@dataclass
class Recording:
    """What the forward passes inside one :meth:`DynamicRankAttention.recording` context left behind.

    Per layer, the last forward's values (a later forward overwrites an earlier one's): the query and key Grams in
    the basis when ``statistics`` was asked for, the attention outputs before o_proj, (B, T, H, d), when
    ``outputs`` was.
    """

    statistics: bool
    outputs: bool
    query_gram: list[torch.Tensor | None]
    key_gram: list[torch.Tensor | None]
    attention_outputs: list[torch.Tensor | None]
    selection_grid: tuple[tuple[int, ...], tuple[float, ...]] | None = None  # candidate (ranks, keeps) to bound
    selection_bound: list[torch.Tensor | None] | None = None
    signal_queries: int = 0  # last queries of a segment the attention signals are taken from; 0: none
    signals: list | None = None  # per layer: drrl_gym.attention_signals.AttentionSignals
    bound_queries: int | None = None  # last queries of a forward the selection bound is taken over; None: all; 0: no bound
    bound_segment_len: int | None = None  # a bound at the end of every segment of this many queries, not the forward's
    num_queries: int = 0
    num_keys: int = 0

    def stats(self) -> SegmentStats:
        """The second moments (and, in selection mode, the candidates' bounds) of the last forward pass."""
        if not self.statistics or any(g is None for g in self.query_gram):
            raise RuntimeError("no statistics recorded. Fix: run a forward inside recording(statistics=True).")
        bound = None if self.selection_bound is None else torch.stack(self.selection_bound, 1)
        signals = {}
        if self.signals is not None:
            signals["entropy"] = torch.stack([s.entropy for s in self.signals], 1)
            if self.signals[0].dropped_mass is not None:
                signals["signal_mass"] = torch.stack([s.dropped_mass for s in self.signals], 1)
                signals["signal_margin"] = torch.stack([s.margin for s in self.signals], 1)
        return SegmentStats(torch.stack(self.query_gram, 1), torch.stack(self.key_gram, 1), self.num_queries,
                            self.num_keys, bound, **signals)

    def segment_bounds(self) -> torch.Tensor:
        """(B, segments, num_layers, num_kv_heads, n_ranks, n_keeps) float64: the bound table at the end of every
        segment of the last forward (``recording(bound_segment_len=...)``), each over the segment's last
        ``bound_queries`` queries and the keys visible to them."""
        if self.bound_segment_len is None or self.selection_bound is None or any(b is None for b in self.selection_bound):
            raise RuntimeError("no segment bounds recorded. Fix: run a forward inside recording(selection_grid=..., "
                               "bound_segment_len=T) with approximation='select'.")
        return torch.stack(self.selection_bound, 2)


def _dispatch(module: torch.nn.Module, query, key, value, attention_mask, **kwargs):
    controller = getattr(module, "drrl_attention", None)
    if controller is None:
        raise RuntimeError(
            f"{type(module).__name__} uses attn_implementation={ATTENTION_NAME!r} but has no DynamicRankAttention "
            "attached. Fix: call DynamicRankAttention.attach(model) rather than set_attn_implementation by hand."
        )
    return controller(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _dispatch)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # same mask format as SDPA, which does the softmax


class DynamicRankAttention:
    """Per-model state of dynamic-rank attention.

    Args:
        geometry: the model's attention shapes.
        basis: (num_layers, num_kv_heads, d, d) orthonormal columns, for ``mode="calibrated"``; ignored for ``"exact"``.
        mode: ``"calibrated"`` (fixed basis, default) or ``"exact"`` (eigenbasis of this segment's Q^T Q + K^T K,
            recomputed every forward: the paper's online SVD, kept for comparison since it costs an eigh per head).
        cache_projected_keys: keep the keys projected onto the basis (full width) and their running Gram across the
            forwards of one sequence (calibrated mode only). Call :meth:`start_sequence` before each new sequence;
            a forward whose keys do not continue the cached ones raises. Costs one more copy of the keys in memory.
        approximation: ``"lowrank_scores"`` (attention on rank-r scores) or ``"select"`` (rank-r scores choose the
            keys, exact attention over them; calibrated basis only). :meth:`set_keep` sets the kept fractions.
        sink_tokens, recent_tokens: keys every query keeps in ``"select"`` mode (the first ones; its last ones).
        selection: ``"group"`` (one key set per KV head, shared by its query heads: what a decode kernel reads once)
            or ``"head"`` (one per query head); ``drrl_gym.selection``.
    """

    def __init__(self, geometry: AttentionGeometry, basis: torch.Tensor | None = None, mode: str = "calibrated",
                 cache_projected_keys: bool = False, approximation: str = "lowrank_scores",
                 sink_tokens: int = DEFAULT_SINK_TOKENS, recent_tokens: int = DEFAULT_RECENT_TOKENS,
                 selection: str = "group"):
        if approximation not in APPROXIMATIONS:
            raise ValueError(f"approximation={approximation!r}: unknown. Fix: choose one of {APPROXIMATIONS}.")
        if approximation == "select" and mode != "calibrated":
            raise ValueError("approximation='select' needs the calibrated basis (keys rotated into a fixed basis). "
                             "Fix: pass mode='calibrated'.")
        if mode not in BASIS_MODES:
            raise ValueError(f"unknown basis mode {mode!r}; choose one of {BASIS_MODES}")
        if cache_projected_keys and mode != "calibrated":
            raise ValueError("cache_projected_keys needs the calibrated basis: an exact basis changes every segment, so "
                             "projected keys cannot be reused. Fix: pass cache_projected_keys=False with mode='exact'.")
        d = geometry.head_dim
        if mode == "calibrated":
            expected = (geometry.num_layers, geometry.num_kv_heads, d, d)
            if basis is None or tuple(basis.shape) != expected:
                got = None if basis is None else tuple(basis.shape)
                raise ValueError(f"calibrated mode needs a basis of shape {expected}, got {got}")
        self.geometry = geometry
        self.mode = mode
        self.basis = basis
        self._recording: Recording | None = None
        self._cast_basis: tuple[torch.Tensor, torch.Tensor] | None = None  # (basis, its copy in the model's dtype)
        self._static_ranks: torch.Tensor | None = None  # see set_static_ranks
        self._static_keep: torch.Tensor | None = None  # (and its keeps, in "select" mode)
        self._static = False  # whether selection reads the static (device) settings
        self.cache_projected_keys = cache_projected_keys
        self.approximation, self.sink_tokens, self.recent_tokens = approximation, sink_tokens, recent_tokens
        self.selection = selection
        self.start_sequence()
        self.set_ranks(torch.full((1, geometry.num_layers, geometry.num_kv_heads), d, dtype=torch.long))
        self.set_keep(1.0)

    # ----------------------------------------------------------------------------------------------- ranks
    def set_ranks(self, ranks: torch.Tensor | int) -> None:
        """Set ranks: an int for every head, or a (B or 1, num_layers, num_kv_heads) integer tensor in [1, d]."""
        g = self.geometry
        if isinstance(ranks, int):
            ranks = torch.full((1, g.num_layers, g.num_kv_heads), ranks, dtype=torch.long)
        ranks = self._checked(ranks)
        # Slicing decisions are made from this CPU copy so the forward pass never waits on the GPU for them.
        self.ranks = ranks
        layer_max = ranks.amax(dim=(0, 2))
        self._layer_max = layer_max.tolist()
        # one reduction for all layers, not three small ops per layer: this runs on the CPU before every step
        self._layer_uniform = (ranks == layer_max[None, :, None]).all(dim=0).all(dim=-1).tolist()
        self._rank_device: torch.Tensor | None = None
        self._static = False

    def set_keep(self, keep: torch.Tensor | float) -> None:
        """Fractions of the visible keys each query keeps in ``"select"`` mode: a float for every head, or a
        (B or 1, num_layers, num_kv_heads) tensor in (0, 1]. 1 keeps every key (exact attention)."""
        g = self.geometry
        keep = torch.full((1, g.num_layers, g.num_kv_heads), float(keep)) if isinstance(keep, (int, float)) else keep
        keep = torch.as_tensor(keep, dtype=torch.float64).cpu()
        if keep.dim() != 3 or tuple(keep.shape[1:]) != (g.num_layers, g.num_kv_heads):
            raise ValueError(f"keep must have shape (B, {g.num_layers}, {g.num_kv_heads}), got {tuple(keep.shape)}")
        if not bool(((keep > 0) & (keep <= 1)).all()):
            raise ValueError(f"keep must lie in (0, 1], got min {float(keep.min())} max {float(keep.max())}. Fix: "
                             "pass fractions of the visible keys, e.g. 0.125.")
        self.keep = keep
        self._layer_keeps_all = (keep == 1).all(dim=0).all(dim=-1).tolist()
        self._static = False

    def set_static_ranks(self, ranks: torch.Tensor, device: torch.device) -> None:
        """Set (B, num_layers, num_kv_heads) ranks so that no part of the forward depends on their values.

        For CUDA-graph capture and replay: the ranks are copied into one persistent tensor on ``device`` (replays
        read them from there; no host-to-device copy inside the forward), and every layer takes the zero-masking
        path at full width whatever the ranks, so one captured graph serves every rank choice. The scores equal
        those of :meth:`set_ranks` (the masked columns add exact zeros); FLOPs are accounted per row on the ranks
        either way (``drrl_gym.flops``). In ``"select"`` mode the keeps set by :meth:`set_keep` are copied to the
        device the same way, and selection reads both there (:meth:`set_keep` or :meth:`set_ranks` afterwards go
        back to the host settings).
        """
        ranks, g = self._checked(ranks), self.geometry
        self._static_ranks = _persistent(self._static_ranks, ranks, device)
        self.ranks = ranks
        self._layer_max, self._layer_uniform = [g.head_dim] * g.num_layers, [False] * g.num_layers
        self._rank_device = self._static_ranks
        if self.approximation == "select":
            self._static_keep = _persistent(self._static_keep, self.keep, device)
            self._static = True

    def _checked(self, ranks: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        ranks = torch.as_tensor(ranks).long().cpu()
        if ranks.dim() != 3 or tuple(ranks.shape[1:]) != (g.num_layers, g.num_kv_heads):
            raise ValueError(f"ranks must have shape (B, {g.num_layers}, {g.num_kv_heads}), got {tuple(ranks.shape)}")
        if ranks.min() < 1 or ranks.max() > g.head_dim:
            raise ValueError(f"ranks must lie in [1, {g.head_dim}], got min {int(ranks.min())} max {int(ranks.max())}")
        return ranks

    # -------------------------------------------------------------------------------------- attach / detach
    def attach(self, model: PreTrainedModel) -> None:
        """Route ``model``'s self-attention through this object (and remember the previous implementation)."""
        for module in attention_modules(model, self.geometry.num_layers):
            module.drrl_attention = self
        if model.config._attn_implementation != ATTENTION_NAME:  # re-attaching (another object) keeps the original
            model.drrl_previous_attention = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)

    def detach(self, model: PreTrainedModel) -> None:
        model.set_attn_implementation(model.drrl_previous_attention)
        for module in model.modules():
            if getattr(module, "drrl_attention", None) is self:
                del module.drrl_attention

    @contextmanager
    def attached(self, model: PreTrainedModel) -> Iterator[DynamicRankAttention]:
        self.attach(model)
        try:
            yield self
        finally:
            self.detach(model)

    # ------------------------------------------------------------------------------------------- statistics
    def start_sequence(self) -> None:
        """Forget the projected keys of the last sequence (``cache_projected_keys``)."""
        self._projected_keys: list[torch.Tensor | None] = [None] * self.geometry.num_layers  # (B, kv_heads, L, d)
        self._running_key_gram: list[torch.Tensor | None] = [None] * self.geometry.num_layers  # (B, kv_heads, d, d)

    @contextmanager
    def recording(self, statistics: bool = False, outputs: bool = False,
                  selection_grid: tuple[tuple[int, ...], tuple[float, ...]] | None = None,
                  signal_queries: int = 0, bound_queries: int | None = None,
                  bound_segment_len: int | None = None) -> Iterator[Recording]:
        """Record, in the forward passes run inside the context, the statistics and/or attention outputs.

        ``with attention.recording(statistics=True) as recorded: model(...)`` then ``recorded.stats()``. Recording
        statistics makes even full rank take the projection path (the Grams are taken in the basis). In selection
        mode, ``selection_grid=(ranks, keeps)`` also records the dropped-mass bound of every candidate setting (over
        the last ``bound_queries`` queries of the forward; None: all; 0: none, the signals alone use the grid).
        ``bound_segment_len=T`` records that bound at the end of every T queries of the forward instead, each over
        its segment's last ``bound_queries`` queries, statistics or not: a reference forward of several segments
        leaves each segment's table, as a forward per segment would (:meth:`Recording.segment_bounds`).
        ``signal_queries=m`` (with statistics) also records ``drrl_gym.attention_signals.attention_signals`` of the last m
        queries (with the grid's settings in selection mode).
        """
        if self._recording is not None:
            raise RuntimeError("this DynamicRankAttention is already recording. Fix: finish the outer recording first.")
        if selection_grid is not None and (self.approximation != "select" or not (statistics or bound_segment_len)):
            raise ValueError("selection_grid needs approximation='select' and statistics=True (or bound_segment_len).")
        if bound_segment_len is not None and (selection_grid is None or bound_segment_len < 1 or not bound_queries
                                              or bound_queries > bound_segment_len):
            raise ValueError(f"bound_segment_len={bound_segment_len} needs a selection_grid, a length >= 1 and "
                             f"1 <= bound_queries <= it (got bound_queries={bound_queries}).")
        if signal_queries < 0 or (signal_queries and not statistics):
            raise ValueError(f"signal_queries={signal_queries} needs statistics=True and must be >= 0.")
        layers = self.geometry.num_layers
        bounds = None if selection_grid is None or bound_queries == 0 else [None] * layers
        self._recording = Recording(statistics, outputs, [None] * layers, [None] * layers, [None] * layers,
                                    selection_grid, bounds, signal_queries, [None] * layers if signal_queries else None,
                                    bound_queries=bound_queries, bound_segment_len=bound_segment_len)
        try:
            yield self._recording
        finally:
            self._recording = None

    # ---------------------------------------------------------------------------------------------- forward
    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        batch, heads, n_queries, d = query.shape
        kv_heads = key.shape[1]
        scaling = d**-0.5 if scaling is None else scaling  # never 1/sqrt(r): the rank must not change the temperature
        r_max, uniform = self._layer_max[layer], self._layer_uniform[layer]
        recording = self._recording
        statistics = recording is not None and recording.statistics
        cached_keys = self._extend_projected_keys(layer, key) if self.cache_projected_keys else None
        if recording is not None and recording.bound_segment_len:
            self._record_segment_bounds(layer, query, key, scaling)
        if self.approximation == "select" and (statistics or not self._layer_keeps_all[layer]):
            return self._select(layer, query, key, value, scaling, statistics, cached_keys), None
        if r_max == d and uniform and not statistics:
            # Full rank: P is a rotation, so (qP)(kP)^T = qk^T; skip two matmuls.
            out, _ = grouped_sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
            return self._keep(layer, out), None

        grouped = query.reshape(batch, kv_heads, (heads // kv_heads) * n_queries, d)  # heads j*G..j*G+G-1 share kv head j
        if self.mode == "exact":
            basis = exact_basis(_gram(grouped), _gram(key)).to(query.dtype)  # (B, kv_heads, d, d)
        else:
            basis = self._basis_like(query)[layer]  # (kv_heads, d, d)
        if not statistics:
            basis = basis[..., :r_max]  # only the prefix is needed: 2*T*d*r per head instead of 2*T*d*d
        q_proj = grouped @ basis
        k_proj = key @ basis if cached_keys is None else cached_keys
        if statistics:
            self._record_grams(layer, q_proj, k_proj, cached_keys is not None, n_queries)
            self._record_signals(layer, q_proj.reshape(batch, heads, n_queries, d), k_proj, scaling)
            q_proj = q_proj[..., :r_max]
        k_proj = k_proj[..., :r_max]
        if not uniform:
            # Zeroing q's columns r..r_max of a head removes exactly those terms from its scores.
            keep = torch.arange(r_max, device=query.device) < self._ranks_on(query.device)[:, layer, :, None]
            q_proj = q_proj * keep[:, :, None, :].to(q_proj.dtype)
        q_low = q_proj.reshape(batch, heads, n_queries, r_max)
        out, _ = grouped_sdpa_forward(module, q_low, k_proj, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return self._keep(layer, out), None

    def _select(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                statistics: bool, cached_keys: torch.Tensor | None) -> torch.Tensor:
        """Selection attention for this layer at its (B, kv_heads) ranks and keeps (``drrl_gym.selection``)."""
        batch, heads, n_queries, d = query.shape
        kv_heads = key.shape[1]
        basis = self._basis_like(query)[layer]
        rotated = key @ basis if cached_keys is None else cached_keys  # K~ = K P: one cache serves both uses
        if statistics:
            recording = self._recording
            grouped = query.reshape(batch, kv_heads, (heads // kv_heads) * n_queries, d) @ basis
            self._record_grams(layer, grouped, rotated, cached_keys is not None, n_queries)
            rotated_query = grouped.reshape(batch, heads, n_queries, d)  # heads j*G..j*G+G-1: KV head j
            self._record_signals(layer, rotated_query, rotated, scaling)
            if recording.selection_bound is not None and not recording.bound_segment_len:
                bounded = rotated_query[:, :, -recording.bound_queries:] if recording.bound_queries else rotated_query
                recording.selection_bound[layer] = self._bound_table(bounded, rotated, scaling)
        if (n_queries == 1 and cached_keys is not None and self.selection == "group"
                and query.device.type in DECODE_KERNEL_DEVICES):
            # One decoded token over the projected-key cache: the decode kernel reads only what it chooses. Every
            # cached key is visible to the new token (the cache holds this sequence's keys, the new one last).
            ranks = self._ranks_on(query.device)[:, layer].expand(batch, kv_heads)
            keep = self.keep[:, layer].to(query.device).expand(batch, kv_heads)
            rotated_query = rotate_precisely(query, self.basis[layer])[:, :, 0]  # q~ = q P, (B, H, d)
            lengths = torch.full((batch,), rotated.shape[2], dtype=torch.long, device=query.device)
            out = selection_decode(rotated_query, rotated, value, lengths, ranks, keep, scaling=scaling,
                                   sink_tokens=self.sink_tokens, recent_tokens=self.recent_tokens)
            return self._keep(layer, out[:, None])
        # The settings go in as the host holds them: selection_attention checks and counts on the host, so the
        # forward does not wait for the device once per layer. Static settings (set_static_ranks) are on the device
        # already, so a CUDA graph or compiled step reads them there whatever they are.
        ranks, keep = (self._static_ranks, self._static_keep) if self._static else (self.ranks, self.keep)
        ranks, keep = ranks[:, layer].expand(batch, kv_heads), keep[:, layer].expand(batch, kv_heads)
        out, _ = selection_attention(query, key, value, self.basis[layer], ranks, keep, scaling=scaling,
                                     sink_tokens=self.sink_tokens, recent_tokens=self.recent_tokens,
                                     selection=self.selection, rotated_keys=rotated)
        return self._keep(layer, out)

    def _bound_table(self, rotated_query: torch.Tensor, rotated_keys: torch.Tensor, scaling: float) -> torch.Tensor:
        """(B, kv_heads, n_ranks, n_keeps): the mean bound (7) of the recording's grid over ``rotated_query``, the
        last queries of ``rotated_keys``. float32 work: half the traffic of float64 for a mean the mask compares
        with a threshold."""
        ranks, keeps = self._recording.selection_grid
        mean, _ = dropped_mass_bound_table(rotated_query, rotated_keys, ranks, keeps, scaling=scaling,
                                           sink_tokens=self.sink_tokens, recent_tokens=self.recent_tokens,
                                           selection=self.selection, dtype=torch.float32)
        return mean

    def _record_segment_bounds(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """``recording(bound_segment_len=T)``: the layer's bound table at the end of every T queries of this
        forward, each over its segment's last ``bound_queries`` queries and the keys they see (B, S, kv_heads,
        n_ranks, n_keeps). The rotation is the one :meth:`_select` applies, so each table is the one a forward of
        that segment alone would record."""
        recording, n_queries = self._recording, query.shape[2]
        length, last = recording.bound_segment_len, recording.bound_queries
        if n_queries % length:
            raise ValueError(f"bound_segment_len={length} does not divide the forward's {n_queries} queries. Fix: "
                             "run whole segments.")
        basis = self._basis_like(query)[layer]
        rotated_keys, rotated_query = key @ basis, rotate(query, basis)
        offset = key.shape[2] - n_queries  # keys before the forward's first query
        recording.selection_bound[layer] = torch.stack(
            [self._bound_table(rotated_query[:, :, end - last:end], rotated_keys[:, :, :offset + end], scaling)
             for end in range(length, n_queries + 1, length)], 1)

    def _record_grams(self, layer: int, q_proj: torch.Tensor, k_proj: torch.Tensor, keys_cached: bool,
                      n_queries: int) -> None:
        """Record the layer's query and key Grams in the basis (the running key Gram when keys are cached)."""
        recording = self._recording
        key_gram = self._running_key_gram[layer] if keys_cached else _gram(k_proj)
        recording.query_gram[layer], recording.key_gram[layer] = _gram(q_proj), key_gram
        recording.num_queries, recording.num_keys = n_queries, k_proj.shape[2]

    def _record_signals(self, layer: int, rotated_query: torch.Tensor, rotated_keys: torch.Tensor,
                        scaling: float) -> None:
        """Record the attention signals of the last ``signal_queries`` queries, if asked for."""
        recording = self._recording
        if recording.signal_queries:
            recording.signals[layer] = attention_signals(
                rotated_query[:, :, -recording.signal_queries:], rotated_keys, recording.selection_grid,
                scaling=scaling, sink_tokens=self.sink_tokens, recent_tokens=self.recent_tokens,
                selection=self.selection)

    def _extend_projected_keys(self, layer: int, key: torch.Tensor) -> torch.Tensor:
        """Project the keys not seen yet onto the full basis, append them and add their Gram to the running one."""
        cached = self._projected_keys[layer]
        seen = 0 if cached is None else cached.shape[2]
        if cached is not None and (cached.shape[0] != key.shape[0] or seen > key.shape[2]):
            raise RuntimeError(
                f"layer {layer}: {seen} projected keys of {cached.shape[0]} sequence(s) are cached, but this forward "
                f"has {key.shape[2]} keys of {key.shape[0]}: not a continuation of the cached sequence. Fix: call "
                "DynamicRankAttention.start_sequence() before running a new sequence."
            )
        new = key[:, :, seen:] @ self._basis_like(key)[layer]  # (B, kv_heads, new keys, d): 2 * d^2 per new key
        new_gram = _gram(new)
        if cached is None:
            self._projected_keys[layer], self._running_key_gram[layer] = new, new_gram
        else:
            self._projected_keys[layer] = torch.cat([cached, new], dim=2)
            self._running_key_gram[layer] = self._running_key_gram[layer] + new_gram
        return self._projected_keys[layer]

    def cast_basis(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The basis in ``dtype`` on ``device``, converted once rather than per layer and forward. A compiled caller
        calls it before its compiled forward, so the conversion is never traced (its state would be guarded on)."""
        source, cast = self._cast_basis or (None, None)
        if source is not self.basis or cast.device != device or cast.dtype != dtype:
            cast = self.basis.to(device=device, dtype=dtype)
            self._cast_basis = (self.basis, cast)
        return cast

    def _basis_like(self, query: torch.Tensor) -> torch.Tensor:
        return self.cast_basis(query.dtype, query.device)

    def _ranks_on(self, device: torch.device) -> torch.Tensor:
        if self._rank_device is None or self._rank_device.device != device:
            self._rank_device = self.ranks.to(device)
        return self._rank_device

    def _keep(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        if self._recording is not None and self._recording.outputs:
            self._recording.attention_outputs[layer] = out  # (B, T, H, d): before o_proj, for fidelity metrics
        return out


def _persistent(kept: torch.Tensor | None, values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` copied into ``kept`` (made on ``device`` if missing or of another shape): a tensor at one address,
    which CUDA graph replays read. Compiled callers specialise on its batch size (``mark_static``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if kept is None or kept.shape != values.shape or kept.device != device:
        kept = torch.empty(values.shape, dtype=values.dtype, device=device)
        torch._dynamo.mark_static(kept)
    return kept.copy_(values)


_HALF_GRAMS = {"supported": True}  # whether this torch multiplies half-precision matrices into float32 (CUDA)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X over the token axis, in float32: (..., N, d) -> (..., d, d).

    Half-precision inputs on CUDA are multiplied as they are, with float32 accumulation and output (``out_dtype``):
    the product of two bf16 or fp16 numbers is exact in float32, so this is the float32 product of their float32
    copies up to summation order, without writing those copies (every step, all visible keys of every layer). Where
    this torch has no such kernel the float32 copies are made (checked on the first call, which is eager: a reset)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _HALF_GRAMS["supported"]:
        flat = x.reshape(-1, *x.shape[-2:])
        try:
            gram = torch.bmm(flat.transpose(-1, -2), flat, out_dtype=torch.float32)
            return gram.reshape(*x.shape[:-2], x.shape[-1], x.shape[-1])
        except (TypeError, RuntimeError, NotImplementedError):
            _HALF_GRAMS["supported"] = False
    x = x.float()
    return x.transpose(-1, -2) @ x

"""The one step path of ``DRRL-Attention-v0``: B episodes in lockstep through one frozen model.

:class:`EpisodeBatch` is the single env with B = 1 (``drrl_gym.env``) and the vector env with B = num_envs
(``drrl_gym.vector``), so the two cannot drift apart. Every row is its own episode (its own sequence, KV cache,
ranks, mask, fidelity, FLOPs and reward); rows share one forward pass per step. All episodes have n_segments - 1
steps, so the rows stay in step and end together. The environment's semantics are documented in ``drrl_gym.env``
and docs/env.md.

Per reset: the warm-up segment at full rank, then one full-rank forward of all remaining segments of every row from
a copy of the warm-up cache (the reference trajectory, which does not depend on the agent). The agent's KV cache is
one ``drrl_gym.kv_cache.PreallocatedCache`` for the batch's lifetime, written in place. Per step: one forward
of the B segments at the chosen ranks with the statistics it records, each row's fidelity against the reference,
the observation's reductions (:meth:`EpisodeBatch._device_step`; on CUDA a replayed graph, ``drrl_gym.cuda_graphs``,
of a compiled function with ``compile=True``),
then the mask, projection, FLOPs and reward on the CPU. The state of the running episodes lives in one
:class:`EpisodeState`, which does not exist before the first ``reset``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import torch
from gymnasium import spaces
from torch.profiler import record_function
from transformers import Cache, DynamicCache

from drrl_gym.backbone import Backbone
from drrl_gym.config import EnvConfig, fail, is_int
from drrl_gym.corpus import CorpusSplits
from drrl_gym.cuda_graphs import SegmentGraphs
from drrl_gym.flops import flops_fractions, selection_fractions
from drrl_gym.hf_compat import cache_argument
from drrl_gym.kv_cache import PreallocatedCache, cache_prefix, kv_tensors
from drrl_gym.lowrank import DynamicRankAttention, Recording, SegmentStats
from drrl_gym.observation import DecisionSpace, Observed, StatsSummary
from drrl_gym.reference_cache import GIB, EpisodeStart, ReferenceCache
from drrl_gym.resources import shared_backbone, shared_basis, shared_corpus
from drrl_gym.reward import FIDELITY_METRICS, Captured, FidelityMinusCost, KLBudget, attention_cosine_per_head

_T = TypeVar("_T")


@dataclass
class BatchStep:
    """One step of every row: observation matrices, rewards and the info arrays (leading axis: the row)."""

    observation: np.ndarray  # (B, n_units, n_features) float32
    reward: np.ndarray  # (B,) float64
    terminated: bool  # all rows end on the same step: episodes all have n_segments - 1 steps
    info: dict[str, np.ndarray]


@dataclass
class EpisodeState:
    """Everything about the B running episodes; made by ``reset``, advanced by ``step``."""

    sequence_index: np.ndarray  # (B,) train sequence of each row
    cache: PreallocatedCache  # the agent's KV cache (the batch's one, restarted by each reset)
    reference: Captured  # the full-rank trajectory of segments 1 .. n_segments-1
    observed: Observed  # the last observation and its bounds
    stats: SegmentStats  # the statistics it was built from (on a CUDA graph's memory: valid for this step)
    prev_index: np.ndarray  # (B, n_units) choices applied to the last segment
    rank_history: np.ndarray  # (B, n_units, n_segments) ranks run so far (0: not run yet)
    segment: int = 1  # the next segment to run
    probe_reference: Captured | None = None  # the reference with attention outputs, for probes of other metrics
    signals: np.ndarray | None = None  # the last segment's attention signals (DecisionSpace.signals_of), if observed
    # bound_source="reference": the reference's bound table of segments 1 .. n_segments-1,
    # (B, n_segments - 1, layers, kv_heads, n_ranks, n_keeps)
    reference_bound: torch.Tensor | None = None


class EpisodeBatch:
    """B episodes of ``DRRL-Attention-v0`` in lockstep (see the module docstring)."""

    def __init__(self, config: EnvConfig, batch_size: int, backbone: Backbone | None = None) -> None:
        if not is_int(batch_size) or batch_size < 1:
            fail("num_envs", batch_size, "must be a positive integer", "pass an int >= 1")
        config.check_files()
        self.config, self.batch_size = config, int(batch_size)
        self.backbone = backbone or shared_backbone(config.model, config.device, config.torch_dtype)
        self.geometry = self.backbone.geometry
        window = getattr(self.backbone.model.config, "max_position_embeddings", None)
        self.rank_choices = config.rank_choices_for(self.geometry, window)
        self.corpus: CorpusSplits = shared_corpus(self.backbone, config.corpus_config())
        basis = shared_basis(self.backbone, self.corpus) if config.basis == "calibrated" else None
        self.attention = DynamicRankAttention(self.geometry, basis, config.basis, approximation=config.attention)
        self.reward: FidelityMinusCost | KLBudget = (
            KLBudget(config.cost_budget, config.budget_penalty) if config.reward == KLBudget.name
            else FidelityMinusCost(FIDELITY_METRICS[config.fidelity], config.fidelity_weight, config.cost_weight,
                                   config.perturbation_weight))
        self.selection = config.attention == "select"
        # The mask's bound table from the reference (computed with it, per sequence), not from each step's forward
        # (EnvConfig allows "reference" in selection mode only)
        self._reference_bounds = config.bound_source == "reference"
        self.decisions = DecisionSpace(self.geometry, self.rank_choices, config.granularity, config.segment_len,
                                       config.n_segments, config.keep_choices if self.selection else None,
                                       config.observation_features, config.bound_queries)
        self.n_units, self.feature_names = self.decisions.n_units, self.decisions.feature_names
        self.unit_shape = (self.n_units, len(self.feature_names))
        self.total_steps = 0  # over the batch's lifetime: drives the epsilon schedule, not reset by reset()
        self.episode: EpisodeState | None = None
        # The agent-independent start of an episode per train sequence, kept across episodes (drrl_gym.reference_cache)
        self.references = ReferenceCache(int(config.reference_cache_gib * GIB))
        # One token buffer for the batch's lifetime (reset copies into it): CUDA graphs read it at a fixed address.
        self._tokens = torch.zeros((self.batch_size, config.seq_len), dtype=torch.long, device=self.backbone.device)
        # and one KV cache, so CUDA graphs (and compiled code) read and write it in place at fixed addresses
        self._cache = PreallocatedCache(self.geometry.num_layers, config.seq_len)
        # The step is the same program for every choice of ranks (and keeps) (DynamicRankAttention.set_static_ranks),
        # so one compilation and one graph per segment serve all; selection chooses its keys without sorting or
        # host synchronisation (drrl_gym.row_threshold). An exact basis changes with the data: eager only.
        static = config.basis == "calibrated"
        self._compiled = static and config.compile
        self._segment_program = compiled_step(self._segment_work) if self._compiled else self._segment_work
        if self._compiled:  # a long silent pause otherwise: say what it is
            print(f"drrl_gym: compile=True: the first episode compiles the env step (batch of {self.batch_size}; once "
                  "per batch size and process, minutes; docs/env.md)", file=sys.stderr, flush=True)
        graphs = static and config.cuda_graphs and self.backbone.device.type == "cuda"
        self._graphs = SegmentGraphs(self._device_step) if graphs else None

    # ---------------------------------------------------------------------------------------------- spaces
    def observation_space(self) -> spaces.Box:
        """One row's flat observation space (docs/env.md, "Observation")."""
        return spaces.Box(0.0, 1.0, (self.n_units * len(self.feature_names),), dtype=np.float32)

    def action_space(self) -> spaces.MultiDiscrete:
        return spaces.MultiDiscrete(np.full(self.n_units, self.decisions.n_choices, dtype=np.int64))

    # ----------------------------------------------------------------------------------------- episode API
    @property
    def epsilon(self) -> float:
        return self.config.epsilon_at(self.total_steps)

    @property
    def segment(self) -> int:
        """The next segment to run; 0 before the first reset."""
        return 0 if self.episode is None else self.episode.segment

    def sequence_indices(self, rngs: Sequence[np.random.Generator], requested: Sequence[Any]) -> np.ndarray:
        """Train sequence per row: ``requested[b]`` if given (checked), else drawn from row b's own RNG."""
        size = len(self.corpus.train)
        indices = []
        for rng, index in zip(rngs, requested, strict=True):
            if index is None:
                index = int(rng.integers(size))
            elif not is_int(index) or not 0 <= index < size:
                fail("options['sequence_index']", index, f"must be an int in [0, {size})", "pick a train index")
            indices.append(int(index))
        return np.asarray(indices, dtype=np.int64)

    def reset(self, indices: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Start every row on train sequence ``indices[b]``; returns observation matrices and reset info arrays."""
        if len(indices) != self.batch_size:
            raise ValueError(f"reset needs {self.batch_size} sequence indices, got {len(indices)}")
        indices = np.array(indices, dtype=np.int64)
        self._tokens.copy_(self.corpus.train[torch.from_numpy(indices)])
        full = self.geometry.head_dim
        with torch.inference_mode():
            cache, stats, reference, reference_bound = self._episode_start(indices)
            if self._graphs is not None:  # the graphs read the reference at fixed places
                reference = _pinned_captured(self._graphs, reference)
                if reference_bound is not None:
                    reference_bound = self._graphs.pin("reference_bound", [reference_bound])[0]
        prev_index = np.full((self.batch_size, self.n_units), self.decisions.n_choices - 1)
        history = np.zeros((self.batch_size, self.n_units, self.config.n_segments), dtype=np.int64)
        history[:, :, 0] = full
        summary = self.decisions.summarize(stats)
        observed = self.decisions.observe_summary(summary, prev_index, 1)
        self.episode = EpisodeState(indices, cache, reference, observed, stats, prev_index, history,
                                    signals=self.decisions.signals_of(summary), reference_bound=reference_bound)
        info = {
            "segment": np.zeros(self.batch_size, dtype=np.int64),
            "epsilon": np.full(self.batch_size, self.epsilon),
            "sequence_index": indices.copy(),
        }
        return observed.matrix, info

    def step(self, requested: np.ndarray) -> BatchStep:
        """Run the next segment of every row at ``requested`` (B, n_units) choice indices, projected by the mask."""
        self.require_running("step()")
        episode, rows = self.episode, np.arange(self.batch_size)[:, None]
        t, epsilon, length = episode.segment, self.epsilon, self.config.segment_len
        chosen, projected = self.decisions.project(requested, self.allowed())
        perturbation = episode.observed.transition[rows, np.arange(self.n_units), chosen].mean(-1)
        layer_ranks = self.decisions.layer_ranks(chosen)  # (B, layers, kv_heads)
        layer_keeps = self.decisions.layer_keeps(chosen)
        self.attention.set_keep(layer_keeps)
        # record_function labels name the parts of a step in torch.profiler tables (benchmarks/env_throughput.py).
        with torch.inference_mode(), record_function("drrl.device_step"):
            fidelity, summary, stats, executed = self._run_device_step(t, layer_ranks)
        # The costs need only the ranks: counted here, while the device still runs the step (the observation below
        # is the first read of its results, and waits for it).
        keys = (t + 1) * length
        if self.selection:
            counted = selection_fractions(self.geometry, layer_ranks.numpy(), layer_keeps.numpy(), length, keys)
            ran = selection_fractions(self.geometry, layer_ranks.numpy(), layer_keeps.numpy(), length, keys,
                                      dense_reference=True)
        else:
            counted = flops_fractions(self.geometry, layer_ranks.numpy(), length, keys, self.config.basis)
            ran = flops_fractions(self.geometry, executed.numpy(), length, keys, self.config.basis)
        with record_function("drrl.observe_cpu"):
            episode.observed = self.decisions.observe_summary(summary, chosen, t + 1, episode.signals)
            episode.signals = self.decisions.signals_of(summary)
        episode.stats = stats
        components = self.reward.components(fidelity.double().cpu().numpy(), counted.scores, perturbation)
        ranks = self.decisions.choice_ranks[chosen]
        episode.rank_history[:, :, t] = ranks
        episode.prev_index, episode.segment = chosen, t + 1
        self.total_steps += 1
        info = {
            "segment": np.full(self.batch_size, t),
            **components,
            "ranks": ranks,
            "rank_fraction": ranks.mean(-1) / self.geometry.head_dim,
            "keeps": self.decisions.choice_keeps[chosen],
            "flops_saved_scores": counted.saved_scores,
            "flops_saved_attention": counted.saved_attention,
            "flops_saved_scores_executed": ran.saved_scores,
            "flops_saved_attention_executed": ran.saved_attention,
            "mask_rejections": projected.sum(-1),
            "projected": projected,
            "epsilon": np.full(self.batch_size, epsilon),
            "sequence_index": episode.sequence_index.copy(),
        }
        return BatchStep(episode.observed.matrix, components["reward"], episode.segment == self.config.n_segments, info)

    def require_running(self, what: str) -> None:
        if not 1 <= self.segment < self.config.n_segments:
            raise RuntimeError(f"{what} called before reset() or after the episode terminated. Fix: call reset().")

    def _require_state(self) -> EpisodeState:
        if self.episode is None:
            raise RuntimeError("the environment has no state yet. Fix: call reset() first.")
        return self.episode

    def transition_bounds(self) -> np.ndarray:
        """(B, n_units, n_choices) normalised bounds from each unit's r_{t-1} to every choice (unclipped)."""
        return self._require_state().observed.transition.copy()

    def full_rank_bounds(self) -> np.ndarray:
        """(B, n_units, n_choices) normalised bounds from full rank d to every choice: what the mask compares."""
        return self._require_state().observed.to_full.copy()

    def allowed(self) -> np.ndarray:
        """(B, n_units, n_choices) bool: the safety mask at epsilon_t (``DecisionSpace.allowed``)."""
        return self.decisions.allowed(self._require_state().observed.to_full, self.epsilon)

    def check_indices(self, values: Any, shape: tuple[int | None, ...], what: str, fix: str) -> np.ndarray:
        """``values`` as int64 choice indices of ``shape`` (None: any positive length), or a ValueError."""
        n = self.decisions.n_choices
        try:
            array = np.asarray(values)
        except ValueError:  # ragged nesting: numpy's own message would not say what an action must be
            array = None
        well_formed = array is not None and (
            array.ndim == len(shape) and array.size > 0 and np.issubdtype(array.dtype, np.integer)
            and all(want is None or want == got for want, got in zip(shape, array.shape))
        )
        if not well_formed or array.min() < 0 or array.max() >= n:
            raise ValueError(f"{what} in [0, {n}) (one rank-choice index per unit), got {values!r}. Fix: {fix}.")
        return array.astype(np.int64)

    def probe_layer_fidelity(self, candidates: np.ndarray) -> np.ndarray:
        """What-if for every row: (K, n_units) candidate actions -> (B, K, n_units) per-unit attention cosines.

        Documented on ``DRRLAttentionEnv.probe_layer_fidelity``. Row b's candidate k runs as batch row b * K + k on
        a copy of row b's cache; the episode does not advance.
        """
        self.require_running("probe_layer_fidelity()")
        candidates = self.check_indices(candidates, (None, self.n_units), "candidates must be (K, n_units) integer "
                                        "indices", "pass rows sampled from env.action_space")
        episode, g = self.episode, self.geometry
        count, t, length = len(candidates), episode.segment, self.config.segment_len
        with torch.inference_mode():
            reference = episode.reference if episode.reference.attention is not None else episode.probe_reference
            if reference is None:  # the fidelity metric kept only hidden states: run the reference again, once
                reference = episode.probe_reference = self._reference_forward(episode.cache, self._tokens, True)[0]
            cache = cache_prefix(episode.cache, episode.cache.get_seq_length(), self.backbone.model.config)
            cache.batch_repeat_interleave(count)
            tiled = np.tile(candidates, (self.batch_size, 1))
            ranks = self.decisions.layer_ranks(tiled)
            self.attention.set_keep(self.decisions.layer_keeps(tiled))
            tokens = self._segment_tokens(t).repeat_interleave(count, dim=0)
            agent, _ = self._forward(cache, tokens, ranks, statistics=False, outputs=True)
        reference = reference.tokens((t - 1) * length, t * length).repeat_rows(count)
        cosine = attention_cosine_per_head(agent.attention, reference.attention)  # (B*K, layers, H)
        # KV head j serves query heads jG .. jG+G-1; a layer unit averages its KV heads.
        cosine = cosine.reshape(self.batch_size, count, g.num_layers, g.num_kv_heads, g.group_size).mean(-1)
        if self.decisions.per_layer:
            cosine = cosine.mean(-1)
        return cosine.reshape(self.batch_size, count, self.n_units).double().cpu().numpy()

    def close(self) -> None:
        # Free the KV caches, the reference, the reference cache and the graphs' memory; the shared model stays
        # loaded (drrl_gym.resources.free_shared_resources drops it).
        self.episode = self._graphs = None
        self._cache = PreallocatedCache(self.geometry.num_layers, self.config.seq_len)
        self.references = ReferenceCache(self.references.budget_bytes)

    # ------------------------------------------------------------------------------------------ internals
    def _segment_tokens(self, segment: int) -> torch.Tensor:
        length = self.config.segment_len
        return self._tokens[:, segment * length : (segment + 1) * length]

    def _run_device_step(
        self, segment: int, ranks: torch.Tensor
    ) -> tuple[torch.Tensor, StatsSummary, SegmentStats, torch.Tensor]:
        """:meth:`_device_step` at ``ranks``: a CUDA graph replay when it can, else eagerly. Returns (fidelity,
        summary, statistics, the (B, layers, kv_heads) ranks the forward executed)."""
        # Graphs and the compiled program run every layer at full width with the extra columns zeroed (one program
        # serves every rank choice): that is what they execute, whatever the ranks count.
        full_width = torch.full_like(ranks, self.geometry.head_dim)
        if self._graphs is not None or self._compiled:
            self.attention.set_static_ranks(ranks, self.backbone.device)
        with self.episode.cache.reserved(self.config.segment_len):  # the positions the step writes, in place
            if self._graphs is not None:
                result = self._graphs.run(segment)
                if result is not None:
                    return (*result, full_width)
                self._graphs = None  # capture failed (warned): without graphs from now on
            if self._compiled:
                return (*self._device_step(segment), full_width)
            self.attention.set_ranks(ranks)
            # Eagerly, a layer runs at the largest rank of its KV heads and rows (the others zero-masked).
            executed = ranks.amax(dim=(0, 2), keepdim=True).expand_as(ranks)
            return (*self._device_step(segment), executed)

    def _device_step(self, segment: int) -> tuple[torch.Tensor, StatsSummary, SegmentStats]:
        """All of a step that runs on the model's device, at the ranks already set: the agent's forward of
        ``segment`` with its statistics, each row's fidelity against the reference, and the observation's
        reductions. Returns ((B,) fidelity, summary, statistics). What the CUDA graphs capture."""
        length = self.config.segment_len
        tokens = self._segment_tokens(segment)
        reference = self.episode.reference.tokens((segment - 1) * length, segment * length)
        bound = None if self.episode.reference_bound is None else self.episode.reference_bound[:, segment - 1]
        if self._compiled:
            self.attention.cast_basis(self.backbone.dtype, self.backbone.device)  # (a reset may not have run one)
            self._mark_shapes(tokens, reference, bound)
        return self._segment_program(tokens, reference, bound)

    def _mark_shapes(self, tokens: torch.Tensor, reference: Captured, bound: torch.Tensor | None) -> None:
        """Which input axes the compiler may treat as symbolic. The KV cache's key axis: it grows a segment per step,
        so one compilation serves every segment. Not the batch axis: a second batch size in the process then gets
        code of its own, where torch's automatic dynamic shapes would recompile with a symbolic batch axis, whose
        code ran 16-38% slower on an H200 (docs/results.md)."""
        for keys, values in kv_tensors(self.episode.cache):
            for tensor in (keys, values):
                torch._dynamo.maybe_mark_dynamic(tensor, 2)
                torch._dynamo.mark_static(tensor, 0)
        whole = self.episode.reference  # (the compiler also sees the tensors the inputs are views of)
        bounds = () if bound is None else (self.episode.reference_bound, bound)
        for tensor in (self._tokens, tokens, whole.hidden, reference.hidden, *(whole.attention or []),
                       *(reference.attention or []), *bounds):
            torch._dynamo.mark_static(tensor, 0)

    def _segment_work(self, tokens: torch.Tensor, reference: Captured, bound: torch.Tensor | None
                      ) -> tuple[torch.Tensor, StatsSummary, SegmentStats]:
        """:meth:`_device_step` given the segment's tokens, its slice of the reference and, with
        bound_source="reference", the reference's bound table of the segment (the forward then records none): what
        ``compile=True`` compiles. Tensors in, not the segment's index, so that one compilation serves every segment
        (an index would be specialised on: a recompilation per segment, and past torch's recompile limit, eager
        code)."""
        own_bounds = {} if bound is None else {"bound_queries": 0}
        agent, recorded = self._forward(self.episode.cache, tokens, None, statistics=True,
                                        outputs=self.reward.needs_attention_outputs, **own_bounds)
        stats = recorded.stats() if bound is None else replace(recorded.stats(), selection_bound=bound)
        fidelity = self.reward.fidelity(agent, reference, self._lm_head)
        return fidelity, self.decisions.summarize(stats), stats

    def _forward(self, cache: Cache, tokens: torch.Tensor, ranks: torch.Tensor | int | None, statistics: bool,
                 outputs: bool, **options: Any) -> tuple[Captured, Recording]:
        """Run ``tokens`` (B, T) at ``ranks`` (an int, (B, layers, kv_heads), or None: as already set), appending
        to ``cache``; returns what the fidelity metrics compare and the recording (its statistics, if asked).
        ``options`` override the recording's options (``DecisionSpace.recording_options``).

        The LM head is skipped (base_model's last_hidden_state is the final normed hidden state); "kl" applies it
        to just the segment it compares (:meth:`_lm_head`). The attention is attached for this forward only, so
        batches sharing a model can take turns.
        """
        attention = self.attention
        if ranks is not None:
            attention.set_ranks(ranks)
        options = {**self.decisions.recording_options(statistics), **options}
        with attention.attached(self.backbone.model), attention.recording(statistics, outputs, **options) as recorded:
            hidden = self.backbone.model.base_model(tokens, **cache_argument(cache), use_cache=True).last_hidden_state
        return Captured(hidden, list(recorded.attention_outputs) if outputs else None), recorded

    def _reference_forward(self, cache: Cache, tokens: torch.Tensor, outputs: bool, bounds: bool = False
                           ) -> tuple[Captured, torch.Tensor | None]:
        """The full-rank reference of segments 1 .. n_segments-1 of ``tokens`` (the cache's rows, whole sequences),
        in one forward, and with ``bounds`` its bound table at the end of each of those segments (bound_source=
        "reference"; (B, n_segments - 1, layers, kv_heads, n_ranks, n_keeps)). It starts from the warm-up prefix
        both trajectories share, bit for bit: the first segment of the agent's cache, which the agent ran at full
        rank and never rewrites."""
        length = self.config.segment_len
        prefix = cache_prefix(cache, length, self.backbone.model.config)
        self.attention.set_keep(1.0)  # exact: every key kept (and, below, every rank)
        options = ({"selection_grid": self.decisions.selection_grid, "bound_queries": self.config.bound_queries,
                    "bound_segment_len": length} if bounds else {})
        captured, recorded = self._forward(prefix, tokens[:, length:], self.geometry.head_dim, statistics=False,
                                           outputs=outputs, **options)
        return captured, recorded.segment_bounds() if bounds else None

    def _episode_start(self, indices: np.ndarray
                       ) -> tuple[PreallocatedCache, SegmentStats, Captured, torch.Tensor | None]:
        """The warm-up cache (the batch's cache, restarted) and statistics, the reference of every row and (with
        bound_source="reference") its bound tables: from the reference cache where it holds the row's sequence, else
        computed (only for those rows) and stored."""
        held, slots = self.references.lookup(indices)
        missing = np.flatnonzero(~held)
        computed = None
        if len(missing):
            start = self._computed_start(torch.from_numpy(missing).to(self._tokens.device))
            computed = start.rows()
            self.references.store(indices[missing], computed, start.optional_stats())
        with record_function("drrl.reference_cache_gather"):
            rows = self.references.merged(held, slots, computed)
        start = EpisodeStart.from_rows(rows, self.geometry.num_layers, self.references.layout,
                                       self.reward.needs_attention_outputs)
        self._cache.start(start.kv)
        return self._cache, start.stats, start.reference, start.reference_bound

    def _computed_start(self, rows: torch.Tensor) -> EpisodeStart:
        """Warm-up segment and reference of the batch rows ``rows``."""
        tokens = self._tokens.index_select(0, rows)
        cache, length = DynamicCache(config=self.backbone.model.config), self.config.segment_len
        with record_function("drrl.warmup_forward"):
            self.attention.set_keep(1.0)
            _, recorded = self._forward(cache, tokens[:, :length], self.geometry.head_dim, statistics=True,
                                        outputs=False)
        with record_function("drrl.reference_forward"):
            reference, bound = self._reference_forward(cache, tokens, self.reward.needs_attention_outputs,
                                                       bounds=self._reference_bounds)
        return EpisodeStart(kv_tensors(cache), recorded.stats(), reference, bound)

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from final hidden states: the LM head ``model(...)`` applies, softcapping included."""
        model = self.backbone.model
        logits = model.get_output_embeddings()(hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


def compiled_step(step: Callable[..., _T]) -> Callable[..., _T]:
    """``step`` through torch.compile: the forward's norms, rotations, projections, masks, Grams and the fidelity's
    reductions fuse into a few kernels, the work eager PyTorch runs as hundreds of small ones per layer.

    :meth:`EpisodeBatch._device_step` marks the KV cache's key axis dynamic before each call, so the first segment
    compiles with a symbolic key count and every later segment (and episode) reuses that one compilation; the other
    shapes stay static, so each batch size compiles once (in any order, in one process). On CUDA the graphs
    (``drrl_gym.cuda_graphs``) capture the compiled kernels, so a replay runs no Python at all.
    """
    return torch.compile(step)


def _pinned_captured(graphs: SegmentGraphs, reference: Captured) -> Captured:
    """The reference at the fixed addresses the graphs read (the first episode's tensors)."""
    kept = graphs.pin("reference", [reference.hidden, *(reference.attention or [])])
    return Captured(kept[0], kept[1:] if reference.attention is not None else None)

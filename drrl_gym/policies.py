"""Rank policies: whatever decides the ranks of a segment, learned or not, behind one call.

    act(observation, allowed) -> requested
        observation (B, n_units, n_features) float32: the controller's view of the last segment
                    (``DecisionSpace.observe``; columns named by ``controller.feature_names``)
        allowed     (B, n_units, n_choices) bool: the safety mask
        requested   (B, n_units) int64 choice indices; the caller projects disallowed ones (``controller.project``)

The environment, the vector env and an exported model (``drrl_gym.export``) all build both arrays with the same
:class:`~drrl_gym.observation.DecisionSpace`, so every policy here runs in all three unchanged (for a single env:
:func:`act_in_env`). ``reset(batch_size)`` starts new sequences (stateful policies keep per-sequence state).
``config()`` returns the constructor arguments that :func:`policy_from_config` rebuilds a policy from, which is how
an export stores a rule-based policy.

The baselines of the paper's comparison, each a policy:

* :class:`FullRank`, :class:`UniformRank`: every unit at the largest choice, or at one fixed rank.
* :class:`StaticRanks`: a fixed choice per decision unit, e.g. the greedy per-layer allocation of ``drrl_gym.allocation``.
* :class:`NERThreshold`: per segment and unit, the smallest r with NER(r) >= tau for the queries *and* the keys of
  the last segment (the paper's spectral truncation rule; NER is defined in drrl_gym.spectra).
* :class:`StableRankPolicy`: the ALRT stable-rank controller (Adaptive Low-Rank Transformer report) on the
  stable rank of the last segment's queries and keys: target = safety x stable rank, EMA, change threshold,
  bounded step.
* :class:`RandomRanks`: uniform over the allowed choices.
* :class:`NetworkPolicy`: a learned actor (:class:`RankPolicyNetwork`), deterministic (argmax over allowed choices).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from drrl_gym.observation import DecisionSpace

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU}


@runtime_checkable
class RankPolicy(Protocol):
    """What the environment, the vector env and the dynamic-rank runtime call (see the module docstring)."""

    kind: ClassVar[str]
    needs_statistics: ClassVar[bool]  # False: the observation is ignored, so callers may skip recording statistics

    def reset(self, batch_size: int) -> None: ...

    def act(self, observation: np.ndarray, allowed: np.ndarray) -> np.ndarray: ...

    def config(self) -> dict[str, Any]: ...


def act_in_env(policy: RankPolicy, env: Any, observation: np.ndarray) -> np.ndarray:
    """The action of a single ``DRRL-Attention-v0`` env (flat observation, flat mask) from a batch-of-one call."""
    unwrapped = env.unwrapped
    allowed = unwrapped.action_masks().reshape(1, unwrapped.n_units, unwrapped.decisions.n_choices)
    return policy.act(observation.reshape(1, *unwrapped.unit_shape), allowed)[0]


def _choice_index(controller: DecisionSpace, rank: int, what: str) -> int:
    _require_rank_choices(controller, f"{what}={rank}")
    if rank not in controller.rank_choices:
        raise ValueError(f"{what}={rank} is not one of the rank choices {controller.rank_choices}. "
                         "Fix: pick one of them, or build the controller with rank_choices that include it.")
    return controller.rank_choices.index(rank)


def _require_rank_choices(controller: DecisionSpace, what: str) -> None:
    """Rank rules index choices by rank; in selection mode a choice is a (rank, keep) pair."""
    if controller.selection:
        raise ValueError(f"{what}: this rule picks ranks for low-rank scores; in selection mode a choice is a (rank, "
                         "keep) pair. Fix: use FullRank, RandomRanks or a learned policy there.")


def _columns(controller: DecisionSpace, stem: str) -> list[int]:
    _require_rank_choices(controller, type(controller).__name__)
    """Observation column indices of a per-choice feature (``stem@r`` for every r of the choices)."""
    return [controller.feature_names.index(f"{stem}@{r}") for r in controller.rank_choices]


# --------------------------------------------------------------------------------------------- static rules
class _Stateless:
    needs_statistics: ClassVar[bool] = False

    def __init__(self, controller: DecisionSpace) -> None:
        self.controller = controller

    def reset(self, batch_size: int) -> None:
        """Nothing to forget."""


class FullRank(_Stateless):
    """Every unit at the largest rank choice (full rank when it is head_dim): the unmodified model's attention."""

    kind = "full_rank"

    def act(self, observation: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        return np.full(observation.shape[:2], self.controller.n_choices - 1, dtype=np.int64)

    def config(self) -> dict[str, Any]:
        return {}


class UniformRank(_Stateless):
    """Every unit at ``rank`` (one of the controller's rank choices), every segment."""

    kind = "uniform_rank"

    def __init__(self, controller: DecisionSpace, rank: int) -> None:
        super().__init__(controller)
        self.rank, self._index = int(rank), _choice_index(controller, int(rank), "rank")

    def act(self, observation: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        return np.full(observation.shape[:2], self._index, dtype=np.int64)

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank}


class StaticRanks(_Stateless):
    """A fixed rank per unit, every segment: ``ranks`` has one rank choice per unit (a layer, or a (layer, KV
    head) pair, layer-major), e.g. ``drrl_gym.allocation``'s greedy allocation."""

    kind = "static_ranks"

    def __init__(self, controller: DecisionSpace, ranks: list[int]) -> None:
        super().__init__(controller)
        self.ranks = [int(r) for r in np.asarray(ranks).reshape(-1)]
        if len(self.ranks) != controller.n_units:
            raise ValueError(f"ranks has {len(self.ranks)} entries but the controller has {controller.n_units} units "
                             f"({controller.granularity} granularity). Fix: give one rank per unit.")
        self._indices = np.array([_choice_index(controller, r, "ranks entry") for r in self.ranks], dtype=np.int64)

    def act(self, observation: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self._indices, observation.shape[:2]).copy()

    def config(self) -> dict[str, Any]:
        return {"ranks": list(self.ranks)}


# ---------------------------------------------------------------------------------------- spectral rules
class NERThreshold(_Stateless):
    """Smallest rank r with NER(r) >= ``tau`` for both the queries and the keys of the last segment, per unit.

    NER(r) is the fraction of energy in the first r basis directions (observation columns ``query_ner@r`` and
    ``key_ner@r``; NER is defined in ``drrl_gym.spectra``). The largest choice when no choice reaches ``tau``.
    """

    kind = "ner_threshold"
    needs_statistics = True

    def __init__(self, controller: DecisionSpace, tau: float) -> None:
        super().__init__(controller)
        if not 0 < tau <= 1:
            raise ValueError(f"tau={tau!r} must lie in (0, 1]: NER is an energy fraction. Fix: e.g. tau=0.95.")
        self.tau = float(tau)
        self._query, self._key = _columns(controller, "query_ner"), _columns(controller, "key_ner")

    def act(self, observation: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        ner = np.minimum(observation[..., self._query], observation[..., self._key])  # (B, n_units, n_choices)
        reaches = ner >= self.tau
        return np.where(reaches.any(-1), reaches.argmax(-1), len(self.controller.rank_choices) - 1).astype(np.int64)

    def config(self) -> dict[str, Any]:
        return {"tau": self.tau}


class StableRankPolicy:
    """The ALRT stable-rank controller on attention activations, one per decision unit.

    Signal: the stable rank tr(G) / lambda_max(G) of the last segment's queries and of its keys (power iteration,
    ``drrl_gym.spectra.stable_rank``; observation columns ``query_stable_rank``/``key_stable_rank``, as fractions of
    d), the larger of the two, since the scores need both. Per decision and unit:

        target_t = safety * d * max(srank_q, srank_k)                      (safety factor, headroom)
        m_t      = ema * m_{t-1} + (1 - ema) * target_t,   m_0 = r_0 = d   (EMA smoothing, from the warm-up rank)
        if |m_t - r_{t-1}| >= change_threshold:                            (change threshold, in rank units)
            r_t = the smallest choice >= m_t, at most ``max_step`` choices away from r_{t-1}   (bounded step)

    Bidirectional, as in the report. Its bounded step (4 ranks per update) is in choice indices here, since ranks
    move on the controller's grid; r_{t-1} comes from the observation (``prev_rank_fraction``), so a projection by
    the mask is seen.
    """

    kind = "stable_rank"
    needs_statistics: ClassVar[bool] = True

    def __init__(self, controller: DecisionSpace, safety: float = 1.5, ema: float = 0.8, change_threshold: float = 2.0,
                 max_step: int = 1) -> None:
        _require_rank_choices(controller, "StableRankPolicy")
        checks = {"safety": (safety, safety > 0), "ema": (ema, 0 <= ema < 1),
                  "change_threshold": (change_threshold, change_threshold >= 0),
                  "max_step": (max_step, isinstance(max_step, (int, np.integer)) and max_step >= 1)}
        for name, (value, ok) in checks.items():
            if not ok:
                raise ValueError(f"{name}={value!r} is out of range (safety > 0, 0 <= ema < 1, change_threshold >= 0, "
                                 "integer max_step >= 1). Fix: the report's defaults are safety=1.5, ema=0.8, "
                                 "change_threshold=2.0.")
        self.controller = controller
        self.safety, self.ema, self.change_threshold, self.max_step = float(safety), float(ema), float(change_threshold), int(max_step)
        names = controller.feature_names
        self._signal = [names.index("query_stable_rank"), names.index("key_stable_rank")]
        self._previous = names.index("prev_rank_fraction")
        self._smoothed: np.ndarray | None = None

    def reset(self, batch_size: int) -> None:
        self._smoothed = np.full((batch_size, self.controller.n_units), float(self.controller.geometry.head_dim))

    def act(self, observation: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        if self._smoothed is None or self._smoothed.shape != observation.shape[:2]:
            raise RuntimeError("StableRankPolicy.act before reset(batch_size) for this batch. Fix: call reset() at "
                               "the start of every sequence (the runtime and run_episode do).")
        d, choices = self.controller.geometry.head_dim, self.controller.choices
        target = self.safety * d * observation[..., self._signal].max(-1)
        self._smoothed = self.ema * self._smoothed + (1 - self.ema) * target
        previous = np.rint(observation[..., self._previous] * d)
        current = np.abs(choices[None, None, :] - previous[..., None]).argmin(-1)  # r_{t-1} as a choice index
        wanted = np.minimum((choices[None, None, :] < self._smoothed[..., None]).sum(-1), len(choices) - 1)
        step = np.clip(wanted - current, -self.max_step, self.max_step)
        change = np.abs(self._smoothed - previous) >= self.change_threshold
        return np.where(change, current + step, current).astype(np.int64)

    def config(self) -> dict[str, Any]:
        return {"safety": self.safety, "ema": self.ema, "change_threshold": self.change_threshold,
                "max_step": self.max_step}


class RandomRanks:
    """Uniformly random allowed choice per unit and segment (``seed`` fixes the sequence of draws)."""

    kind = "random"
    needs_statistics: ClassVar[bool] = False

    def __init__(self, controller: DecisionSpace, seed: int = 0) -> None:
        self.controller, self.seed = controller, int(seed)
        self._rng = np.random.default_rng(self.seed)

    def reset(self, batch_size: int) -> None:
        """The draws continue across sequences (a fresh generator would repeat them)."""

    def act(self, observation: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        scores = self._rng.random(allowed.shape)
        return np.where(allowed, scores, -1.0).argmax(-1).astype(np.int64)

    def config(self) -> dict[str, Any]:
        return {"seed": self.seed}


# ------------------------------------------------------------------------------------------ learned policy
class TokenTransformer(nn.Module):
    """(B, n_units, n_features) observations -> (B, n_units * d_model) features.

    Each decision unit (a layer, or a (layer, KV head)) is embedded by a Linear, gets a learned embedding of its index (the
    observation's units have fixed roles), and a small pre-norm transformer encoder lets every unit attend to all
    others: a layer's best rank depends on what the other layers do, since truncation errors compound. The output is
    flattened, not pooled, so a MultiDiscrete head can address each unit.
    """

    def __init__(self, n_units: int, n_features: int, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                 dim_feedforward: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}. Fix: e.g. d_model=64, n_heads=4.")
        self.n_units, self.d_model = n_units, d_model
        self.embed = nn.Linear(n_features, d_model)
        self.position = nn.Parameter(torch.randn(n_units, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward, dropout, batch_first=True, norm_first=True)
        # Pre-norm layers leave the residual stream unnormalised: a final LayerNorm is part of the architecture.
        # Nested tensors only help with padding masks, which unit sets of fixed size never have.
        self.encoder = nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)

    @property
    def output_dim(self) -> int:
        return self.n_units * self.d_model

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(observation) + self.position).flatten(1)


def mlp(width: int, sizes: tuple[int, ...], activation: str) -> nn.Sequential:
    """Linear layers of the given sizes, each followed by the activation (empty sizes: the identity)."""
    layers: list[nn.Module] = []
    for size in sizes:
        layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
        width = size
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class PolicyArch:
    """Everything needed to rebuild a :class:`RankPolicyNetwork` (stored in ``drrl_config.json``)."""

    n_units: int
    n_features: int
    n_choices: int
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    dim_feedforward: int = 128
    pi_layers: tuple[int, ...] = (64, 64)
    activation: str = "tanh"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pi_layers", tuple(int(w) for w in self.pi_layers))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not exportable. Fix: use one of {tuple(ACTIVATIONS)}.")


class RankPolicyNetwork(nn.Module):
    """The actor of a rank policy: observation (B, n_units, n_features) -> logits (B, n_units, n_choices).

    Same layout as SB3's ActorCriticPolicy actor path (features extractor -> ``mlp_extractor.policy_net`` ->
    ``action_net``), so its weights copy over module by module.
    """

    def __init__(self, arch: PolicyArch) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = TokenTransformer(arch.n_units, arch.n_features, arch.d_model, arch.n_heads, arch.n_layers,
                                        arch.dim_feedforward)
        self.pi = mlp(self.encoder.output_dim, arch.pi_layers, arch.activation)
        width = arch.pi_layers[-1] if arch.pi_layers else self.encoder.output_dim
        self.action = nn.Linear(width, arch.n_units * arch.n_choices)

    def flat_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features (B, n_units * d_model) -> logits (B, n_units * n_choices), unit-major: the layout of a
        MultiDiscrete action's concatenated per-unit logits (RLlib's MultiCategorical, SB3's action_net)."""
        return self.action(self.pi(features))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.flat_logits(self.encoder(observation)).view(-1, self.arch.n_units, self.arch.n_choices)

    @torch.no_grad()
    def act(self, observation: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """Deterministic choice indices (B, n_units): argmax of the logits over the allowed choices."""
        logits = self.forward(torch.as_tensor(observation, dtype=torch.float32))
        logits = logits.masked_fill(~torch.as_tensor(allowed), -math.inf)
        return logits.argmax(-1).numpy()


class NetworkPolicy:
    """A learned actor as a :class:`RankPolicy`: argmax of its logits over the allowed choices."""

    kind = "network"
    needs_statistics: ClassVar[bool] = True

    def __init__(self, controller: DecisionSpace, network: RankPolicyNetwork) -> None:
        arch = network.arch
        expected = (controller.n_units, len(controller.feature_names), controller.n_choices)
        if (arch.n_units, arch.n_features, arch.n_choices) != expected:
            raise ValueError(f"the policy expects (n_units, n_features, n_choices)="
                             f"{(arch.n_units, arch.n_features, arch.n_choices)} but this model and controller give "
                             f"{expected}. Fix: use the environment settings (model, rank_choices, granularity) the policy "
                             "was trained on.")
        self.controller = controller
        self.network = network.cpu().eval().requires_grad_(False)  # tiny: stays on the CPU, where observations are

    def reset(self, batch_size: int) -> None:
        """Nothing to forget: the actor is feed-forward."""

    def act(self, observation: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        return self.network.act(observation, allowed)

    def config(self) -> dict[str, Any]:
        return {"arch": asdict(self.network.arch)}


RULE_POLICIES: dict[str, type] = {cls.kind: cls for cls in (FullRank, UniformRank, StaticRanks, NERThreshold,
                                                            StableRankPolicy, RandomRanks)}


def policy_from_config(controller: DecisionSpace, kind: str, params: dict[str, Any]) -> RankPolicy:
    """Rebuild a rule-based policy from ``kind`` and its ``config()`` (learned ones need their weights: export)."""
    if kind not in RULE_POLICIES:
        raise ValueError(f"unknown policy kind {kind!r}. Fix: use one of {tuple(RULE_POLICIES)} (or 'network' with weights).")
    try:
        return RULE_POLICIES[kind](controller, **params)
    except TypeError as error:
        raise ValueError(f"bad parameters {params!r} for policy {kind!r}: {error}. Fix: pass what its config() returned.") from error


def __getattr__(name: str) -> Any:  # PEP 562: the old name, for one release
    if name == "StableRankController":
        import warnings

        warnings.warn("drrl_gym.policies.StableRankController is now StableRankPolicy.", DeprecationWarning, stacklevel=2)
        return StableRankPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

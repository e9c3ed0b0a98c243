"""Fidelity metrics, FLOPs fractions and the reward of one environment step (pure functions, no state).

The reward of a step that runs segment t at ranks r (DR-RL's objective, with the safety term made explicit) is

    R_t = alpha * fidelity_t - beta * FLOPs_scores(r) / FLOPs_scores(full) - gamma * perturbation_t        (R)

* fidelity_t compares the agent's low-rank trajectory with the full-rank reference on the same segment; every
  metric lies in [-1, 1] (cosines) or (0, 1] (KL), and equals 1 (up to float rounding) when nothing was truncated.
* the cost is the QK^T ("scores") term that the rank acts on (``drrl_gym.flops``); the whole-attention fraction,
  including basis and statistics overhead, is reported beside it and never used in its place.
* perturbation_t is the normalised perturbation bound of the rank switch the agent made (``drrl_gym.observation``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from drrl_gym.backbone import AttentionGeometry
from drrl_gym.flops import layer_flops


# ------------------------------------------------------------------------------------------------ fidelity
def attention_cosine_per_head(agent: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cosine similarity of attention outputs per (token, query head) vector of width d, averaged over tokens.

    ``agent[l]`` and ``reference[l]`` are layer l's outputs before o_proj, (B, T, H, d); a reference with B = 1
    broadcasts against several agent rows. Returns (B, num_layers, H), float32.
    """
    a = torch.stack([o.float() for o in agent], dim=1)  # (B, layers, T, H, d)
    b = torch.stack([o.float() for o in reference], dim=1)
    return F.cosine_similarity(a, b, dim=-1).mean(dim=2)


def attention_cosine(agent: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """The paper's fidelity: mean cosine of attention outputs over layers, tokens and query heads."""
    return float(attention_cosine_per_head(agent, reference).mean())


def kl_fidelity(agent_logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """exp(-mean over tokens of KL(p_full || p_lowrank)) of next-token distributions, in (0, 1].

    The exponential maps "no change" to 1 and a KL of 1 nat per token to 1/e, on the same scale as the cosines.
    """
    log_p = F.log_softmax(reference_logits.float(), dim=-1)
    log_q = F.log_softmax(agent_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)  # clamp: rounding can make a zero KL slightly negative
    return float(torch.exp(-kl.mean()))


def hidden_cosine(agent_hidden: torch.Tensor, reference_hidden: torch.Tensor) -> float:
    """Mean over tokens of the cosine similarity of the final hidden states, (B, T, D) each."""
    return float(F.cosine_similarity(agent_hidden.float(), reference_hidden.float(), dim=-1).mean())


# What each metric compares: attention outputs per layer, next-token logits, final hidden states.
FIDELITY: dict[str, Callable[[Any, Any], float]] = {
    "attention_cosine": attention_cosine,
    "kl": kl_fidelity,
    "hidden_cosine": hidden_cosine,
}
FIDELITY_METRICS = tuple(FIDELITY)


# --------------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class FlopsFractions:
    """FLOPs at the chosen ranks relative to the unmodified model, for one segment over all layers."""

    scores: float  # QK^T term only: the cost in (R)
    attention: float  # whole attention incl. basis projections and the statistics the observation needs

    @property
    def saved_scores(self) -> float:
        return 1.0 - self.scores

    @property
    def saved_attention(self) -> float:
        """Can be negative: at full rank the statistics overhead is pure cost."""
        return 1.0 - self.attention


def flops_fractions(
    geometry: AttentionGeometry, ranks: np.ndarray, new_tokens: int, keys: int, basis_mode: str = "calibrated"
) -> FlopsFractions:
    """Fractions for ``ranks`` of shape (num_layers, num_kv_heads), a segment of ``new_tokens`` seeing ``keys`` keys.

    The statistics (Grams) are always counted: the environment records them every step to build the observation,
    so a deployed policy pays for them too.
    """
    chosen = [layer_flops(geometry, new_tokens, keys, [int(r) for r in row], True, basis_mode) for row in ranks]
    baseline = layer_flops(geometry, new_tokens, keys, None)
    layers = len(chosen)
    return FlopsFractions(
        scores=sum(f.scores for f in chosen) / (layers * baseline.scores),
        attention=sum(f.total for f in chosen) / (layers * baseline.total),
    )


# -------------------------------------------------------------------------------------------------- reward
@dataclass(frozen=True)
class RewardWeights:
    """alpha, beta, gamma of (R)."""

    alpha: float
    beta: float
    gamma: float

    def __call__(self, fidelity: float, flops_cost: float, perturbation: float) -> float:
        return self.alpha * fidelity - self.beta * flops_cost - self.gamma * perturbation

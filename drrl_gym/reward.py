"""Fidelity metrics, FLOPs fractions and the reward of one environment step (pure functions, no state).

The reward of a step that runs segment t at ranks r (DR-RL's objective, with the safety term made explicit) is

    R_t = alpha * fidelity_t - beta * FLOPs_scores(r) / FLOPs_scores(full) - gamma * perturbation_t        (R)

* fidelity_t compares the agent's low-rank trajectory with the full-rank reference on the same segment; every
  metric lies in [-1, 1] (cosines) or (0, 1] (KL), and equals 1 (up to float rounding) when nothing was truncated.
* the cost is the QK^T ("scores") term that the rank acts on (``drrl_gym.flops``); the whole-attention fraction,
  including basis and statistics overhead, is reported beside it and never used in its place.
* perturbation_t is the normalised perturbation bound of the rank switch the agent made (``drrl_gym.observation``).

Everything here is per batch row: a row is one episode (the env is a batch of one, the vector env a batch of N),
so fidelities, FLOPs fractions and rewards come back as one value per row, never averaged across episodes.
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
    # Layer by layer: a layer's float32 temporaries (~19 MB each for 64 x 128 tokens of SmolLM2) can stay in the
    # GPU's L2 cache, where stacking all layers first materialised two 566 MB float32 copies per step.
    pairs = zip(agent, reference, strict=True)
    per_layer = [F.cosine_similarity(a.float(), b.float(), dim=-1).mean(dim=1) for a, b in pairs]
    return torch.stack(per_layer, dim=1)


def attention_cosine(agent: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> torch.Tensor:
    """The paper's fidelity, per row: mean cosine of attention outputs over layers, tokens and query heads, (B,)."""
    return attention_cosine_per_head(agent, reference).mean(dim=(1, 2))


def kl_fidelity(agent_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Per row, exp(-mean over tokens of KL(p_full || p_lowrank)) of next-token distributions, in (0, 1]: (B,).

    The exponential maps "no change" to 1 and a KL of 1 nat per token to 1/e, on the same scale as the cosines.
    """
    log_p = F.log_softmax(reference_logits.float(), dim=-1)
    log_q = F.log_softmax(agent_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)  # clamp: rounding can make a zero KL slightly negative
    return torch.exp(-kl.mean(dim=-1))


def hidden_cosine(agent_hidden: torch.Tensor, reference_hidden: torch.Tensor) -> torch.Tensor:
    """Per row, mean over tokens of the cosine similarity of the final hidden states, (B, T, D) each -> (B,)."""
    return F.cosine_similarity(agent_hidden.float(), reference_hidden.float(), dim=-1).mean(dim=-1)


# Every metric returns one value per batch row (B,): each row is its own episode, with its own reward. What each
# compares: attention outputs per layer, next-token logits, final hidden states.
FIDELITY: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "attention_cosine": attention_cosine,
    "kl": kl_fidelity,
    "hidden_cosine": hidden_cosine,
}
FIDELITY_METRICS = tuple(FIDELITY)


# --------------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class FlopsFractions:
    """FLOPs at the chosen ranks relative to the unmodified model, for one segment over all layers, per row."""

    scores: np.ndarray  # QK^T term only: the cost in (R)
    attention: np.ndarray  # whole attention incl. basis projections and the statistics the observation needs

    @property
    def saved_scores(self) -> np.ndarray:
        return 1.0 - self.scores

    @property
    def saved_attention(self) -> np.ndarray:
        """Can be negative: at full rank the statistics overhead is pure cost."""
        return 1.0 - self.attention


def flops_fractions(
    geometry: AttentionGeometry, ranks: np.ndarray, new_tokens: int, keys: int, basis_mode: str = "calibrated"
) -> FlopsFractions:
    """Fractions for ``ranks`` of shape (..., num_layers, num_kv_heads), a segment of ``new_tokens`` seeing ``keys``
    keys: arrays of shape (...), one value per row.

    Each row is accounted on its own ranks, also when a batch runs rows of different ranks through one forward
    (``DynamicRankAttention`` then zero-masks q's extra columns: the FLOPs a row would cost run alone, which is what
    a deployed model pays). The statistics (Grams) are always counted: the environment records them every step to
    build the observation, so a deployed policy pays for them too.
    """
    ranks = np.asarray(ranks)
    # A layer's FLOPs depend only on its tuple of KV-head ranks, and a batch holds few distinct tuples
    # (len(rank_choices) ** num_kv_heads at most): count each once, then gather.
    configs, inverse = np.unique(ranks.reshape(-1, ranks.shape[-1]), axis=0, return_inverse=True)
    per_config = [layer_flops(geometry, new_tokens, keys, [int(r) for r in row], True, basis_mode) for row in configs]
    # float64 holds these integer counts exactly (they stay far below 2**53), so the sums below are exact too.
    scores = np.array([f.scores for f in per_config], dtype=np.float64)[inverse.reshape(-1)]
    total = np.array([f.total for f in per_config], dtype=np.float64)[inverse.reshape(-1)]
    baseline, layers = layer_flops(geometry, new_tokens, keys, None), ranks.shape[-2]
    return FlopsFractions(
        scores=scores.reshape(ranks.shape[:-1]).sum(-1) / (layers * baseline.scores),
        attention=total.reshape(ranks.shape[:-1]).sum(-1) / (layers * baseline.total),
    )


# -------------------------------------------------------------------------------------------------- reward
@dataclass(frozen=True)
class RewardWeights:
    """alpha, beta, gamma of (R)."""

    alpha: float
    beta: float
    gamma: float

    def __call__(self, fidelity: np.ndarray, flops_cost: np.ndarray, perturbation: np.ndarray) -> np.ndarray:
        """(R) elementwise: per row for arrays, a float for floats."""
        return self.alpha * fidelity - self.beta * flops_cost - self.gamma * perturbation

"""The reward of one environment step, as one named object: what it needs recorded, and its components.

The reward of a step that runs segment t at ranks r (DR-RL's objective, with the safety term made explicit) is

    R_t = w_f * fidelity_t - w_c * FLOPs_scores(r) / FLOPs_scores(full) - w_p * perturbation_t        (R)

(``fidelity_weight``, ``cost_weight``, ``perturbation_weight``; DR-RL writes them alpha, beta, gamma).

* fidelity_t compares the agent's low-rank trajectory with the full-rank reference on the same segment, by a
  :class:`FidelityMetric`; every metric lies in [-1, 1] (cosines) or (0, 1] (KL), and equals 1 (up to float
  rounding) when nothing was truncated. A metric says whether it needs the attention outputs recorded.
* :class:`KLBudget` (``reward="kl_budget"``) is the alternative whose returns separate policies: KL in nats from
  full attention, and a hinge on cost above a budget, (K) below.
* the cost is the QK^T ("scores") term that the rank acts on, counted at the chosen ranks
  (``drrl_gym.flops.flops_fractions``); the whole-attention fraction and the executed fraction are reported beside
  it in the step's info, never used in its place.
* perturbation_t is the normalised perturbation bound of the rank switch the agent made (``drrl_gym.observation``).

Everything here is per batch row: a row is one episode (the env is a batch of one, the vector env a batch of N),
so fidelities and rewards come back as one value per row, never averaged across episodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Captured:
    """What a forward pass keeps for the fidelity metrics, for B rows and T tokens."""

    hidden: torch.Tensor  # (B, T, hidden_size): final (normed) hidden states, what "hidden_cosine" and "kl" use
    attention: list[torch.Tensor] | None  # per layer (B, T, H, d): attention outputs before o_proj, if recorded

    def tokens(self, start: int, stop: int) -> Captured:
        """Tokens [start, stop) of every row (views, no copy)."""
        cut = (slice(None), slice(start, stop))
        return Captured(self.hidden[cut], None if self.attention is None else [o[cut] for o in self.attention])

    def repeat_rows(self, count: int) -> Captured:
        """Each row ``count`` times in a row (row b becomes rows b*count .. b*count+count-1)."""
        def repeat(x: torch.Tensor) -> torch.Tensor:
            return x.repeat_interleave(count, dim=0)

        return Captured(repeat(self.hidden), None if self.attention is None else [repeat(o) for o in self.attention])


LMHead = Callable[[torch.Tensor], torch.Tensor]  # final hidden states -> next-token logits


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


def next_token_kl(agent_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Per row, the mean over tokens of KL(p_full || p_approx) of next-token distributions, in nats: (B,)."""
    log_p = F.log_softmax(reference_logits.float(), dim=-1)
    log_q = F.log_softmax(agent_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)  # clamp: rounding can make a zero KL slightly negative
    return kl.mean(dim=-1)


def kl_fidelity(agent_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Per row, exp(-mean over tokens of KL(p_full || p_lowrank)) of next-token distributions, in (0, 1]: (B,).

    The exponential maps "no change" to 1 and a KL of 1 nat per token to 1/e, on the same scale as the cosines.
    """
    return torch.exp(-next_token_kl(agent_logits, reference_logits))


def hidden_cosine(agent_hidden: torch.Tensor, reference_hidden: torch.Tensor) -> torch.Tensor:
    """Per row, mean over tokens of the cosine similarity of the final hidden states, (B, T, D) each -> (B,)."""
    return F.cosine_similarity(agent_hidden.float(), reference_hidden.float(), dim=-1).mean(dim=-1)


class FidelityMetric(Protocol):
    """Compares the agent's segment with the reference's, one value per row (B,)."""

    name: ClassVar[str]
    needs_attention_outputs: ClassVar[bool]

    def __call__(self, agent: Captured, reference: Captured, lm_head: LMHead) -> torch.Tensor: ...


class AttentionCosine:
    """The paper's fidelity: cosine of attention outputs per layer, token and query head, averaged."""

    name, needs_attention_outputs = "attention_cosine", True

    def __call__(self, agent: Captured, reference: Captured, lm_head: LMHead) -> torch.Tensor:
        return attention_cosine(agent.attention, reference.attention)


class NextTokenKL:
    """exp(-mean KL(p_full || p_lowrank)) of the next-token distributions, in (0, 1]."""

    name, needs_attention_outputs = "kl", False

    def __call__(self, agent: Captured, reference: Captured, lm_head: LMHead) -> torch.Tensor:
        return kl_fidelity(lm_head(agent.hidden), lm_head(reference.hidden))


class HiddenCosine:
    """Cosine of the final hidden states per token, averaged."""

    name, needs_attention_outputs = "hidden_cosine", False

    def __call__(self, agent: Captured, reference: Captured, lm_head: LMHead) -> torch.Tensor:
        return hidden_cosine(agent.hidden, reference.hidden)


FIDELITY_METRICS: dict[str, FidelityMetric] = {m.name: m for m in (AttentionCosine(), NextTokenKL(), HiddenCosine())}


class NextTokenKLNats:
    """Mean KL(p_full || p_approx) of the next-token distributions, in nats (0 when nothing changed): what
    :class:`KLBudget` charges. Not a fidelity in [0, 1], so not among ``FIDELITY_METRICS``."""

    name, needs_attention_outputs = "kl_nats", False

    def __call__(self, agent: Captured, reference: Captured, lm_head: LMHead) -> torch.Tensor:
        return next_token_kl(lm_head(agent.hidden), lm_head(reference.hidden))


# -------------------------------------------------------------------------------------------------- reward
@dataclass(frozen=True)
class FidelityMinusCost:
    """Reward (R): ``components(...)`` returns every term and the reward, per row, for the step's info."""

    fidelity: FidelityMetric
    fidelity_weight: float
    cost_weight: float
    perturbation_weight: float
    name: ClassVar[str] = "fidelity_minus_cost"

    @property
    def needs_attention_outputs(self) -> bool:
        return self.fidelity.needs_attention_outputs

    def components(self, fidelity: np.ndarray, flops_cost: np.ndarray, perturbation: np.ndarray) -> dict[str, np.ndarray]:
        """(R) elementwise, with its terms: ``fidelity``, ``flops_cost``, ``perturbation`` and ``reward``."""
        reward = self.fidelity_weight * fidelity - self.cost_weight * flops_cost - self.perturbation_weight * perturbation
        return {"fidelity": fidelity, "flops_cost": flops_cost, "perturbation": perturbation, "reward": reward}


@dataclass(frozen=True)
class KLBudget:
    """A reward whose returns separate policies: KL from full attention, plus a penalty for cost above a budget,

        R_t = -KL_t - budget_penalty * max(0, flops_cost_t - cost_budget)                                     (K)

    KL_t is the mean KL(p_full || p_agent) of the segment's next-token distributions in nats: a direct measure of
    what the approximation does to the model's predictions (0.01 nats per token is about +1% perplexity at most),
    unbounded where (R)'s cosines saturate near 1. The hinge makes ``cost_budget`` a soft constraint: below it cost is
    free, above it each unit of cost fraction costs ``budget_penalty`` nats. Full attention pays only the hinge; a
    policy that meets the budget pays only its KL. ``fidelity`` in the components is exp(-KL_t), on (R)'s scale.
    """

    cost_budget: float
    budget_penalty: float
    fidelity: ClassVar[NextTokenKLNats] = NextTokenKLNats()
    name: ClassVar[str] = "kl_budget"
    needs_attention_outputs: ClassVar[bool] = False

    def components(self, kl: np.ndarray, flops_cost: np.ndarray, perturbation: np.ndarray) -> dict[str, np.ndarray]:
        """(K) elementwise, with its terms, the perturbation bound (reported, not charged) and exp(-KL)."""
        over = np.maximum(0.0, flops_cost - self.cost_budget)
        reward = -kl - self.budget_penalty * over
        return {"fidelity": np.exp(-kl), "kl": kl, "flops_cost": flops_cost, "over_budget": over,
                "perturbation": perturbation, "reward": reward}


REWARDS = (FidelityMinusCost.name, KLBudget.name)

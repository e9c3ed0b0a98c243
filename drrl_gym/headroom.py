"""How much could any per-segment rank policy gain over the best static one? The pieces of that measurement.

A *plan* gives every (sequence, segment, decision unit) one choice of a :class:`ChoiceSet` (a rank for low-rank
scores, a (rank, keep) setting for selection, the last choice always exact attention). Units are contiguous groups
of layers (all layers of a unit share its choice). Segment 0 runs exact (the environment's warm-up); the others run
the plan. Everything is measured by running the model (:func:`segment_nll`), never summed from estimates, except
where a search needs a guide:

* :func:`greedy_static_path`: the static allocation (one choice per unit for every segment and sequence), lowered
  one unit by one choice at a time from exact attention, each step the candidate with the smallest measured
  (loss increase) / (cost saved), where the loss is the mean next-token NLL of the sequences it is judged on;
* :func:`first_order_gains`: per segment, the NLL change of that segment when one unit alone changes its choice
  from the static plan in that segment only (every earlier segment at the static plan, through its KV cache);
* :func:`segment_allocation`: for one segment, the choices that minimise the summed first-order changes within a
  cost budget, greedily by change per cost saved from exact attention downwards (the hindsight oracle's search);
* :func:`per_segment_plan`: that search in every segment, from the segment's own changes (the hindsight oracle) or
  from :func:`predicted_changes`, what a policy that sees only the past could know of them (the last segment's
  changes, or the mean of all decided ones): how far need persists from one segment to the next.

Cost: the environment's ``flops_cost`` of a segment (``drrl_gym.flops``: QK^T for low-rank scores; scoring,
choosing and exact scores over the kept keys for selection, as a deployed kernel executes them), relative to full
attention and averaged over layers; a plan's cost is the mean over its decision segments, as the environment's
returns average its steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from drrl_gym.backbone import AttentionGeometry, Backbone
from drrl_gym.flops import flops_fractions, selection_fractions
from drrl_gym.hf_compat import cache_argument
from drrl_gym.lowrank import APPROXIMATIONS, DynamicRankAttention
from drrl_gym.perplexity import predicted_targets


@dataclass(frozen=True)
class ChoiceSet:
    """The choices of one attention mode, cheapest first, exact attention last. Validated at construction."""

    approximation: str  # "lowrank_scores" or "select"
    settings: tuple[tuple[int, float], ...]  # (rank, keep) per choice; keep is 1 for low-rank scores
    head_dim: int

    def __post_init__(self) -> None:
        if self.approximation not in APPROXIMATIONS:
            raise ValueError(f"approximation={self.approximation!r}: unknown. Fix: choose one of {APPROXIMATIONS}.")
        if not self.settings or self.settings[-1] != (self.head_dim, 1.0):
            raise ValueError(f"settings {self.settings} must end with exact attention ({self.head_dim}, 1.0). Fix: "
                             "append it.")
        bad = [s for s in self.settings if not (1 <= s[0] <= self.head_dim and 0 < s[1] <= 1)]
        if bad or (self.approximation == "lowrank_scores" and any(k != 1.0 for _, k in self.settings)):
            raise ValueError(f"settings {self.settings}: ranks must lie in [1, {self.head_dim}], keeps in (0, 1], and "
                             "low-rank scores keep every key. Fix: pass valid (rank, keep) pairs.")

    def __len__(self) -> int:
        return len(self.settings)

    def layer_costs(self, geometry: AttentionGeometry, segment_len: int, n_segments: int) -> np.ndarray:
        """(n_segments, n_choices): one layer's ``flops_cost`` at each choice in each segment (segment s sees
        (s + 1) * segment_len keys), relative to full attention. Exact attention costs 1."""
        ranks = np.array([r for r, _ in self.settings])[:, None, None].repeat(geometry.num_kv_heads, 2)
        keeps = np.array([k for _, k in self.settings])[:, None, None].repeat(geometry.num_kv_heads, 2)
        rows = []
        for s in range(n_segments):
            keys = (s + 1) * segment_len
            if self.approximation == "select":
                rows.append(selection_fractions(geometry, ranks, keeps, segment_len, keys).scores)
            else:
                rows.append(flops_fractions(geometry, ranks, segment_len, keys).scores)
        return np.asarray(rows)


def layer_groups(num_layers: int, n_groups: int) -> np.ndarray:
    """(num_layers,) unit of every layer: ``n_groups`` contiguous groups of (nearly) equal size."""
    if not 1 <= n_groups <= num_layers:
        raise ValueError(f"n_groups={n_groups} must lie in [1, num_layers={num_layers}]. Fix: pick one in that range.")
    return np.concatenate([np.full(len(part), u) for u, part in enumerate(np.array_split(np.arange(num_layers),
                                                                                        n_groups))])


def unit_costs(layer_cost: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(n_segments, n_units, n_choices): what a unit adds to a segment's cost (mean over layers) at each choice."""
    weights = np.bincount(groups) / len(groups)
    return layer_cost[:, None, :] * weights[None, :, None]


def plan_cost(plan: np.ndarray, unit_cost: np.ndarray) -> np.ndarray:
    """(n_rows,) cost of plans (n_rows, n_segments, n_units): mean over decision segments (1 ..) of the summed
    unit costs."""
    segments, units = np.arange(plan.shape[1])[:, None], np.arange(plan.shape[2])[None, :]
    per_segment = unit_cost[segments, units, plan].sum(-1)  # (n_rows, n_segments)
    return per_segment[:, 1:].mean(-1)


# ------------------------------------------------------------------------------------------------ running
@torch.inference_mode()
def segment_nll(backbone: Backbone, attention: DynamicRankAttention, choices: ChoiceSet, groups: np.ndarray,
                tokens: torch.Tensor, plan: np.ndarray, segment_len: int, max_rows: int = 64) -> np.ndarray:
    """Summed next-token NLL per (row, segment), float64 (n_rows, n_segments): row i runs ``tokens[i]`` (L,) under
    ``plan[i]`` (n_segments, n_units), segment by segment through one KV cache, segment 0 exact."""
    out = [_plan_rows(backbone, attention, choices, groups, tokens[start:start + max_rows],
                      plan[start:start + max_rows], segment_len) for start in range(0, len(tokens), max_rows)]
    return np.concatenate(out)


def _plan_rows(backbone, attention, choices, groups, tokens, plan, segment_len) -> np.ndarray:
    tokens = tokens.to(backbone.device)
    cache, nll = DynamicCache(config=backbone.model.config), []
    with attention.attached(backbone.model):
        for s in range(plan.shape[1]):
            _set_plan(attention, choices, groups, plan[:, s] if s else np.full_like(plan[:, 0], len(choices) - 1))
            nll.append(_run_segment(backbone, cache, tokens, s, segment_len))
    return np.stack(nll, 1)


def _set_plan(attention: DynamicRankAttention, choices: ChoiceSet, groups: np.ndarray, units: np.ndarray) -> None:
    """Set (n_rows, n_units) choice indices as per-row, per-layer ranks and keeps (every KV head alike)."""
    kv_heads = attention.geometry.num_kv_heads
    per_layer = units[:, groups]  # (n_rows, num_layers)
    ranks = np.array([r for r, _ in choices.settings])[per_layer]
    keeps = np.array([k for _, k in choices.settings])[per_layer]
    attention.set_ranks(torch.from_numpy(ranks)[..., None].expand(-1, -1, kv_heads).clone())
    attention.set_keep(torch.from_numpy(keeps)[..., None].expand(-1, -1, kv_heads).clone())


def _run_segment(backbone: Backbone, cache: DynamicCache, tokens: torch.Tensor, segment: int,
                 segment_len: int) -> np.ndarray:
    """Run segment ``segment`` of ``tokens`` (n_rows, L) at the ranks set, appending to ``cache``; summed NLL of
    the next tokens it predicts, per row (the sequence's last token has none)."""
    start = segment * segment_len
    hidden = backbone.model.base_model(tokens[:, start:start + segment_len], **cache_argument(cache),
                                       use_cache=True).last_hidden_state
    logits, targets = predicted_targets(backbone.model.get_output_embeddings()(hidden), tokens, start)
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    return nll.double().sum(1).cpu().numpy()


# ------------------------------------------------------------------------------------------------- static
@dataclass(frozen=True)
class StaticStep:
    """One point of the greedy static path: a choice per unit, its cost, and what was measured at it."""

    units: tuple[int, ...]
    cost: float
    nll: np.ndarray  # (n_sequences, n_segments) summed NLL


def greedy_static_path(evaluate: Callable[[np.ndarray], np.ndarray], unit_cost: np.ndarray, n_segments: int,
                       min_cost: float) -> list[StaticStep]:
    """Greedy static allocation from exact attention down to cost <= ``min_cost`` (or every unit at choice 0).

    ``evaluate(plans)`` measures static plans (C, n_units) and returns their (C, n_sequences, n_segments) summed
    NLL. Each step lowers one unit by one choice, taking the candidate with the smallest measured
    (loss - current loss) / (current cost - its cost): ``drrl_gym.allocation``'s rule, over any choice set.
    """
    n_units, top = unit_cost.shape[1], unit_cost.shape[2] - 1
    current = np.full(n_units, top)

    def costs(units: np.ndarray) -> np.ndarray:  # (C, n_units) -> (C,)
        return plan_cost(np.repeat(units[:, None, :], n_segments, 1), unit_cost)

    path = [StaticStep(tuple(current), float(costs(current[None])[0]), evaluate(current[None])[0])]
    while path[-1].cost > min_cost and (current > 0).any():
        movable = np.flatnonzero(current > 0)
        candidates = np.repeat(current[None], len(movable), 0)
        candidates[np.arange(len(movable)), movable] -= 1
        nll, cost = evaluate(candidates), costs(candidates)
        gain = (nll.sum((1, 2)) - path[-1].nll.sum()) / np.maximum(path[-1].cost - cost, 1e-12)
        best = int(np.argmin(gain))
        current = candidates[best]
        path.append(StaticStep(tuple(current), float(cost[best]), nll[best]))
    return path


def at_budget(path: list[StaticStep], budget: float) -> StaticStep | None:
    """The first (least compressed) step of the path with cost <= ``budget``; None if the path never gets there."""
    return next((step for step in path if step.cost <= budget + 1e-12), None)


# ------------------------------------------------------------------------------------------------- oracle
@torch.inference_mode()
def first_order_gains(backbone: Backbone, attention: DynamicRankAttention, choices: ChoiceSet, groups: np.ndarray,
                      tokens: torch.Tensor, static: np.ndarray, segment_len: int,
                      max_rows: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """NLL changes of each segment when one unit changes its choice there alone, from the static plan.

    ``static``: (n_units,) choices. Returns (delta, static_nll): delta (n_sequences, n_segments, n_units,
    n_choices) is segment s's summed NLL with unit u at choice c in segment s only (every earlier segment at the
    static plan) minus its NLL at the static plan (0 where c is the static choice, and for segment 0);
    static_nll (n_sequences, n_segments).
    """
    n, n_units, n_choices = len(tokens), len(static), len(choices)
    n_segments = tokens.shape[1] // segment_len
    pairs = [(u, c) for u in range(n_units) for c in range(n_choices) if c != static[u]]
    delta = np.zeros((n, n_segments, n_units, n_choices))
    tokens = tokens.to(backbone.device)
    cache, static_nll = DynamicCache(config=backbone.model.config), []
    per_chunk = max(1, max_rows // n)
    with attention.attached(backbone.model):
        for s in range(n_segments):
            if s:  # branch: every (u, c) pair runs segment s from a copy of the static cache
                for start in range(0, len(pairs), per_chunk):
                    chunk = pairs[start:start + per_chunk]
                    plans = np.repeat(static[None], len(chunk), 0)
                    plans[np.arange(len(chunk)), [u for u, _ in chunk]] = [c for _, c in chunk]
                    branch = copy.deepcopy(cache)
                    branch.batch_repeat_interleave(len(chunk))  # row i * len(chunk) + j: sequence i, pair j
                    _set_plan(attention, choices, groups, np.tile(plans, (n, 1)))
                    nll = _run_segment(backbone, branch, tokens.repeat_interleave(len(chunk), 0), s, segment_len)
                    for j, (u, c) in enumerate(chunk):
                        delta[:, s, u, c] = nll.reshape(n, len(chunk))[:, j]
            _set_plan(attention, choices, groups, np.repeat((static if s else np.full_like(static, n_choices - 1))
                                                            [None], n, 0))
            static_nll.append(_run_segment(backbone, cache, tokens, s, segment_len))
    static_nll = np.stack(static_nll, 1)
    changed = np.ones((n_units, n_choices), bool)
    changed[np.arange(n_units), static] = False
    delta[:, 1:] = np.where(changed, delta[:, 1:] - static_nll[:, 1:, None, None], 0.0)
    return delta, static_nll


def segment_allocation(delta: np.ndarray, cost: np.ndarray, budget: float, static: np.ndarray) -> np.ndarray:
    """One segment's hindsight choices (n_units,) from first-order NLL changes ``delta`` (n_units, n_choices) and
    unit costs ``cost`` (n_units, n_choices), within ``budget``.

    From exact attention, repeatedly move the unit whose move to a cheaper choice adds the least NLL per cost saved
    (a negative change is a gain), until the summed cost is <= budget (or every unit is at its cheapest choice).
    Where the static choices fit the budget and the first-order sum of the result is not below theirs (0 by
    definition), the static choices are returned: the estimate gives no reason to leave them.
    """
    n_units, n_choices = delta.shape
    units = np.arange(n_units)
    current = np.full(n_units, n_choices - 1)
    while cost[units, current].sum() > budget + 1e-12:
        saved = cost[units, current][:, None] - cost  # (n_units, n_choices)
        added = delta - delta[units, current][:, None]
        ratio = np.where(saved > 1e-15, added / np.where(saved > 1e-15, saved, 1.0), np.inf)
        if not np.isfinite(ratio).any():
            break
        u, c = np.unravel_index(int(np.argmin(ratio)), ratio.shape)
        current[u] = c
    if cost[units, static].sum() > budget + 1e-12:  # the static plan is not an option
        return current
    return current if delta[units, current].sum() < 0 else static.copy()


CAUSAL_RULES = ("previous", "past_mean", "fitted")


def predicted_changes(delta: np.ndarray, rule: str) -> np.ndarray:
    """What a policy that sees only the past knows of each segment's first-order changes when it decides it.

    ``delta`` (n_sequences, n_segments, n_units, n_choices) from :func:`first_order_gains`. ``rule``:
    ``"previous"``: segment s gets segment s-1's changes (the exact need of the last segment);
    ``"past_mean"``: the mean over the decided segments 1..s-1 (an online per-sequence estimate of need);
    ``"fitted"``: the best linear weighing of those two, b0 + b1 previous + b2 past mean per (unit, choice), fitted
    by least squares on the OTHER sequences' segments 2.. (leave one sequence out: what a policy trained on other
    text could learn from the history of exact needs). Needs at least 2 sequences.
    Segment 1 has no decided segment before it: its prediction is 0, so it keeps the static choices (every rule).
    """
    if rule not in CAUSAL_RULES:
        raise ValueError(f"rule must be one of {CAUSAL_RULES}, got {rule!r}")
    if rule == "previous":
        predicted = np.zeros_like(delta)
        predicted[:, 1:] = delta[:, :-1]
        return predicted
    past_mean = np.zeros_like(delta)
    past_mean[:, 2:] = np.cumsum(delta[:, 1:-1], axis=1) / np.arange(1, delta.shape[1] - 1)[None, :, None, None]
    if rule == "past_mean":
        return past_mean  # segment s: mean of segments 1..s-1
    return _leave_one_out_fit(delta, past_mean)


def _leave_one_out_fit(delta: np.ndarray, past_mean: np.ndarray) -> np.ndarray:
    """The ``"fitted"`` rule of :func:`predicted_changes`: per held-out sequence and (unit, choice), least squares
    of delta[s] on (1, delta[s-1], past_mean[s]) over the other sequences' segments s >= 2."""
    n, n_segments = delta.shape[:2]
    if n < 2:
        raise ValueError(f"the fitted rule needs at least 2 sequences (one to predict, others to fit on), got {n}. "
                         "Fix: measure more sequences (--eval-tokens of at least 2 sequence lengths).")
    predicted = np.zeros_like(delta)
    if n_segments < 3:
        return predicted
    # (n, n_segments - 2, n_units, n_choices, 3): the features of segments 2.. and their targets
    features = np.stack([np.ones_like(delta[:, 2:]), delta[:, 1:-1], past_mean[:, 2:]], -1)
    targets = delta[:, 2:]
    for i in range(n):
        others = np.arange(n) != i
        x = features[others].transpose(2, 3, 0, 1, 4).reshape(*delta.shape[2:], -1, 3)  # (units, choices, rows, 3)
        y = targets[others].transpose(2, 3, 0, 1).reshape(*delta.shape[2:], -1, 1)
        weights = np.linalg.pinv(x) @ y  # (units, choices, 3, 1): minimum-norm least squares (0 where x is 0)
        predicted[i, 2:] = np.einsum("sucf,ucf->suc", features[i], weights[..., 0])
    return predicted


def per_segment_plan(changes: np.ndarray, cost: np.ndarray, static: np.ndarray) -> np.ndarray:
    """Per sequence and segment, :func:`segment_allocation` within the static plan's cost in that segment.

    ``changes`` (n_sequences, n_segments, n_units, n_choices): what each segment is allocated from; the measured
    :func:`first_order_gains` give the hindsight oracle, :func:`predicted_changes` a policy that sees only the
    past. ``cost`` (n_segments, n_units, n_choices), ``static`` (n_units,). Returns the plan (n_sequences,
    n_segments, n_units); segment 0, the exact warm-up, keeps the static choices (the runner ignores them).
    """
    n, n_segments = changes.shape[:2]
    units = np.arange(len(static))
    plan = np.repeat(np.repeat(static[None, None], n, 0), n_segments, 1)
    for i in range(n):
        for s in range(1, n_segments):
            plan[i, s] = segment_allocation(changes[i, s], cost[s], cost[s, units, static].sum(), static)
    return plan

"""Selection attention: rank-r scores choose the keys, exact attention computes them (derivation: docs/selection.md).

Each (layer, KV head) has an orthonormal basis P (d x d, columns ordered by energy). Keys are kept rotated, at full
width, K~ = K P; since P P^T = I the rotation changes no score:

    (q P)(K~)^T = q P P^T K^T = q K^T                                                                         (1)

so K~ serves two uses. Query i of a segment of T new tokens (absolute position L - T + i) sees the keys
V_i = {0 .. L - T + i}, n_i = |V_i| = L - T + i + 1 of them. With s the model's scaling (1/sqrt(d), never 1/sqrt(r)):

    choose    s^_hij = s (q_hi P_r)(K~_{j,:r})^T             rank-r scores, first r columns only               (2)
              pi_hij = s^_hij                                 selection="head": every query head chooses alone
              pi_ij  = max_h (s^_hij - logsumexp_{j' in V_i} s^_hij')
                                                              selection="group" (default): one key set per KV
                                                              group, a key ranked by its best approximate
                                                              probability over the G query heads              (3)
    count     k_i = max(ceil(keep * n_i), min(n_i, sinks + recent))                                             (4)
              S_i = sinks {j < sinks} + recents {j > L - T + i - recent} + the highest-priority rest, k_i in all
    compute   o_hi = sum_{j in S_i} softmax_{S_i}(s q_hi k_j^T)_j v_j   the model's own q, k, v, exact on S_i    (5)

The dropped softmax mass m_hi = sum_{j in V_i \\ S_i} p_hij (p = full softmax over V_i) is bounded per query head
and row, for ANY kept set S, from the rank-r scores and the tails beyond r:

    |s_hij - s^_hij| <= delta_hij = s ||q_hi P_{>r}|| ||K~_{j,>r}||                 (Cauchy-Schwarz)           (6)
    m <= U / (U + W) = sigmoid(log U - log W),
         U = sum_{j in V \\ S} exp(s^_j + delta_j),  W = sum_{j in S} exp(s^_j - delta_j)                           (7)
    ||p - p^S||_1 = 2 m,    ||o - o^S|| <= 2 m max_{j in V} ||v_j||                                              (8)

Costs, (9) FLOPs and (10) decode traffic, are charged for what a deployed kernel executes, not for the dense
reference below: ``drrl_gym.selection_cost``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drrl_gym.kept_set_bounds import kept_set_bounds
from drrl_gym.key_priorities import key_priorities
from drrl_gym.row_threshold import kept_masks, row_thresholds

SELECTION_MODES = ("group", "head")
DEFAULT_SINK_TOKENS = 4  # StreamingLLM: the first 4 tokens hold the "attention sink" mass
DEFAULT_RECENT_TOKENS = 8  # the query itself and the 7 keys before it: local, RoPE-high-frequency attention
KEEP_RTOL = 1e-6  # ceil(keep * n) forgives this much relative rounding: 0.1 * 30 = 3.0000000000000004 keeps 3


# ------------------------------------------------------------------------------------------------------ helpers
def visible_mask(new_tokens: int, keys: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, L) causal mask with a KV-cache offset: query i sits at absolute position L - T + i and sees keys 0..L-T+i."""
    _check_offset(new_tokens, keys)
    rows = torch.arange(new_tokens, device=device)[:, None] + (keys - new_tokens)
    return torch.arange(keys, device=device)[None, :] <= rows


def visible_key_counts(new_tokens: int, keys: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T,) n_i, the number of keys query i sees: the row sums of :func:`visible_mask`, L - T + 1 + i."""
    _check_offset(new_tokens, keys)
    return torch.arange(keys - new_tokens + 1, keys + 1, device=device)


def _check_offset(new_tokens: int, keys: int) -> None:
    if not 1 <= new_tokens <= keys:
        raise ValueError(f"need 1 <= new_tokens <= keys, got new_tokens={new_tokens}, keys={keys}. Fix: the T queries "
                         "must be the last T of the L keys (pass the whole KV cache including the new keys).")


def forced_mask(new_tokens: int, keys: int, sink_tokens: int, recent_tokens: int,
                device: torch.device | str | None = None) -> torch.Tensor:
    """(T, L) keys every query keeps whatever the scores: the first ``sink_tokens`` and its last ``recent_tokens``
    visible keys (itself included), both clipped to what it sees."""
    check_window(sink_tokens, recent_tokens)
    position = torch.arange(new_tokens, device=device)[:, None] + (keys - new_tokens)
    j = torch.arange(keys, device=device)[None, :]
    return (j <= position) & ((j < sink_tokens) | (j > position - recent_tokens))


def kept_counts(keep: torch.Tensor | float, visible: torch.Tensor | int, sink_tokens: int,
                recent_tokens: int) -> torch.Tensor:
    """k = max(ceil(keep * n), min(n, sinks + recent)) by (4): keep (...) x visible counts n (T,) -> (..., T) long.

    The sink and recent windows can overlap only when together they cover all n keys, so min(n, sinks + recent) is
    exactly the number of forced keys. ceil forgives a relative KEEP_RTOL so that binary rounding of keep
    (0.1 * 30 = 3.0000000000000004) does not add a key; keep in (0, 1] makes 1 <= k <= n.
    """
    check_window(sink_tokens, recent_tokens)
    keep = checked_keep(keep)
    n = torch.as_tensor(visible, device=keep.device).long()
    product = keep[..., None] * n.double()
    wanted = torch.ceil(product * (1 - KEEP_RTOL)).long()
    return torch.maximum(wanted, torch.clamp(n, max=sink_tokens + recent_tokens)).clamp(min=1)


def grid_counts(keeps: Sequence[float], new_tokens: int, keys: int, sink_tokens: int, recent_tokens: int,
                device: torch.device | str) -> torch.Tensor:
    """(C, T) long: k_i by (4) for each of the candidate ``keeps`` (host floats) and each of the T queries, formed on
    ``device`` from fills alone: a host tensor copied in would wait for the device, and break a CUDA graph's capture."""
    visible = visible_key_counts(new_tokens, keys, device)
    return torch.stack([kept_counts(torch.full((), float(keep), dtype=torch.float64, device=device), visible,
                                    sink_tokens, recent_tokens) for keep in keeps])


def rotate(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x P for every head: x (B, H, N, d), basis (H_kv, d, d), H a multiple of H_kv; head h uses KV head h // G."""
    heads, kv_heads = x.shape[1], basis.shape[0]
    if x.dim() != 4 or basis.dim() != 3 or heads % kv_heads or x.shape[-1] != basis.shape[-1]:
        raise ValueError(f"rotate needs x (B, H, N, d) and basis (H_kv, d, d) with H a multiple of H_kv, got "
                         f"{tuple(x.shape)} and {tuple(basis.shape)}")
    batch, _, n, d = x.shape
    grouped = x.reshape(batch, kv_heads, heads // kv_heads * n, d)
    return (grouped @ basis.to(device=x.device, dtype=x.dtype)).reshape(x.shape)


# ------------------------------------------------------------------------------------------- reference forward
@dataclass
class SelectionDetails:
    """What the reference knows besides the output; G = H / H_kv query heads per KV head."""

    kept: torch.Tensor  # (B, H, T, L) bool: S_i per query head (identical within a group for selection="group")
    kept_count: torch.Tensor  # (B, H_kv, T) long: k_i by (4)
    group_reads: torch.Tensor  # (B, H_kv, T) long: distinct keys the group reads exactly (k_i for "group", <= G k_i)
    dropped_mass: torch.Tensor  # (B, H, T) float64: the true m from exact scores
    dropped_mass_bound: torch.Tensor  # (B, H, T) float64: U / (U + W) by (7)
    output_bound: torch.Tensor  # (B, H, T) float64: 2 U/(U+W) max_{j in V} ||v_j|| by (8)


def selection_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    basis: torch.Tensor,
    rank: torch.Tensor | int,
    keep: torch.Tensor | float,
    *,
    scaling: float | None = None,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
    recent_tokens: int = DEFAULT_RECENT_TOKENS,
    selection: str = "group",
    rotated_keys: torch.Tensor | None = None,
    return_details: bool = False,
) -> tuple[torch.Tensor, SelectionDetails | None]:
    """Selection attention for one segment, by (2)-(5); returns (output (B, T, H, dv), details or None).

    Args:
        query: (B, H, T, d) post-RoPE; the last T of the L positions. Query head h belongs to KV head h // G.
        key, value: (B, H_kv, L, d) and (B, H_kv, L, dv), post-RoPE keys of all visible positions.
        basis: (H_kv, d, d) orthonormal columns ordered by energy.
        rank: r in [1, d], an int or a tensor broadcastable to (B, H_kv).
        keep: fraction of the visible keys to keep, in (0, 1], a float or a tensor broadcastable to (B, H_kv).
        scaling: the model's score scaling; d ** -0.5 if None.
        sink_tokens, recent_tokens: keys always kept (the first ones; the last ones each query sees, itself included).
        selection: "group" (one key set per KV group, the default) or "head" (one per query head).
        rotated_keys: K~ = K P if already at hand (a cache of rotated keys); computed from ``key`` otherwise.
        return_details: also return :class:`SelectionDetails` (float64 work on the exact scores: a diagnostic).

    The output layout is that of transformers' ``sdpa_attention_forward``. This reference is dense: it forms every
    score and masks the unchosen ones with -inf. A deployed kernel reads only the first r columns of K~ to choose
    and only the k chosen keys and values to compute; costs (``selection_flops``, ``decode_traffic``) are charged
    for that, not for this function's work. Approximate scores are formed in at least float32. At r = d and
    keep = 1 the result is plain causal attention.
    """
    batch, heads, n_queries, d, kv_heads, n_keys = check_shapes(query, key, value, basis, rotated_keys)
    group = heads // kv_heads
    scaling = checked_scaling(scaling, d)
    check_selection(selection)
    rank, keep = _settings(rank, keep, batch, kv_heads, d)  # host settings stay on the host: no wait for the device
    work = torch.promote_types(query.dtype, torch.float32)
    counts = kept_counts(keep, visible_key_counts(n_queries, n_keys, keep.device), sink_tokens, recent_tokens)
    rank, counts = to_device(rank, query.device), to_device(counts, query.device)  # counts: k_i, (B, H_kv, T)

    # choose, (2)-(4): the priorities of the rank-r scores (drrl_gym.key_priorities: the scores are not written),
    # then each row's k_i highest (drrl_gym.row_threshold, one mask per query head, in SDPA's additive form: 0 on S,
    # -inf off it, so SDPA does not convert a bool mask in a pass of its own)
    cast = basis.to(device=query.device, dtype=work)
    q_rot = query.to(work).reshape(batch, kv_heads, group, n_queries, d) @ cast[None, :, None]
    k_rot = key.to(work) @ cast[None] if rotated_keys is None else rotated_keys
    priority = key_priorities(q_rot, k_rot, rank, scaling, sink_tokens, recent_tokens, selection)  # (B, H_kv, P, T, L)
    additive_mask = kept_masks(priority, counts[:, :, None].expand(priority.shape[:-1]), group // priority.shape[2],
                               dtype=query.dtype)  # S_i per query head, in the order of the stacked G T rows

    # compute, (5): the model's own q, k and v, exact on the chosen keys: SDPA with S as its mask, so a fused kernel
    # accumulates scores and softmax in float32 as the plain model's attention does (bf16 scores, a step of 0.125 at
    # 16, would move the softmax by several percent in every layer). A group's G heads' queries are stacked as one
    # sequence of G T rows over the group's keys, so K and V are read once per group.
    out = F.scaled_dot_product_attention(query.reshape(batch, kv_heads, group * n_queries, d), key, value,
                                         attn_mask=additive_mask.reshape(batch, kv_heads, group * n_queries, n_keys),
                                         scale=scaling)  # (B, H_kv, G T, dv)
    out = out.reshape(batch, heads, n_queries, value.shape[-1]).transpose(1, 2).contiguous()
    if not return_details:
        return out, None

    kept = (additive_mask == 0).reshape(batch, kv_heads, group, n_queries, n_keys)
    visible = visible_mask(n_queries, n_keys, query.device)
    q64, k64 = query.double().reshape(batch, kv_heads, group, n_queries, d), key.double()
    exact = scaling * q64 @ k64[:, :, None].transpose(-1, -2)
    true_mass = torch.sigmoid(_log_sum(exact, visible & ~kept) - _log_sum(exact, kept))
    basis64 = basis.to(device=query.device, dtype=torch.float64)
    k_rot64 = k64 @ basis64[None] if rotated_keys is None else rotated_keys.double()
    bound = _mass_bound(q64 @ basis64[None, :, None], k_rot64, kept, visible, rank, scaling)
    flat = (batch, heads, n_queries)
    details = SelectionDetails(
        kept=kept.reshape(*flat, n_keys),
        kept_count=counts,
        group_reads=kept.any(2).sum(-1),
        dropped_mass=true_mass.reshape(flat),
        dropped_mass_bound=bound.reshape(flat),
        output_bound=output_change_bound(bound.reshape(flat), value),
    )
    return out, details


# ------------------------------------------------------------------------------------------------------ bounds
def dropped_mass_bound(
    rotated_query: torch.Tensor,
    rotated_keys: torch.Tensor,
    kept: torch.Tensor,
    rank: torch.Tensor | int,
    *,
    scaling: float | None = None,
) -> torch.Tensor:
    """U / (U + W) of (7) for any kept sets: (B, H, T) float64, an upper bound on the dropped softmax mass.

    rotated_query (B, H, T, d) = q P, rotated_keys (B, H_kv, L, d) = K P, kept (B, H, T, L) bool (intersected with
    the causal visibility; each row must keep at least one visible key), rank broadcastable to (B, H_kv). The choice
    rule that produced ``kept`` does not matter: (7) holds for every S.
    """
    batch, heads, n_queries, d, kv_heads, n_keys = check_shapes(rotated_query, rotated_keys, rotated_keys, None, None)
    if tuple(kept.shape) != (batch, heads, n_queries, n_keys) or kept.dtype != torch.bool:
        raise ValueError(f"kept must be a bool tensor of shape {(batch, heads, n_queries, n_keys)}, got "
                         f"{kept.dtype} {tuple(kept.shape)}. Fix: pass SelectionDetails.kept or a per-head mask.")
    rank = to_device(_settings(rank, 1.0, batch, kv_heads, d)[0], rotated_query.device)
    visible = visible_mask(n_queries, n_keys, rotated_query.device)
    kept = kept.reshape(batch, kv_heads, heads // kv_heads, n_queries, n_keys) & visible
    if not kept.any(-1).all():
        raise ValueError("a row of kept has no visible key: the restricted softmax is undefined. Fix: keep at least "
                         "one key per query (recent_tokens >= 1 keeps the query's own key).")
    q = rotated_query.double().reshape(batch, kv_heads, heads // kv_heads, n_queries, d)
    return _mass_bound(q, rotated_keys.double(), kept, visible, rank, checked_scaling(scaling, d)).reshape(
        batch, heads, n_queries)


def output_change_bound(mass_bound: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """2 m max_{j in V_i} ||v_j|| of (8): mass_bound (B, H, T) x value (B, H_kv, L, dv) -> (B, H, T) float64."""
    batch, heads, n_queries = mass_bound.shape
    kv_heads, n_keys = value.shape[1], value.shape[2]
    if value.shape[0] != batch or heads % kv_heads or n_queries > n_keys:
        raise ValueError(f"mass_bound {tuple(mass_bound.shape)} does not fit value {tuple(value.shape)}: need the "
                         "same batch, H a multiple of H_kv and T <= L")
    largest = value.double().norm(dim=-1).cummax(-1).values[..., n_keys - n_queries:]  # max over V_i: (B, H_kv, T)
    return 2 * mass_bound.double() * largest.repeat_interleave(heads // kv_heads, dim=1)


def dropped_mass_bound_table(
    rotated_query: torch.Tensor,
    rotated_keys: torch.Tensor,
    ranks: Sequence[int],
    keeps: Sequence[float],
    *,
    scaling: float | None = None,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
    recent_tokens: int = DEFAULT_RECENT_TOKENS,
    selection: str = "group",
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max over a group's G*T rows of the bound (7) for every candidate (rank, keep): two (B, H_kv,
    len(ranks), len(keeps)) float64 tensors, from one segment's rotated q (B, H, T, d) and K~ (B, H_kv, L, d).
    The work runs in ``dtype``: float64 (the default) reproduces the per-row bound of ``selection_attention`` to
    rounding; float32 halves the memory traffic of the (B, H_kv, G, T, L) tensors it forms and agrees with it to
    about 1e-7 relatively on random scores (tested to 1e-4), ample for a mask that compares the mean with a
    threshold (the env uses it).

    The key sets are those ``selection_attention`` chooses (ties aside: it chooses in the model's dtype, this in
    ``dtype``, and a tie of priorities at the k-th key may go either way here). Per rank, one
    ``drrl_gym.row_threshold.row_thresholds`` call gives, for every keep, each row's k_i-th largest priority and
    where its ties stop, so each keep's W and U of (7) are sums over the row under an elementwise mask (one shift
    per row for all of them; ``drrl_gym.kept_set_bounds``, a Triton pass per row on CUDA): no sort, no gather. A
    keep of 1 drops nothing: its bound is exactly 0 and is not computed; a smaller keep whose k_i is every visible
    key gets 0 from (7) itself (U is empty). No shape or branch depends on the data and nothing waits for the
    device, so CUDA graphs and torch.compile take the table whole.
    For a safety mask on the NEXT segment this is a prediction, not a certificate.
    """
    batch, heads, n_queries, d, kv_heads, n_keys = check_shapes(rotated_query, rotated_keys, rotated_keys, None, None)
    scaling = checked_scaling(scaling, d)
    check_selection(selection)
    if not ranks or not keeps:
        raise ValueError("ranks and keeps must be non-empty. Fix: pass the candidate settings, e.g. ranks=(16, 64), "
                         "keeps=(0.125, 1.0).")
    for r in ranks:  # checked on the CPU: a check on the device would wait for it
        _settings(int(r), 1.0, 1, 1, d)
    keeps = [float(k) for k in keeps]
    checked_keep(torch.tensor(keeps))
    device, group = rotated_query.device, heads // kv_heads
    zeros = torch.zeros(batch, kv_heads, dtype=torch.float64, device=device)
    dropping = [c for c, keep in enumerate(keeps) if keep < 1]  # the others' bound is 0
    if not dropping:
        zeros = zeros[:, :, None, None].expand(batch, kv_heads, len(ranks), len(keeps))
        return zeros.clone(), zeros.clone()
    counts = grid_counts([keeps[c] for c in dropping], n_queries, n_keys, sink_tokens, recent_tokens, device)
    visible = visible_mask(n_queries, n_keys, device)
    forced = forced_mask(n_queries, n_keys, sink_tokens, recent_tokens, device)
    q = rotated_query.to(dtype).reshape(batch, kv_heads, group, n_queries, d)
    k = rotated_keys.to(dtype)
    rank_bounds = _compiled_rank_bounds() if device.type == "cuda" else _rank_bounds

    def every_keep(bounds: torch.Tensor) -> torch.Tensor:  # (B, H_kv, C) -> (B, H_kv, n_keeps), 0 where none drop
        return torch.stack([bounds[..., dropping.index(c)] if c in dropping else zeros for c in range(len(keeps))], -1)

    means, maxes = [], []
    for r in ranks:
        mean, top = rank_bounds(q, k, int(r), scaling, visible, forced, counts, selection)  # (B, H_kv, C) each
        means.append(every_keep(mean))
        maxes.append(every_keep(top))
    return torch.stack(means, 2), torch.stack(maxes, 2)


def _rank_bounds(q: torch.Tensor, k: torch.Tensor, rank: int, scaling: float, visible: torch.Tensor,
                 forced: torch.Tensor, counts: torch.Tensor, selection: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max over a group's rows of the bound (7) at one rank for every dropping keep: q (B, H_kv, G, T, d),
    k (B, H_kv, L, d), counts (C, T) k_i -> two (B, H_kv, C) float64 (:func:`dropped_mass_bound_table`). The rank
    is one int for every head here, so (2) slices the first r columns: r / d of the full product's work."""
    rows = q.shape[:4]  # (B, H_kv, G, T): the G heads' queries stacked, so K~ is not copied once per head
    approx = (scaling * q[..., :rank].flatten(2, 3) @ k[..., :rank].transpose(-1, -2)).unflatten(2, rows[2:])
    q_tail = scaling * torch.linalg.vector_norm(q[..., rank:], dim=-1)  # (B, H_kv, G, T)
    k_tail = torch.linalg.vector_norm(k[..., rank:], dim=-1)  # (B, H_kv, L): delta = q_tail k_tail, (6)
    priority = priorities(approx, visible, forced, selection)  # (B, H_kv, G or 1, T, L)
    threshold, last = row_thresholds(priority, counts.T[None, None, None])  # (B, H_kv, G or 1, T, C)
    bound = kept_set_bounds(*(x.flatten(0, 1) for x in (approx, q_tail, k_tail, priority, threshold, last)))
    bound = bound.unflatten(0, rows[:2]).double()  # (B, H_kv, G, T, C)
    return bound.mean((2, 3)), bound.amax((2, 3))


@functools.cache
def _compiled_rank_bounds():
    """:func:`_rank_bounds` through torch.compile (CUDA): the priorities' masks, logsumexps and maxima over the
    (B, H_kv, G, T, L) scores, and the tail norms, fuse into a few kernels instead of one pass over memory each (the
    sums of (7) are one Triton pass of their own, ``drrl_gym.kept_set_bounds``). Dynamic shapes: one
    compilation serves every key count of a run."""
    return torch.compile(_rank_bounds, dynamic=True)


# ------------------------------------------------------------------------------------------------------ helpers (the unprefixed ones are shared with drrl_gym.attention_signals)
def approximate_scores(q_rot: torch.Tensor, k_rot: torch.Tensor, rank: torch.Tensor, scaling: float) -> torch.Tensor:
    """(2): q_rot (B, H_kv, G, T, d) x k_rot (B, H_kv, L, d) with rank (B, H_kv) -> (B, H_kv, G, T, L).
    Zeroing q's columns beyond r removes exactly those terms (a kernel slices instead)."""
    columns = torch.arange(q_rot.shape[-1], device=q_rot.device) < rank[..., None]  # (B, H_kv, d)
    return scaling * (q_rot * columns[:, :, None, None].to(q_rot.dtype)) @ k_rot[:, :, None].transpose(-1, -2)


def _tail_norm(x: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """||x_{>r}|| per row: x (..., N, d), rank (...) -> (..., N). Only the tail's squares are summed (a masked norm,
    not a difference of prefix sums), so a small tail keeps its relative precision; one pass over x, no scan."""
    beyond = torch.arange(x.shape[-1], device=x.device) >= rank[..., None, None]  # (..., 1, d)
    return torch.linalg.vector_norm(x * beyond.to(x.dtype), dim=-1)


def _radius(q_rot: torch.Tensor, k_rot: torch.Tensor, rank: torch.Tensor, scaling: float) -> torch.Tensor:
    """delta of (6): s ||q_{>r}|| ||k~_{>r}||, (B, H_kv, G, T, L)."""
    q_tail = _tail_norm(q_rot, rank[:, :, None].expand(q_rot.shape[:3]))  # (B, H_kv, G, T)
    k_tail = _tail_norm(k_rot, rank)  # (B, H_kv, L)
    return scaling * q_tail[..., None] * k_tail[:, :, None, None, :]


def _log_sum(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log sum_{j in mask} exp(scores_j) over the last axis; -inf for an empty set."""
    return scores.masked_fill(~mask, float("-inf")).logsumexp(-1)


def _mass_bound(q_rot, k_rot, kept, visible, rank, scaling) -> torch.Tensor:
    """(7) in float64 log space: sigmoid(log U - log W), (B, H_kv, G, T). log W is finite (S is never empty); an
    empty dropped set gives log U = -inf and a bound of exactly 0."""
    approx = approximate_scores(q_rot, k_rot, rank, scaling)
    delta = _radius(q_rot, k_rot, rank, scaling)
    log_u = _log_sum(approx + delta, visible & ~kept)
    log_w = _log_sum(approx - delta, kept & visible)
    return torch.sigmoid(log_u - log_w)


def priorities(approx: torch.Tensor, visible: torch.Tensor, forced: torch.Tensor, selection: str) -> torch.Tensor:
    """The keys' priority (3): forced keys +inf, invisible ones -inf, (B, H_kv, G or 1, T, L)."""
    priority = approx.masked_fill(~visible, float("-inf"))
    if selection == "group":
        priority = (priority - priority.logsumexp(-1, keepdim=True)).amax(2, keepdim=True)
    return priority.masked_fill_(forced, float("inf"))


def check_shapes(query, key, value, basis, rotated_keys):
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"query, key and value must be 4-D (B, H, T, d), (B, H_kv, L, d), (B, H_kv, L, dv); got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    batch, heads, n_queries, d = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    if key.shape[0] != batch or key.shape[-1] != d or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"shape mismatch: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}. Fix: key and value need query's batch and key query's head_dim, value "
                         "key's (B, H_kv, L).")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads. Fix: pass the post-RoPE "
                         "tensors in (B, heads, tokens, head_dim) layout before any repeat_kv.")
    if not 1 <= n_queries <= n_keys:
        raise ValueError(f"need 1 <= T <= L, got T={n_queries} queries and L={n_keys} keys. Fix: the queries must be "
                         "the last T of the L key positions (pass the whole KV cache including the new keys).")
    if basis is not None and tuple(basis.shape) != (kv_heads, d, d):
        raise ValueError(f"basis must have shape {(kv_heads, d, d)} (H_kv, d, d), got {tuple(basis.shape)}. Fix: pass "
                         "the layer's slice basis[layer] of a (num_layers, num_kv_heads, d, d) basis.")
    if rotated_keys is not None and rotated_keys.shape != key.shape:
        raise ValueError(f"rotated_keys must have key's shape {tuple(key.shape)}, got {tuple(rotated_keys.shape)}")
    return batch, heads, n_queries, d, kv_heads, n_keys


def checked_keep(keep) -> torch.Tensor:
    """keep as float64, checked to lie in (0, 1] where it is on the host (see :func:`_settings`)."""
    keep = torch.as_tensor(keep).double()
    if keep.numel() and _checkable(keep) and not bool(((keep > 0) & (keep <= 1)).all()):
        raise ValueError(f"keep must lie in (0, 1] (the fraction of visible keys kept), got min {float(keep.min())} "
                         f"max {float(keep.max())}. Fix: clip it into (0, 1]; 1 keeps every key.")
    return keep


def _settings(rank, keep, batch: int, kv_heads: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rank (long) and keep (float64) broadcast to (B, H_kv), after the range checks, where they are: settings
    given on the host are checked there, so the check does not wait for the device (move them with :func:`to_device`).
    Settings already on the device are not range-checked, for the same reason: a check would wait for the device,
    and CUDA graphs cannot capture it; nor under torch.compile. Their owner checks them on the host before it copies
    them there (``DynamicRankAttention.set_static_ranks``)."""
    rank, keep = torch.as_tensor(rank), checked_keep(keep)
    if rank.is_floating_point() or rank.dtype == torch.bool:
        raise ValueError(f"rank must be integers, got dtype {rank.dtype}. Fix: pass rank.long() (values in [1, {d}]).")
    if rank.numel() and _checkable(rank) and not bool(((rank >= 1) & (rank <= d)).all()):
        raise ValueError(f"rank must lie in [1, head_dim={d}], got min {int(rank.min())} max {int(rank.max())}. Fix: "
                         f"clip the ranks into [1, {d}].")
    try:
        return rank.long().expand(batch, kv_heads), keep.expand(batch, kv_heads)
    except RuntimeError:
        raise ValueError(f"rank {tuple(rank.shape)} and keep {tuple(keep.shape)} must broadcast to (B, H_kv) = "
                         f"{(batch, kv_heads)}. Fix: pass a scalar or a (B, H_kv), (H_kv,) or (B, 1) tensor.") from None


def _checkable(setting: torch.Tensor) -> bool:
    """Whether a setting's values can be checked without waiting for a device: on the host, and not while
    torch.compile traces (a compiled step reads static settings its owner checked before, as on the device)."""
    return setting.device.type == "cpu" and not torch.compiler.is_compiling()


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``; from the host to a GPU through pinned memory, without waiting for the GPU's queue."""
    device = torch.device(device)
    if x.device == device:
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        return x.contiguous().pin_memory().to(device, non_blocking=True)
    return x.to(device)


def checked_scaling(scaling: float | None, d: int) -> float:
    scaling = d**-0.5 if scaling is None else float(scaling)
    if not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"scaling must be a positive finite number, got {scaling}. Fix: pass None for 1/sqrt(d).")
    return scaling


def check_selection(selection: str) -> None:
    if selection not in SELECTION_MODES:
        raise ValueError(f"unknown selection {selection!r}; choose one of {SELECTION_MODES}")


def check_window(sink_tokens: int, recent_tokens: int) -> None:
    for name, value in (("sink_tokens", sink_tokens), ("recent_tokens", recent_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}. Fix: pass 0 to force none.")

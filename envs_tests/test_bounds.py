"""The rank-switch perturbation bound of ``drrl_gym.bounds`` (derivation: docs/bounds.md) against the true change.

* A seeded property test over 2000 random cases (head widths, GQA groups, KV-cache offsets, causal and padding masks,
  saturated softmax, anisotropic and low-rank spectra): the bound never falls below the exact ||A_r - A_r'||_F.
* A sharpness check: inputs built so that the constant 1/2 is approached, which shows it cannot be lowered.
* Real post-RoPE activations of SmolLM2-135M (every layer and KV head, with and without a KV cache) and of the tiny
  random Llama: zero violations, the recorded Grams equal the Grams of the captured q/k, and the typical slack
  (median actual/bound) is printed; docs/bounds.md quotes it.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import CapturingAttention, one_thread

from drrl_gym.bounds import attention_change_bound, score_change_norm
from drrl_gym.calibration import load_or_calibrate_basis
from drrl_gym.corpus import CorpusConfig, load_corpus
from drrl_gym.hf_compat import cache_argument, output_cache

REL_SLACK = 1e-9  # float64 rounding only: the bound is never allowed to be exceeded by more than this


# ------------------------------------------------------------------------------------------------- references
def visible_keys(n_queries: int, n_keys: int) -> torch.Tensor:
    """(T, L) causal mask with a KV-cache offset: query i sits at absolute position L - T + i and sees keys 0..L-T+i."""
    rows = torch.arange(n_queries)[:, None] + (n_keys - n_queries)
    return torch.arange(n_keys)[None, :] <= rows


def attention_change(qp: torch.Tensor, kp: torch.Tensor, lo: int, hi: int, scaling: float, mask: torch.Tensor) -> torch.Tensor:
    """||A_hi - A_lo||_F in float64 by explicit masked softmax, Frobenius over the G query heads together.

    qp (G, T, d) and kp (L, d) are q and k already in the basis; A_r = softmax of s (qp_r)(kp_r)^T over the visible
    keys (mask (T, L)). The rank-hi scores are those of rank lo plus the band term dS = s qp_D kp_D^T. Rows whose score
    change is small take the difference without cancellation, dA_j = p_j (expm1(dS_j) - m) / (1 + m) with
    m = sum_k p_k expm1(dS_k) (exact algebra), so the reference is accurate relative to dA itself rather than only to
    ~1e-16 absolute: the comparison with the bound then needs no absolute noise floor.
    """
    base = scaling * qp[..., :lo] @ kp[:, :lo].T
    delta = (scaling * qp[..., lo:hi] @ kp[:, lo:hi].T).masked_fill(~mask, 0.0)
    p = base.masked_fill(~mask, float("-inf")).softmax(-1)
    direct = (base + delta).masked_fill(~mask, float("-inf")).softmax(-1) - p
    small = delta.abs().amax(-1, keepdim=True) <= 1
    grow = torch.expm1(delta.clamp(max=1.0))
    mean = (p * grow).sum(-1, keepdim=True)  # > -1 because every delta used here is >= -1
    accurate = p * (grow - mean) / (1 + mean)
    return torch.where(small, accurate, direct).pow(2).sum().sqrt()


def actual_changes(q, k, basis, ranks, scaling, mask) -> torch.Tensor:
    """(n, n) symmetric matrix of ||A_ra - A_rb||_F for q (G, T, d), k (L, d) and basis P (d, d)."""
    qp, kp = q @ basis, k @ basis
    out = torch.zeros(len(ranks), len(ranks), dtype=torch.float64)
    for a, b in itertools.combinations(range(len(ranks)), 2):
        lo, hi = sorted((ranks[a], ranks[b]))
        out[a, b] = out[b, a] = attention_change(qp, kp, lo, hi, scaling, mask)
    return out


def grams(q: torch.Tensor, k: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group query Gram sum_h (q_h P)^T (q_h P) and key Gram (k P)^T (k P)."""
    qp, kp = q @ basis, k @ basis
    return torch.einsum("gti,gtj->ij", qp, qp), kp.T @ kp


def energy_product_bound(query_gram, key_gram, ranks, scaling) -> torch.Tensor:
    """The energy-product bound (docs/bounds.md): s ||Q P_D||_F ||K P_D||_F for every pair (on the scores, before the factor 1/2)."""
    out = torch.zeros(len(ranks), len(ranks), dtype=torch.float64)
    for a, b in itertools.product(range(len(ranks)), repeat=2):
        lo, hi = sorted((ranks[a], ranks[b]))
        band_q = query_gram.diagonal()[lo:hi].sum()  # ||Q P_D||_F^2, summed directly (no prefix differences)
        band_k = key_gram.diagonal()[lo:hi].sum()
        out[a, b] = scaling * (band_q * band_k).sqrt()
    return out


# ------------------------------------------------------------------------------------------------ random cases
def _random_orthonormal(d: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0]


def _random_matrix(rows: int, d: int, basis: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rows with a randomly chosen spectrum: isotropic, steeply decaying (aligned with the basis or with a random
    rotation, like a calibrated basis on data it was not fitted to), low rank, or with a large common mean (keys)."""
    kind = int(torch.randint(5, (1,), generator=generator))
    z = torch.randn(rows, d, generator=generator, dtype=torch.float64)
    if kind == 0:
        x = z
    elif kind in (1, 2):
        decay = 10 ** (-4 * torch.rand(1, generator=generator, dtype=torch.float64))  # sigma_j = decay^j, down to 1e-4^j
        sigma = decay ** torch.arange(d, dtype=torch.float64)
        frame = basis if kind == 1 else _random_orthonormal(d, generator)
        x = (z * sigma) @ frame.T
    elif kind == 3:
        rank = int(torch.randint(1, d, (1,), generator=generator))
        x = z[:, :rank] @ torch.randn(rank, d, generator=generator, dtype=torch.float64)
    else:
        x = z + 5 * torch.randn(1, d, generator=generator, dtype=torch.float64)
    return x / x.norm(dim=-1).mean().clamp_min(1e-300) * math.sqrt(d)  # rows of norm ~sqrt(d) before the scale below


def random_case(generator: torch.Generator):
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    d, group = pick((4, 8, 16)), pick((1, 2, 3))
    n_queries = int(torch.randint(1, 13, (1,), generator=generator))
    n_keys = n_queries + int(torch.randint(0, 13, (1,), generator=generator))  # KV-cache offset L - T in [0, 12]
    basis = _random_orthonormal(d, generator)
    # log-uniform magnitudes over 1e-2..1e2 each: with s = 1/sqrt(d) the largest saturate the softmax completely
    q_scale, k_scale = (10 ** (4 * torch.rand(2, generator=generator, dtype=torch.float64) - 2)).tolist()
    q = torch.stack([_random_matrix(n_queries, d, basis, generator) for _ in range(group)]) * q_scale
    k = _random_matrix(n_keys, d, basis, generator) * k_scale
    scaling = d**-0.5 if torch.rand(1, generator=generator) < 0.8 else float(10 ** (2 * torch.rand(1, generator=generator) - 1))
    mask = visible_keys(n_queries, n_keys)
    if torch.rand(1, generator=generator) < 0.3:
        # padding / arbitrary key masks: hide random keys, but never a query's own (diagonal) key, so no row is empty
        hidden = torch.rand(n_queries, n_keys, generator=generator) < 0.4
        own = torch.arange(n_queries) + (n_keys - n_queries)
        hidden[torch.arange(n_queries), own] = False
        mask = mask & ~hidden
    n_ranks = int(torch.randint(2, min(d, 5) + 1, (1,), generator=generator))
    ranks = sorted(torch.randperm(d, generator=generator)[:n_ranks].add(1).tolist())
    if torch.rand(1, generator=generator) < 0.5 and ranks[-1] != d:
        ranks[-1] = d  # the bound against full rank (r' = d)
    return q, k, basis, sorted(set(ranks)), scaling, mask


def test_bound_holds_on_random_cases():
    with one_thread():
        _random_cases()


def _random_cases():
    generator = torch.Generator().manual_seed(20261123)
    cases, pairs, violations, worst, ratios = 2000, 0, [], 0.0, []
    identity_checks = identity_rtol_only = 0
    for case in range(cases):
        q, k, basis, ranks, scaling, mask = random_case(generator)
        actual = actual_changes(q, k, basis, ranks, scaling, mask)
        query_gram, key_gram = grams(q, k, basis)
        bound = attention_change_bound(query_gram, key_gram, ranks, scaling)
        assert bound.shape == actual.shape == (len(ranks), len(ranks))
        assert bound.dtype == torch.float64
        assert torch.all(bound.diagonal() == 0) and torch.all(bound == bound.T)
        off = ~torch.eye(len(ranks), dtype=torch.bool)
        pairs += int(off.sum())
        bad = actual > bound * (1 + REL_SLACK)
        if bad.any():
            violations.append((case, ranks, actual[bad].tolist(), bound[bad].tolist()))
        live = off & (bound > 0)
        ratio = actual[live] / bound[live]
        ratios.append(ratio)
        worst = max(worst, float(ratio.max()) if ratio.numel() else 0.0)

        # Never looser than the energy-product bound (Cauchy-Schwarz for PSD matrices).
        scores = score_change_norm(query_gram, key_gram, ranks, scaling)
        assert torch.all(2 * bound <= energy_product_bound(query_gram, key_gram, ranks, scaling) * (1 + 1e-12) + 1e-300)
        # Without a mask, (2) is an identity: the norm of the true score change over the G heads.
        # Tolerance: rtol 1e-6, or float64 rounding of the whole score scale s ||Q||_F ||K||_F when the band D holds
        # almost no energy (then both sides are tiny differences and agree only to ~1e-16 of that scale).
        score_scale = scaling * float((query_gram.trace() * key_gram.trace()).sqrt())
        for a, b in zip(*torch.nonzero(off, as_tuple=True)):
            lo, hi = sorted((ranks[a], ranks[b]))
            direct = (scaling * (q @ basis[:, lo:hi]) @ (k @ basis[:, lo:hi]).T).norm()
            torch.testing.assert_close(scores[a, b], direct, rtol=1e-6, atol=1e-13 * score_scale)
            identity_checks += 1
            identity_rtol_only += bool(abs(float(scores[a, b] - direct)) <= 1e-6 * float(direct))
    ratios = torch.cat(ratios)
    print(f"\nrandom cases: {cases} cases, {pairs} ordered pairs, {len(violations)} violations; actual/bound median "
          f"{ratios.median():.3g}, max {worst:.6f}; identity (2) within rtol 1e-6 in {identity_rtol_only}/{identity_checks} "
          "pairs, the rest within 1e-13 of the score scale")
    assert cases >= 1000 and pairs >= 5000
    assert not violations, f"{len(violations)} violations, first: {violations[:3]}"


def test_constant_one_half_is_sharp():
    """Two keys with equal scores at rank r (p = (1/2, 1/2)) and a small antisymmetric score change: ratio -> 1."""
    basis = torch.eye(4, dtype=torch.float64)
    q = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]], dtype=torch.float64)  # G = 1, T = 1
    ratios = []
    for eps in (1e-1, 1e-2, 1e-3):
        k = torch.tensor([[0.5, 0.0, eps, 0.0], [0.5, 0.0, -eps, 0.0]], dtype=torch.float64)  # L = 2
        mask = torch.ones(1, 2, dtype=torch.bool)
        actual = actual_changes(q, k, basis, [2, 4], 1.0, mask)
        bound = attention_change_bound(*grams(q, k, basis), [2, 4], 1.0)
        assert actual[0, 1] <= bound[0, 1] * (1 + REL_SLACK)
        ratios.append(float(actual[0, 1] / bound[0, 1]))
    assert ratios[-1] > 0.999999, ratios  # the factor 1/2 (softmax Lipschitz constant) is attained in the limit


def test_bound_is_zero_without_energy_in_the_band():
    """Queries with no component in the band D leave the scores, and the attention, unchanged."""
    generator = torch.Generator().manual_seed(1)
    basis = _random_orthonormal(8, generator)
    q = (torch.randn(2, 5, 3, generator=generator, dtype=torch.float64) @ basis[:, :3].T)  # only in the first 3 dirs
    k = torch.randn(7, 8, generator=generator, dtype=torch.float64)
    bound = attention_change_bound(*grams(q, k, basis), [3, 5, 8], 8**-0.5)
    assert float(bound[0, 1:].max()) < 1e-14 and float(bound[1, 2]) < 1e-14
    actual = actual_changes(q, k, basis, [3, 5, 8], 8**-0.5, visible_keys(5, 7))
    assert float(actual.max()) < 1e-12


def test_batched_shapes_and_symmetry():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 10, 16, generator=generator)
    query_gram, key_gram = x.transpose(-1, -2) @ x, (x.transpose(-1, -2) @ x).flip(-1).flip(-2)
    out = attention_change_bound(query_gram, key_gram, (4, 8, 16), 0.25)
    assert out.shape == (2, 3, 4, 3, 3) and out.dtype == torch.float64
    torch.testing.assert_close(out, out.transpose(-1, -2))
    # entry (a, b) for a single batch element equals the unbatched call
    torch.testing.assert_close(out[1, 2, 3], attention_change_bound(query_gram[1, 2, 3], key_gram[1, 2, 3], (4, 8, 16), 0.25))


# ------------------------------------------------------------------------------------------- real activations
def _check_real_model(backbone, rank_choices: tuple[int, ...], seq_len: int, expected_scaling: float) -> dict:
    splits = load_corpus(backbone.tokenizer, CorpusConfig(seq_len=seq_len, calibration_sequences=4, eval_sequences=2))
    basis = load_or_calibrate_basis(backbone, splits.calibration, splits.fingerprint)
    g, model = backbone.geometry, backbone.model
    controller = CapturingAttention(g, basis)
    segments = []  # (label, T, stats, captured q/k per layer)
    with torch.no_grad(), controller.attached(model), controller.recording(statistics=True) as recorded:
        # A whole sequence without a cache (T = L), then the second half of another sequence after its first half
        # went into the KV cache (T < L: queries at absolute positions L - T .. L - 1).
        model(splits.eval[:1], use_cache=False)
        segments.append(("no cache", seq_len, recorded.stats(), dict(controller.captured)))
        prefix = seq_len // 2
        out = model(splits.eval[1:2, :prefix], use_cache=True)
        model(splits.eval[1:2, prefix:], **cache_argument(output_cache(out)), use_cache=True)
        segments.append(("kv cache", seq_len - prefix, recorded.stats(), dict(controller.captured)))

    group, n = g.group_size, len(rank_choices)
    off = ~torch.eye(n, dtype=torch.bool)
    ratios, tightening, violations, pairs, gram_errors = [], [], [], 0, []
    with one_thread():
        for label, n_queries, stats, captured in segments:
            assert (stats.num_queries, stats.num_keys) == (n_queries, seq_len)
            mask = visible_keys(n_queries, seq_len)
            for layer in range(g.num_layers):
                query, key, _, scaling = captured[layer]
                assert scaling == pytest.approx(expected_scaling)
                assert query.shape == (1, g.num_heads, n_queries, g.head_dim)
                assert key.shape == (1, g.num_kv_heads, seq_len, g.head_dim)
                for head in range(g.num_kv_heads):
                    p = basis[layer, head].double()
                    q = query[0, head * group : (head + 1) * group].double()  # the G query heads of KV head `head`
                    k = key[0, head].double()
                    query_gram, key_gram = stats.query_gram[0, layer, head], stats.key_gram[0, layer, head]
                    direct_q, direct_k = grams(q, k, p)
                    for recorded, direct in ((query_gram, direct_q), (key_gram, direct_k)):
                        gram_errors.append(float((recorded.double() - direct).abs().max() / direct.diagonal().max()))
                    actual = actual_changes(q, k, p, rank_choices, scaling, mask)
                    bound = attention_change_bound(query_gram, key_gram, rank_choices, scaling)  # recorded, float32 Grams
                    bound64 = attention_change_bound(direct_q, direct_k, rank_choices, scaling)  # float64 Grams
                    pairs += int(off.sum())
                    # float64 Grams: float64 slack only; the recorded float32 Grams: 1e-5 for their rounding
                    bad = (actual > bound64 * (1 + REL_SLACK)) | (actual > bound * (1 + 1e-5))
                    if bad.any():
                        violations.append((label, layer, head, actual[bad].tolist(), bound[bad].tolist()))
                    ratios.append((actual / bound)[off].view(n, n - 1))
                    tightening.append((2 * bound64 / energy_product_bound(direct_q, direct_k, rank_choices, scaling))[off])
    ratios, tightening = torch.stack(ratios), torch.cat(tightening)  # ratios: (heads x segments, n, n - 1)
    by_pair = {f"{rank_choices[a]}-{rank_choices[b]}": round(float((ratios[:, a, b - (b > a)]).median()), 4)
               for a, b in itertools.combinations(range(n), 2)}
    flat = ratios.flatten()
    summary = dict(pairs=pairs, violations=len(violations), median=float(flat.median()), q10=float(flat.quantile(0.1)),
                   q90=float(flat.quantile(0.9)), max=float(flat.max()), median_by_pair=by_pair,
                   median_bound_over_energy_product=float(tightening.median()), gram_error=max(gram_errors))
    print(f"\n{backbone.name} actual/bound: {summary}")
    assert not violations, f"{len(violations)} violations, first: {violations[:3]}"
    assert max(gram_errors) < 1e-4, "recorded Grams differ from the Grams of the captured q/k projected on the basis"
    return summary


@pytest.mark.slow
def test_bound_holds_on_smollm2_activations(smollm2):
    g = smollm2.geometry
    summary = _check_real_model(smollm2, (16, 32, 48, 64), 128, 64**-0.5)
    assert summary["pairs"] == 2 * g.num_layers * g.num_kv_heads * 12


def test_bound_holds_on_tiny_llama_activations(tiny_llama):
    g = tiny_llama.geometry
    summary = _check_real_model(tiny_llama, (4, 8, 12, 16), 128, 16**-0.5)
    assert summary["pairs"] == 2 * g.num_layers * g.num_kv_heads * 12

"""Spectra (energies, NER, tail energy) against direct computation, and FLOPs against hand counts and actual counts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import drrl_gym.lowrank as lowrank
from drrl_gym.backbone import AttentionGeometry
from drrl_gym.flops import AttentionFlops, causal_pairs, layer_flops
from drrl_gym.lowrank import DynamicRankAttention
from drrl_gym.spectra import energies, normalized_energy_ratio, tail_energy


# ------------------------------------------------------------------------------------------------------- spectra
def _orthonormal(d: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0].to(dtype)


def _anisotropic(rows: int, d: int, generator: torch.Generator) -> torch.Tensor:
    sigma = 0.7 ** torch.arange(d, dtype=torch.float64)
    return (torch.randn(rows, d, generator=generator, dtype=torch.float64) * sigma) @ _orthonormal(d, generator).T


RANKS = (1, 2, 5, 8, 12, 16)


def test_energies_tail_and_ner_match_direct_computation():
    generator = torch.Generator().manual_seed(0)
    d = 16
    for _ in range(20):
        x = _anisotropic(40, d, generator)
        p = _orthonormal(d, generator)  # any orthonormal basis: the identities are exact for all of them
        gram = (x @ p).T @ (x @ p)
        energy = energies(gram)
        torch.testing.assert_close(energy, (x @ p).pow(2).sum(0), rtol=1e-12, atol=0)  # e_j = ||X p_j||^2
        total = x.pow(2).sum()
        torch.testing.assert_close(energy.sum(), total, rtol=1e-12, atol=0)  # orthonormal P keeps all energy
        tail = tail_energy(energy, RANKS)
        ner = normalized_energy_ratio(energy, RANKS)
        for i, r in enumerate(RANKS):
            residual = x - x @ p[:, :r] @ p[:, :r].T
            direct_tail = residual.pow(2).sum()  # ||X - X P_r P_r^T||_F^2
            torch.testing.assert_close(tail[i], direct_tail, rtol=1e-9, atol=1e-12 * float(total))
            kept = (x @ p[:, :r]).pow(2).sum()
            torch.testing.assert_close(ner[i], kept / total, rtol=1e-12, atol=0)
            torch.testing.assert_close(ner[i], 1 - direct_tail / total, rtol=0, atol=1e-12)
        assert torch.all(ner[1:] >= ner[:-1]) and ner[-1] == pytest.approx(1.0) and tail[-1] == 0
        assert torch.all(tail >= 0) and torch.all(tail[1:] <= tail[:-1])


def test_tail_is_eckart_young_optimal_in_the_own_singular_basis():
    generator = torch.Generator().manual_seed(1)
    x = _anisotropic(50, 16, generator)
    own = torch.linalg.svd(x, full_matrices=False).Vh.T  # right singular vectors, by decreasing singular value
    sigma2 = torch.linalg.svdvals(x).pow(2)
    own_tail = tail_energy(energies((x @ own).T @ (x @ own)), RANKS)
    torch.testing.assert_close(own_tail, torch.stack([sigma2[r:].sum() for r in RANKS]), rtol=1e-9, atol=1e-12)
    for _ in range(10):
        p = _orthonormal(16, generator)
        other_tail = tail_energy(energies((x @ p).T @ (x @ p)), RANKS)
        assert torch.all(own_tail <= other_tail * (1 + 1e-12))


def test_batched_and_float32():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 30, 16, generator=generator)  # (..., N, d) float32
    gram = x.transpose(-1, -2) @ x
    energy = energies(gram)
    assert energy.shape == (3, 2, 16)
    ner, tail = normalized_energy_ratio(energy, RANKS), tail_energy(energy, RANKS)
    assert ner.shape == tail.shape == (3, 2, len(RANKS)) and ner.dtype == tail.dtype == torch.float32
    reference = energy.double()
    total = reference.sum(-1, keepdim=True)
    exact_tail = torch.stack([reference[..., r:].sum(-1) for r in RANKS], -1)
    # float32 prefix-sum differences: accurate relative to the total energy, not to a small tail
    torch.testing.assert_close(tail.double(), exact_tail, rtol=0, atol=float(1e-6 * total.max()))
    torch.testing.assert_close(ner.double(), 1 - exact_tail / total, rtol=0, atol=1e-6)


def test_zero_energy_gives_ner_one_and_zero_tail():
    energy = torch.zeros(2, 16)
    energy[1] = torch.linspace(1, 0, 16)  # one silent head next to a live one
    ner, tail = normalized_energy_ratio(energy, RANKS), tail_energy(energy, RANKS)
    assert torch.all(ner[0] == 1) and torch.all(tail[0] == 0)
    assert ner[1, 0] < 1 and ner[1, -1] == 1
    assert not torch.isnan(ner).any()
    assert torch.all(normalized_energy_ratio(torch.zeros(16, dtype=torch.float64), (1, 16)) == 1)


# --------------------------------------------------------------------------------------------------------- flops
# H = 4 query heads over H_kv = 2 KV heads (G = 2), d = 8, D = 32; a segment of T = 3 new tokens with L = 5 keys.
GEOMETRY = AttentionGeometry(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32)
T, L = 3, 5
PAIRS = 3 * 2 + 3 * 4 // 2  # T (L - T) + T (T + 1) / 2 = 6 + 6 = 12 live (query, key) pairs
PROJECTIONS = 2 * 3 * 32 * 4 * 8 + 2 * 3 * 32 * 4 * 8 + 2 * 3 * 32 * 2 * 8 + 2 * 3 * 32 * 2 * 8  # q, o, k, v = 18432
SOFTMAX = 5 * 4 * 12  # 240
VALUES = 2 * 4 * 12 * 8  # 768
PROJECTED_ROWS = 3 * 4 + 5 * 2  # T H query rows and L H_kv key rows go through the basis: 22
EIGH = 2 * 9 * 8**3  # one ~9 d^3 eigendecomposition per KV head: 9216


def test_causal_pairs():
    assert PAIRS == 12 and causal_pairs(T, L) == 12
    for t in range(1, 20):
        assert causal_pairs(t, t) == t * (t + 1) // 2
        for n_keys in range(t, 25):
            mask = torch.arange(n_keys)[None, :] <= torch.arange(t)[:, None] + (n_keys - t)
            assert causal_pairs(t, n_keys) == int(mask.sum())
    for bad in ((0, 5), (6, 5), (-1, 3), (3, 0)):
        with pytest.raises(ValueError, match="new_tokens"):
            causal_pairs(*bad)


def test_unmodified_baseline():
    assert PROJECTIONS == 18432
    flops = layer_flops(GEOMETRY, T, L, ranks=None)
    assert flops == AttentionFlops(projections=18432, scores=2 * 4 * 12 * 8, softmax=240, values=768, basis=0, statistics=0)
    assert flops.scores == 768 and flops.total == 18432 + 768 + 240 + 768


def test_uniform_rank():
    flops = layer_flops(GEOMETRY, T, L, ranks=3)
    assert flops.scores == 2 * 4 * 12 * 3 == 288  # 2 H P r
    assert flops.basis == 2 * 22 * 8 * 3 == 1056  # 2 (T H + L H_kv) d r
    assert flops == AttentionFlops(PROJECTIONS, 288, SOFTMAX, VALUES, 1056, 0)
    assert layer_flops(GEOMETRY, T, L, ranks=[3, 3]) == flops


def test_per_kv_head_ranks():
    flops = layer_flops(GEOMETRY, T, L, ranks=[2, 6])
    assert flops.scores == 2 * (2 * 12 * 2) + 2 * (2 * 12 * 6) == 384  # G * 2 P r_g per KV head
    assert flops.basis == 2 * 22 * 8 * 6 == 2112  # the prefix is taken at r_max = 6
    assert flops == AttentionFlops(PROJECTIONS, 384, SOFTMAX, VALUES, 2112, 0)


def test_statistics():
    flops = layer_flops(GEOMETRY, T, L, ranks=[2, 6], statistics=True)
    assert flops.basis == 2 * 22 * 8 * 8 == 2816  # full-width product when spectra are recorded
    assert flops.statistics == 2 * 22 * 8 * 8 == 2816  # the Grams 2 T H d^2 + 2 L H_kv d^2
    assert flops == AttentionFlops(PROJECTIONS, 384, SOFTMAX, VALUES, 2816, 2816)


def test_full_rank():
    baseline = layer_flops(GEOMETRY, T, L, ranks=None)
    for mode in ("calibrated", "exact"):
        assert layer_flops(GEOMETRY, T, L, ranks=8, basis_mode=mode) == baseline  # P is a rotation: basis term 0
    with_stats = layer_flops(GEOMETRY, T, L, ranks=8, statistics=True)
    assert with_stats == AttentionFlops(PROJECTIONS, 768, SOFTMAX, VALUES, 2816, 2816)


def test_exact_basis_with_statistics():
    flops = layer_flops(GEOMETRY, T, L, ranks=[2, 6], statistics=True, basis_mode="exact")
    # raw Grams for the eigh + full-width product + Grams of the projections, plus the eigh estimate
    assert flops == AttentionFlops(PROJECTIONS, 384, SOFTMAX, VALUES, 2816, 2816 + 2816 + EIGH)
    assert flops.statistics == 14848


def test_exact_basis_without_statistics():
    flops = layer_flops(GEOMETRY, T, L, ranks=[2, 6], basis_mode="exact")
    # raw Grams + eigh for the basis, then the product at r_max = 6 (lowrank.py slices the basis before projecting)
    assert flops == AttentionFlops(PROJECTIONS, 384, SOFTMAX, VALUES, 2 * 22 * 8 * 6, 2816 + EIGH)


def test_unknown_basis_mode():
    with pytest.raises(ValueError, match="unknown basis_mode"):
        layer_flops(GEOMETRY, T, L, ranks=[2, 6], basis_mode="exacts")


def test_invalid_ranks():
    for bad in ([2], [2, 6, 8], [0, 4], [4, 9], 0, 9):
        with pytest.raises(ValueError, match="ranks"):
            layer_flops(GEOMETRY, T, L, ranks=bad)


def test_attention_flops_arithmetic():
    a = AttentionFlops(1, 2, 3, 4, 5, 6)
    b = AttentionFlops(10, 20, 30, 40, 50, 60)
    assert a + b == AttentionFlops(11, 22, 33, 44, 55, 66)
    assert (a + b).total == 231 and a.total == 21
    assert a.as_dict() == dict(projections=1, scores=2, softmax=3, values=4, basis=5, statistics=6, total=21)
    layers = [layer_flops(GEOMETRY, T, L, ranks=r) for r in (None, 3, [2, 6])]
    assert sum(layers[1:], layers[0]).total == sum(f.total for f in layers)


def test_scores_match_an_explicit_masked_loop():
    """Compute the masked low-rank QK^T entry by entry, counting multiply-adds: 2 * pairs * r_g per query head."""
    generator = torch.Generator().manual_seed(3)
    d, group = GEOMETRY.head_dim, GEOMETRY.group_size
    basis = _orthonormal(d, generator)
    q = torch.randn(GEOMETRY.num_heads, T, d, generator=generator, dtype=torch.float64) @ basis
    k = torch.randn(GEOMETRY.num_kv_heads, L, d, generator=generator, dtype=torch.float64) @ basis
    for ranks in ([2, 6], [3, 3], [8, 8], [1, 8]):
        multiply_adds = 0
        scores = torch.full((GEOMETRY.num_heads, T, L), float("-inf"), dtype=torch.float64)
        for head in range(GEOMETRY.num_heads):
            kv, r = head // group, ranks[head // group]
            for i in range(T):
                for j in range(L):
                    if j > L - T + i:  # causal: query i sits at absolute position L - T + i
                        continue
                    acc = 0.0
                    for c in range(r):
                        acc += float(q[head, i, c]) * float(k[kv, j, c])
                        multiply_adds += 1
                    scores[head, i, j] = acc
        reference = torch.stack([q[h, :, : ranks[h // group]] @ k[h // group, :, : ranks[h // group]].T for h in range(GEOMETRY.num_heads)])
        live = scores > float("-inf")
        torch.testing.assert_close(scores[live], reference[live])
        assert int(live.sum()) == GEOMETRY.num_heads * PAIRS
        assert layer_flops(GEOMETRY, T, L, ranks=ranks).scores == 2 * multiply_adds
        assert 2 * multiply_adds == sum(2 * PAIRS * r for r in ranks for _ in range(group))


class _Layer(torch.nn.Module):
    layer_idx, is_causal, num_key_value_groups = 0, True, GEOMETRY.group_size


@pytest.mark.parametrize(
    "mode,statistics,ranks",
    [
        ("calibrated", False, [2, 6]),
        ("calibrated", False, [3, 3]),
        ("calibrated", True, [2, 6]),
        ("calibrated", True, [8, 8]),
        ("exact", True, [2, 6]),
        ("exact", True, [8, 8]),
        ("exact", False, [8, 8]),
        ("exact", False, [2, 6]),
    ],
)
def test_basis_and_statistics_terms_match_dynamic_rank_attention(monkeypatch, mode, statistics, ranks):
    """Count the matmul FLOPs DynamicRankAttention really performs outside the attention kernel (basis products and
    Grams; the eigh of exact mode has no FLOP formula in torch and is the module's one estimate, 9 d^3 per KV head)."""
    widths = []

    def kernel(module, query, key, value, attention_mask, **kwargs):  # stands in for SDPA, which is counted apart
        widths.append((query.shape[-1], key.shape[-1]))
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None

    monkeypatch.setattr(lowrank, "grouped_sdpa_forward", kernel)
    generator = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(1, 2, 8, 8, generator=generator))[0]
    q, k, v = (torch.randn(1, heads, n, 8, generator=generator) for heads, n in ((4, T), (2, L), (2, L)))
    controller = DynamicRankAttention(GEOMETRY, basis, mode=mode)
    controller.set_ranks(torch.tensor([[ranks]]))
    with FlopCounterMode(display=False) as counter, controller.recording(statistics=statistics):
        controller(_Layer(), q, k, v, None, scaling=8**-0.5)
    counted = counter.get_total_flops()
    expected = layer_flops(GEOMETRY, T, L, ranks=ranks, statistics=statistics, basis_mode=mode)
    eigh = EIGH if mode == "exact" and (statistics or min(ranks) < 8) else 0
    assert counted == expected.basis + expected.statistics - eigh
    assert widths == [(max(ranks), max(ranks))]  # the kernel gets the prefix at r_max (per-head ranks by zeroed q)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_grams_on_cuda_equal_the_float32_product(dtype):
    """Grams of bf16/fp16 statistics on CUDA (half-precision GEMM, float32 accumulation) against the float32
    product of the float32 copies: the same exact products, summed in another order."""
    x = torch.randn(2, 3, 1000, 64, device="cuda").to(dtype)
    gram = lowrank._gram(x)
    expected = x.float().transpose(-1, -2) @ x.float()
    assert gram.dtype == torch.float32 and gram.shape == (2, 3, 64, 64)
    torch.testing.assert_close(gram, expected, rtol=1e-5, atol=1e-3)


def test_cost_accounting_benchmark_writes_a_time_per_mode_and_size(tmp_path):
    """benchmarks/cost_accounting.py: one row per (mode, envs, keys), each with a positive time, in results.json."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from cost_accounting import main

    main(["--batch", "1", "3", "--keys", "128", "--repeats", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["mode"], r["batch"], r["keys"]) for r in rows] == [
        ("select", 1, 128), ("lowrank_scores", 1, 128), ("select", 3, 128), ("lowrank_scores", 3, 128)]
    assert all(r["ms_per_step"] > 0 for r in rows)

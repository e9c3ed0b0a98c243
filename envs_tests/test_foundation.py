"""Backbone loading, corpus splits, dynamic-rank attention (full-rank equivalence, rank prefixes) and bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import random_basis

from drrl_gym.bases import exact_basis
from drrl_gym.calibration import load_or_calibrate_basis
from drrl_gym.corpus import CorpusConfig, load_corpus
from drrl_gym.lowrank import DynamicRankAttention, validate_rank_choices


# ------------------------------------------------------------------------------------------- full-rank equivalence
@pytest.mark.parametrize("mode", ["calibrated", "exact"])
def test_full_rank_reproduces_logits_tiny(tiny_backbone, mode):
    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = tiny_backbone.model(tokens).logits
        attention = DynamicRankAttention(tiny_backbone.geometry, random_basis(tiny_backbone), mode=mode)
        with attention.attached(tiny_backbone.model):
            with attention.recording(statistics=True):  # forces the projection path (full rank without stats skips it)
                projected = tiny_backbone.model(tokens).logits
            shortcut = tiny_backbone.model(tokens).logits
        restored = tiny_backbone.model(tokens).logits
    assert (projected - reference).abs().max() <= 1e-4
    assert torch.equal(shortcut, reference)
    assert torch.equal(restored, reference)  # detach restores the model's own attention


@pytest.mark.slow
def test_full_rank_reproduces_logits_smollm2(smollm2):
    splits = load_corpus(smollm2.tokenizer, CorpusConfig(seq_len=128, calibration_sequences=4, eval_sequences=2))
    basis = load_or_calibrate_basis(smollm2, splits.calibration, splits.fingerprint)
    tokens = splits.eval[:1]
    with torch.no_grad():
        reference = smollm2.model(tokens).logits
        attention = DynamicRankAttention(smollm2.geometry, basis)
        with attention.attached(smollm2.model), attention.recording(statistics=True):
            projected = smollm2.model(tokens).logits
            attention.set_ranks(32)
            truncated = smollm2.model(tokens).logits
    # fp32 rounding only: logits reach ~30, and the model's own eager and SDPA paths differ by ~1e-4 at this size
    assert (projected - reference).abs().max() <= 2e-4
    assert (truncated - reference).abs().max() > 1e-2  # a real truncation changes the output


@pytest.mark.slow
def test_calibrated_basis_is_orthonormal_and_cached(smollm2):
    splits = load_corpus(smollm2.tokenizer, CorpusConfig(seq_len=128, calibration_sequences=4, eval_sequences=2))
    basis = load_or_calibrate_basis(smollm2, splits.calibration, splits.fingerprint)
    eye = torch.eye(smollm2.geometry.head_dim)
    assert basis.shape == (30, 3, 64, 64)
    assert torch.allclose(basis.transpose(-1, -2) @ basis, eye.expand_as(basis), atol=1e-5)
    assert torch.equal(load_or_calibrate_basis(smollm2, splits.calibration, splits.fingerprint), basis)


# -------------------------------------------------------------------------------------------- rank-prefix algebra
def _explicit_attention(query, key, value, basis, ranks, scaling):
    """softmax(s (Q P_r)(K P_r)^T + causal) V per head, head h using KV head h // G with that head's rank."""
    heads, kv_heads = query.shape[1], key.shape[1]
    group = heads // kv_heads
    n_q, n_k = query.shape[2], key.shape[2]
    causal = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)
    outs = []
    for h in range(heads):
        g = h // group
        p = basis[g][:, : ranks[g]]
        scores = scaling * (query[:, h] @ p) @ (key[:, g] @ p).transpose(-1, -2)
        weights = scores.masked_fill(~causal, -math.inf).softmax(-1)
        outs.append(weights @ value[:, g])
    return torch.stack(outs, dim=2)  # (B, T, H, d)


@pytest.mark.parametrize("ranks", [[3, 3], [2, 5], [8, 1]])
def test_rank_prefix_matches_explicit_low_rank_attention(ranks):
    from drrl_gym.backbone import AttentionGeometry

    geometry = AttentionGeometry(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32)
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(1, 2, 8, 8, generator=generator))[0]
    query = torch.randn(2, 4, 5, 8, generator=generator)
    key, value = torch.randn(2, 2, 9, 8, generator=generator), torch.randn(2, 2, 9, 8, generator=generator)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=2, is_causal=True, training=False)
    attention = DynamicRankAttention(geometry, basis)
    attention.set_ranks(torch.tensor([[ranks]]))
    # A KV cache offset (5 queries over 9 keys) needs an explicit mask, as transformers would pass.
    mask = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=4)[None, None].expand(2, 1, 5, 9)
    out, _ = attention(module, query, key, value, mask, scaling=8**-0.5)
    expected = _explicit_attention(query, key, value, basis[0], ranks, 8**-0.5)
    assert torch.allclose(out, expected, atol=1e-5)


def test_exact_basis_orders_eigenvectors_by_energy():
    x = torch.randn(200, 6) * torch.tensor([5.0, 1.0, 3.0, 0.1, 2.0, 0.5])
    basis = exact_basis(x.T @ x, torch.zeros(6, 6))
    energies = ((x @ basis) ** 2).sum(0)
    assert torch.all(energies[:-1] >= energies[1:])
    assert torch.allclose(basis.T @ basis, torch.eye(6), atol=1e-5)


# ------------------------------------------------------------------------------------------------------- frozen
def test_backbone_is_frozen_and_fp32_on_cpu(tiny_llama):
    # (that no step of an episode changes the weights or builds a graph: test_env's frozen-model test)
    assert not tiny_llama.model.training
    assert tiny_llama.dtype == torch.float32  # CPU default


# ------------------------------------------------------------------------------------------------------- corpus
def test_splits_are_deterministic_disjoint_and_fixed_length(tiny_llama):
    config = CorpusConfig("britannica-1911", seq_len=256, calibration_sequences=3, eval_sequences=5)
    a, b = load_corpus(tiny_llama.tokenizer, config), load_corpus(tiny_llama.tokenizer, config)
    assert a.calibration.shape == (3, 256) and a.eval.shape == (5, 256) and a.train.shape[1] == 256
    assert torch.equal(a.train, b.train) and torch.equal(a.eval, b.eval) and a.fingerprint == b.fingerprint
    rows = {tuple(r.tolist()) for split in (a.calibration, a.eval, a.train) for r in split}
    assert len(rows) == len(a.calibration) + len(a.eval) + len(a.train)  # no sequence in two splits


def test_local_text_corpus(tiny_llama, tmp_path):
    (tmp_path / "a.txt").write_text("It was the best of times, it was the worst of times. " * 200)
    splits = load_corpus(tiny_llama.tokenizer, CorpusConfig(str(tmp_path), seq_len=64, calibration_sequences=1, eval_sequences=1))
    assert splits.train.shape[1] == 64 and len(splits.train) >= 1


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "choices, message",
    [((), "empty"), ((0, 8), r"\[1, head_dim=16\]"), ((8, 17), r"\[1, head_dim=16\]"), ((8, 4), "strictly increasing"), ((4, 4), "strictly increasing")],
)
def test_rank_choices_are_validated(choices, message):
    with pytest.raises(ValueError, match=message):
        validate_rank_choices(choices, head_dim=16)
    assert validate_rank_choices([4, 8, 16], 16) == (4, 8, 16)


def test_bad_ranks_rejected(tiny_llama):
    attention = DynamicRankAttention(tiny_llama.geometry, random_basis(tiny_llama))
    with pytest.raises(ValueError, match="ranks must lie in"):
        attention.set_ranks(17)
    with pytest.raises(ValueError, match="shape"):
        attention.set_ranks(torch.ones(1, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="calibrated mode needs a basis"):
        DynamicRankAttention(tiny_llama.geometry, None)
    with pytest.raises(ValueError, match="unknown basis mode"):
        DynamicRankAttention(tiny_llama.geometry, None, mode="svd")


def test_missing_corpus_names_the_fix(tiny_llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="Fix"):
        load_corpus(tiny_llama.tokenizer, CorpusConfig(str(tmp_path / "missing-dir-or-dataset"), seq_len=64))


def test_corpus_shorter_than_the_splits_names_the_fix(tiny_llama, tmp_path):
    (tmp_path / "short.txt").write_text("Too short.")
    with pytest.raises(ValueError, match="(?s)sequences of seq_len=64.*Fix"):
        load_corpus(tiny_llama.tokenizer, CorpusConfig(str(tmp_path / "short.txt"), seq_len=64))


@pytest.mark.parametrize("kwargs", [dict(seq_len=1), dict(calibration_sequences=0), dict(corpus="")])
def test_corpus_config_validated(kwargs):
    with pytest.raises(ValueError):
        CorpusConfig(**kwargs)

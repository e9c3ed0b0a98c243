"""drrl_gym.policies (rule-based rank policies), drrl_gym.spectra.stable_rank, the projected-key cache of
DynamicRankAttention, layer_flops(key_cache=True), export of rule policies, drrl_gym.policy_metrics and the Pareto
benchmark's argument checks. Tiny random Llama on CPU, well under a minute in all."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_ENV as TINY
from conftest import random_basis
from transformers import DynamicCache

from drrl_gym.backbone import AttentionGeometry, load_backbone
from drrl_gym.calibration import load_or_calibrate_basis
from drrl_gym.env import DRRLAttentionEnv
from drrl_gym.export import (
    CONFIG_FILE,
    POLICY_FILE,
    ControllerSpec,
    build_dynamic_rank_model,
    export_dynamic_rank_model,
    load_dynamic_rank_model,
    load_exported_policy,
)
from drrl_gym.flops import causal_pairs, layer_flops
from drrl_gym.hf_compat import cache_argument
from drrl_gym.lowrank import DynamicRankAttention
from drrl_gym.observation import DecisionSpace
from drrl_gym.policies import (
    RULE_POLICIES,
    FullRank,
    NERThreshold,
    RandomRanks,
    RankPolicy,
    StableRankPolicy,
    StaticRanks,
    UniformRank,
    act_in_env,
    policy_from_config,
)
from drrl_gym.policy_metrics import measure_policies
from drrl_gym.spectra import stable_rank

GEOMETRY = AttentionGeometry(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64)
CHOICES = (4, 8, 12, 16)


def controller(granularity: str = "layer") -> DecisionSpace:
    return DecisionSpace(GEOMETRY, CHOICES, granularity, 32, 4)


def blank(c: DecisionSpace, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """An all-zero observation and an all-allowed mask."""
    return (np.zeros((batch, c.n_units, len(c.feature_names)), dtype=np.float32),
            np.ones((batch, c.n_units, len(c.rank_choices)), dtype=bool))


@pytest.fixture(scope="module")
def env() -> DRRLAttentionEnv:
    return DRRLAttentionEnv(**TINY)


@pytest.fixture(scope="module")
def basis(env: DRRLAttentionEnv) -> torch.Tensor:
    return load_or_calibrate_basis(env.backbone, env.corpus.calibration, env.corpus.fingerprint)


# ------------------------------------------------------------------------------------------------ stable rank
def psd(eigenvalues: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    d = eigenvalues.shape[-1]
    q = torch.linalg.qr(torch.randn(*eigenvalues.shape[:-1], d, d, generator=generator, dtype=torch.float64))[0]
    return (q * eigenvalues.unsqueeze(-2)) @ q.transpose(-1, -2)


def exact_stable_rank(gram: torch.Tensor) -> torch.Tensor:
    eig = torch.linalg.eigvalsh(gram.double())
    return eig.sum(-1) / eig[..., -1]


def test_stable_rank_matches_eigvalsh_for_a_separated_top_eigenvalue() -> None:
    generator = torch.Generator().manual_seed(0)
    d = 16
    eigenvalues = torch.rand(5, 3, d, generator=generator, dtype=torch.float64)  # in [0, 1)
    eigenvalues[..., 0] = 10.0  # well separated from the rest
    grams = psd(eigenvalues, generator)
    got, expected = stable_rank(grams.float()), exact_stable_rank(grams)
    assert got.shape == (5, 3)
    assert torch.allclose(got.double(), expected, rtol=1e-3)
    assert (got.double() >= expected * (1 - 1e-5)).all()  # may only err upwards


def test_stable_rank_only_errs_upwards_on_hard_spectra() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(20, 8, 16, generator=generator)  # Wishart: top eigenvalues close together
    grams = x.transpose(-1, -2) @ x
    got, expected = stable_rank(grams), exact_stable_rank(grams)
    assert (got.double() >= expected * (1 - 1e-4)).all()
    assert (got <= 16).all() and (got >= 1).all()
    # The diagonal start vector is orthogonal to the top eigenvector [1, -1]: power iteration cannot find it, and the
    # estimate must then land above the true stable rank 1.1 (the safe side), never below.
    adversarial = torch.tensor([[5.5, -4.5], [-4.5, 5.5]])
    assert float(exact_stable_rank(adversarial)) == pytest.approx(1.1)
    assert float(stable_rank(adversarial)) >= 1.1 - 1e-6


def test_stable_rank_special_grams_and_batched_shapes() -> None:
    generator = torch.Generator().manual_seed(2)
    v = torch.randn(4, 16, generator=generator)
    rank_one = v[:, :, None] * v[:, None, :]
    assert torch.allclose(stable_rank(rank_one), torch.ones(4), atol=1e-4)
    assert torch.allclose(stable_rank(torch.eye(16).expand(2, 3, 16, 16)), torch.full((2, 3), 16.0), atol=1e-4)
    zero = stable_rank(torch.zeros(2, 16, 16))
    assert torch.equal(zero, torch.ones(2))
    assert stable_rank(torch.eye(8)).shape == ()
    assert stable_rank(torch.zeros(2, 3, 4, 8, 8)).shape == (2, 3, 4)
    # float64 and half inputs are accepted (computed in float32)
    assert stable_rank(torch.eye(8, dtype=torch.float64)).dtype == torch.float32


# ----------------------------------------------------------------------------------------------- rule policies
@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
def test_static_rules(granularity: str) -> None:
    c = controller(granularity)
    observation, allowed = blank(c, batch=3)
    full = FullRank(c).act(observation, allowed)
    assert full.shape == (3, c.n_units) and full.dtype == np.int64 and (full == 3).all()
    uniform = UniformRank(c, 8).act(observation, allowed)
    assert uniform.dtype == np.int64 and (uniform == 1).all()
    ranks = [CHOICES[i % 4] for i in range(c.n_units)]
    static = StaticRanks(c, ranks).act(observation, allowed)
    assert static.shape == (3, c.n_units) and (c.choices[static] == np.array(ranks)).all()
    static[0, 0] = 99  # a copy, not a view of the policy's state
    assert StaticRanks(c, ranks).act(observation, allowed)[0, 0] != 99


def test_static_rules_reject_bad_ranks() -> None:
    c = controller("kv_head")  # 4 units
    with pytest.raises(ValueError, match="not one of the rank choices"):
        UniformRank(c, 5)
    with pytest.raises(ValueError, match="4 units"):
        StaticRanks(c, [4, 8, 12])
    with pytest.raises(ValueError, match="not one of the rank choices"):
        StaticRanks(c, [4, 8, 12, 7])
    with pytest.raises(ValueError):
        NERThreshold(c, 0.0)
    with pytest.raises(ValueError):
        NERThreshold(c, 1.5)


def test_ner_threshold_takes_the_smallest_rank_where_queries_and_keys_reach_tau() -> None:
    c = controller("kv_head")  # 4 units
    names = c.feature_names
    observation, allowed = blank(c)

    def put(token: int, stem: str, values: list[float]) -> None:
        for r, value in zip(CHOICES, values):
            observation[0, token, names.index(f"{stem}@{r}")] = value

    # unit 0: queries reach 0.9 at 8, keys only at 12 -> 12 (index 2)
    put(0, "query_ner", [0.5, 0.92, 0.95, 1.0])
    put(0, "key_ner", [0.95, 0.85, 0.91, 1.0])
    # unit 1: keys reach at 4, queries at 4 -> 4 (index 0)
    put(1, "query_ner", [0.9, 0.95, 0.99, 1.0])
    put(1, "key_ner", [0.97, 0.98, 0.99, 1.0])
    # unit 2: nothing reaches tau, not even the largest choice -> the largest (index 3)
    put(2, "query_ner", [0.1, 0.2, 0.3, 0.8])
    put(2, "key_ner", [0.9, 0.95, 0.99, 1.0])
    # unit 3: queries reach only at 16 -> index 3; a decoy in a non-NER column that reaches tau is ignored
    put(3, "query_ner", [0.3, 0.5, 0.89, 0.95])
    put(3, "key_ner", [1.0, 1.0, 1.0, 1.0])
    put(3, "query_log_tail", [1.0, 1.0, 1.0, 1.0])
    action = NERThreshold(c, 0.9).act(observation, allowed)
    assert action.dtype == np.int64 and action.tolist() == [[2, 0, 3, 3]]
    assert NERThreshold(c, 0.5).act(observation, allowed).tolist() == [[0, 0, 3, 1]]


def reference_alrt(signals: np.ndarray, previous: np.ndarray, d: int, choices: tuple[int, ...], safety: float,
                   ema: float, threshold: float, max_step: int) -> list[int]:
    """The documented update for one token, scalar by scalar. signals: (steps, 2) stable-rank fractions;
    previous: (steps,) r_{t-1} in ranks."""
    smoothed, out = float(d), []
    for (sq, sk), prev in zip(signals, previous):
        smoothed = ema * smoothed + (1 - ema) * safety * d * max(sq, sk)
        current = choices.index(int(prev))
        if abs(smoothed - prev) >= threshold:
            wanted = next((i for i, r in enumerate(choices) if r >= smoothed), len(choices) - 1)
            out.append(current + max(-max_step, min(max_step, wanted - current)))
        else:
            out.append(current)
    return out


def alrt_observation(c: DecisionSpace, sq: float, sk: float, prev_rank: np.ndarray) -> np.ndarray:
    observation, _ = blank(c, batch=prev_rank.shape[0])
    observation[..., c.feature_names.index("query_stable_rank")] = sq
    observation[..., c.feature_names.index("key_stable_rank")] = sk
    observation[..., c.feature_names.index("prev_rank_fraction")] = prev_rank / GEOMETRY.head_dim
    return observation


def test_stable_rank_controller_follows_the_documented_update_by_hand() -> None:
    c = controller()
    policy = StableRankPolicy(c, safety=1.5, ema=0.5, change_threshold=2.0, max_step=1)
    policy.reset(1)
    _, allowed = blank(c)
    prev, got = np.full((1, c.n_units), 16), []
    # m: 11 (->12, one step down), 8.5 (stay 12), 7.25 (->8), 6.625 (|6.6-8| < 2: stay 8),
    # then the signal jumps to full: 15.31 (wants 16, one step: 12), 19.66 (->16)
    for sq, sk in [(0.25, 0.125), (0.25, 0.125), (0.125, 0.25), (0.25, 0.0), (1.0, 0.2), (0.2, 1.0)]:
        action = policy.act(alrt_observation(c, sq, sk, prev), allowed)
        got.append(int(action[0, 0]))
        assert (action == action[0, 0]).all()
        prev = c.choices[action]
    assert got == [2, 2, 1, 1, 2, 3]


@pytest.mark.parametrize("max_step, threshold, ema", [(1, 2.0, 0.8), (2, 0.0, 0.3), (3, 5.0, 0.0)])
def test_stable_rank_controller_matches_a_reference_over_many_steps(max_step, threshold, ema) -> None:
    c = controller("kv_head")
    rng = np.random.default_rng(max_step)
    policy = StableRankPolicy(c, safety=1.2, ema=ema, change_threshold=threshold, max_step=max_step)
    batch, steps = 3, 12
    policy.reset(batch)
    signals = rng.random((steps, batch, c.n_units, 2)) * 0.8
    # r_{t-1} comes from the observation, as if a mask had projected: here a random choice each step
    previous = c.choices[rng.integers(0, 4, size=(steps, batch, c.n_units))]
    _, allowed = blank(c, batch)
    actions = []
    for t in range(steps):
        observation, _ = blank(c, batch)
        observation[..., c.feature_names.index("query_stable_rank")] = signals[t, ..., 0]
        observation[..., c.feature_names.index("key_stable_rank")] = signals[t, ..., 1]
        observation[..., c.feature_names.index("prev_rank_fraction")] = previous[t] / 16
        actions.append(policy.act(observation, allowed))
    actions = np.stack(actions)
    for b in range(batch):
        for token in range(c.n_units):
            expected = reference_alrt(signals[:, b, token], previous[:, b, token], 16, CHOICES, 1.2, ema, threshold,
                                      max_step)
            assert actions[:, b, token].tolist() == expected
    assert np.abs(actions - np.searchsorted(CHOICES, previous)).max() <= max_step
    # both directions happen
    moves = actions - np.searchsorted(CHOICES, previous)
    assert (moves > 0).any() and (moves < 0).any()


def test_stable_rank_controller_state_and_parameter_checks() -> None:
    c = controller()
    policy = StableRankPolicy(c)
    observation, allowed = blank(c, batch=2)
    with pytest.raises(RuntimeError, match="before reset"):
        policy.act(observation, allowed)
    policy.reset(3)
    with pytest.raises(RuntimeError, match="before reset"):  # another batch size than the reset one
        policy.act(observation, allowed)
    policy.reset(2)
    assert policy.act(observation, allowed).shape == (2, c.n_units)
    for bad in ({"safety": 0.0}, {"safety": -1.0}, {"ema": 1.0}, {"ema": -0.1}, {"change_threshold": -1.0},
                {"max_step": 0}, {"max_step": 1.5}):
        with pytest.raises(ValueError, match="out of range"):
            StableRankPolicy(c, **bad)


def test_random_ranks_allowed_and_reproducible() -> None:
    c = controller("kv_head")
    rng = np.random.default_rng(0)
    allowed = rng.random((5, c.n_units, 4)) < 0.5
    allowed[..., 3] |= ~allowed.any(-1)  # at least one allowed per token
    observation, _ = blank(c, batch=5)
    draws = [RandomRanks(c, seed=7).act(observation, allowed) for _ in range(2)]
    assert np.array_equal(*draws)
    for _ in range(20):
        draws.append(RandomRanks(c, seed=len(draws)).act(observation, allowed))
    stacked = np.stack(draws)
    assert allowed[np.arange(5)[:, None], np.arange(c.n_units)[None], stacked].all()
    everything = np.ones_like(allowed)
    spreader = RandomRanks(c, seed=3)
    spread = np.stack([spreader.act(observation, everything) for _ in range(10)])
    assert set(np.unique(spread)) == {0, 1, 2, 3}  # uses every choice
    one = RandomRanks(c, seed=5)
    first, second = one.act(observation, everything), one.act(observation, everything)
    assert not np.array_equal(first, second)  # draws continue


RULE_EXAMPLES = {
    "full_rank": lambda c: FullRank(c),
    "uniform_rank": lambda c: UniformRank(c, 12),
    "static_ranks": lambda c: StaticRanks(c, [4, 16, 8, 12]),
    "ner_threshold": lambda c: NERThreshold(c, 0.8),
    "stable_rank": lambda c: StableRankPolicy(c, safety=1.1, ema=0.6, change_threshold=1.0, max_step=2),
    "random": lambda c: RandomRanks(c, seed=11),
}


@pytest.mark.parametrize("kind", sorted(RULE_POLICIES))
def test_policy_from_config_round_trips(kind: str) -> None:
    c = controller("kv_head")
    policy = RULE_EXAMPLES[kind](c)
    assert isinstance(policy, RankPolicy) and policy.kind == kind
    config = json.loads(json.dumps(policy.config()))  # as stored in drrl_config.json
    rebuilt = policy_from_config(c, kind, config)
    assert type(rebuilt) is type(policy) and rebuilt.config() == policy.config()
    rng = np.random.default_rng(0)
    observation = rng.random((2, c.n_units, len(c.feature_names))).astype(np.float32)
    observation[..., c.feature_names.index("prev_rank_fraction")] = 1.0
    allowed = np.ones((2, c.n_units, 4), dtype=bool)
    policy.reset(2), rebuilt.reset(2)
    assert np.array_equal(policy.act(observation, allowed), rebuilt.act(observation, allowed))


def test_policy_from_config_rejects_unknown_kinds_and_parameters() -> None:
    c = controller()
    with pytest.raises(ValueError, match="unknown policy kind"):
        policy_from_config(c, "bogus", {})
    with pytest.raises(ValueError, match="unknown policy kind"):
        policy_from_config(c, "network", {})
    with pytest.raises(ValueError, match="bad parameters"):
        policy_from_config(c, "uniform_rank", {"rnk": 4})


def test_act_in_env_runs_rule_policies(env: DRRLAttentionEnv) -> None:
    c = env.decisions
    for policy in (NERThreshold(c, 0.9), StableRankPolicy(c), RandomRanks(c, seed=1), UniformRank(c, 8)):
        policy.reset(1)
        observation, _ = env.reset(options={"sequence_index": 0})
        for _ in range(2):
            action = act_in_env(policy, env, observation)
            assert action.shape == (env.n_units,) and action.dtype == np.int64
            assert ((0 <= action) & (action < len(env.rank_choices))).all()
            observation, _, terminated, _, info = env.step(action)
            assert not terminated
        if isinstance(policy, UniformRank):
            assert (np.asarray(info["ranks"]) <= 16).all()


# ------------------------------------------------------------------------------------------ projected-key cache
def run_segments(model, attention: DynamicRankAttention, tokens: torch.Tensor, ranks: list[torch.Tensor],
                 segment: int):
    cache, logits, stats = DynamicCache(config=model.config), [], []
    for s, r in enumerate(ranks):
        attention.set_ranks(r)
        with attention.recording(statistics=True) as recorded:
            logits.append(model(tokens[:, s * segment : (s + 1) * segment], **cache_argument(cache), use_cache=True).logits)
        stats.append(recorded.stats())
    return torch.cat(logits, 1), stats


def test_projected_key_cache_matches_reprojection() -> None:
    backbone = load_backbone("tiny-random-llama", "cpu")
    model, geometry, basis = backbone.model, backbone.geometry, random_basis(backbone)
    plain = DynamicRankAttention(geometry, basis)
    cached = DynamicRankAttention(geometry, basis, cache_projected_keys=True)
    tokens = torch.randint(0, model.config.vocab_size, (2, 36), generator=torch.Generator().manual_seed(0))
    ranks = [torch.full((1, 2, 2), 16), torch.tensor([[[4, 8], [16, 12]], [[8, 8], [4, 16]]]),
             torch.tensor([[[12, 4], [8, 8]], [[16, 16], [4, 12]]])]
    outputs = {}
    with torch.no_grad():
        for name, attention in (("plain", plain), ("cached", cached)):
            with attention.attached(model):
                outputs[name] = run_segments(model, attention, tokens, ranks, 12)
    (a, stats_a), (b, stats_b) = outputs["plain"], outputs["cached"]
    assert torch.allclose(a, b, atol=1e-4)
    for x, y in zip(stats_a, stats_b):
        assert (x.num_queries, x.num_keys) == (y.num_queries, y.num_keys)
        assert torch.allclose(x.query_gram, y.query_gram, rtol=1e-4, atol=1e-5)
        assert torch.allclose(x.key_gram, y.key_gram, rtol=1e-4, atol=1e-5)
    assert stats_b[-1].num_keys == 36 and cached._projected_keys[0].shape == (2, 2, 36, 16)

    with torch.no_grad(), cached.attached(model):
        cached.set_ranks(8)
        with pytest.raises(RuntimeError, match="start_sequence"):  # a new sequence without start_sequence()
            model(tokens[:, :12], **cache_argument(DynamicCache(config=model.config)), use_cache=True)
        cached.start_sequence()
        with pytest.raises(RuntimeError, match="start_sequence"):  # another batch size than the cached one
            model(tokens[:, :12], **cache_argument(DynamicCache(config=model.config)), use_cache=True)
            model(tokens[:1, :12], **cache_argument(DynamicCache(config=model.config)), use_cache=True)
        cached.start_sequence()
        again = model(tokens[:, :12], use_cache=False).logits
    with torch.no_grad(), plain.attached(model):
        plain.set_ranks(8)
        assert torch.allclose(again, model(tokens[:, :12], use_cache=False).logits, atol=1e-4)


def test_projected_key_cache_needs_the_calibrated_basis() -> None:
    with pytest.raises(ValueError, match="calibrated"):
        DynamicRankAttention(GEOMETRY, None, mode="exact", cache_projected_keys=True)
    DynamicRankAttention(GEOMETRY, None, mode="exact")  # fine without the cache


# ------------------------------------------------------------------------------------------------------- FLOPs
def test_layer_flops_with_key_cache_by_hand() -> None:
    t, keys, d, heads, kv_heads, group = 8, 24, 16, 4, 2, 2
    pairs = t * (keys - t) + t * (t + 1) // 2
    assert causal_pairs(t, keys) == pairs
    projections = 2 * t * 64 * d * (2 * heads + 2 * kv_heads)
    new_keys = 2 * t * kv_heads * d * d
    low = layer_flops(GEOMETRY, t, keys, [4, 8], statistics=False, key_cache=True)
    assert low.projections == projections
    assert low.scores == group * 2 * pairs * 4 + group * 2 * pairs * 8
    assert low.softmax == 5 * heads * pairs and low.values == 2 * heads * pairs * d
    assert low.basis == 2 * t * heads * d * 8 + new_keys
    assert low.statistics == new_keys
    recorded = layer_flops(GEOMETRY, t, keys, [4, 8], statistics=True, key_cache=True)
    assert recorded.basis == 2 * t * heads * d * d + new_keys
    assert recorded.statistics == 2 * t * heads * d * d + new_keys
    full = layer_flops(GEOMETRY, t, keys, 16, statistics=False, key_cache=True)
    assert full.basis == new_keys and full.statistics == new_keys  # keys are projected whatever the ranks
    assert full.scores == layer_flops(GEOMETRY, t, keys, None).scores
    # no term proportional to L beyond scores, softmax and values
    for statistics in (False, True):
        short = layer_flops(GEOMETRY, t, keys, [4, 8], statistics, key_cache=True)
        long = layer_flops(GEOMETRY, t, 2 * keys, [4, 8], statistics, key_cache=True)
        assert (short.projections, short.basis, short.statistics) == (long.projections, long.basis, long.statistics)
        assert long.scores > short.scores and long.softmax > short.softmax and long.values > short.values
        # without the cache, the basis work grows with L
        assert (layer_flops(GEOMETRY, t, 2 * keys, [4, 8], statistics).basis
                > layer_flops(GEOMETRY, t, keys, [4, 8], statistics).basis)
    with pytest.raises(ValueError, match="calibrated"):
        layer_flops(GEOMETRY, t, keys, [4, 8], basis_mode="exact", key_cache=True)


# ------------------------------------------------------------------------------------------ export of rule policies
def test_rule_policy_export_round_trip(env, basis, tmp_path) -> None:
    spec = ControllerSpec.from_env_config(env.config)
    tokens = env.corpus.eval[:2]
    for name, make in (("ner", lambda c: NERThreshold(c, 0.3)),  # tau where this tiny model's ranks vary
                       ("alrt", lambda c: StableRankPolicy(c, safety=1.0, ema=0.5, change_threshold=1.0))):
        policy = make(spec.controller(env.geometry))
        in_memory = build_dynamic_rank_model(load_backbone("tiny-random-llama", "cpu"), policy, basis, spec, env.config)
        path = export_dynamic_rank_model(tmp_path / name, env.backbone, policy, basis, env.config)
        config = json.loads((path / CONFIG_FILE).read_text())
        assert config["policy"] == {"kind": policy.kind, "params": policy.config()}
        assert not (path / POLICY_FILE).exists() and set(config["files"]) == {"basis.safetensors"}
        loaded = load_dynamic_rank_model(path, "cpu")
        assert type(loaded.drrl.policy) is type(policy) and loaded.drrl.policy.config() == policy.config()
        with torch.no_grad():
            a, b = in_memory(tokens).logits, loaded(tokens).logits
        assert torch.equal(a, b)
        assert len(loaded.drrl.rank_history) == 4
        assert all(torch.equal(x, y) for x, y in zip(in_memory.drrl.rank_history, loaded.drrl.rank_history))
        decided = torch.stack(loaded.drrl.rank_history[1:])
        assert decided.min() < 16  # not the trivial all-full-rank run
        if name == "ner":
            assert len(decided.unique()) > 1
    assert config["policy"]["kind"] == "stable_rank"
    assert json.loads((tmp_path / "ner" / CONFIG_FILE).read_text())["policy"]["kind"] == "ner_threshold"


# --------------------------------------------------------------------------------------------------- measuring
def test_measure_policies(env, basis) -> None:
    spec = replace(ControllerSpec.from_env_config(env.config), epsilon=None)
    long_spec = replace(spec, segment_len=64, seq_len=128)
    geometry = env.geometry
    c, c_long = spec.controller(geometry), long_spec.controller(geometry)
    model = build_dynamic_rank_model(load_backbone("tiny-random-llama", "cpu"), FullRank(c), basis, spec)
    sequences = env.corpus.eval[:2]
    methods = {"full": (FullRank(c), spec), "uniform4": (UniformRank(c, 4), spec),
               "ner": (NERThreshold(c, 0.9), spec), "uniform8_64": (UniformRank(c_long, 8), long_spec)}
    results = measure_policies(model, methods, sequences, batch_size=1, fidelity=True, progress=False)
    full, low, long = results["full"], results["uniform4"], results["uniform8_64"]
    assert full.fidelity == 1.0 and full.scores_flops_fraction == 1.0 and full.attention_flops_fraction == 1.0
    pairs = [causal_pairs(32, 32 * (s + 1)) for s in range(4)]
    expected = (pairs[0] * 16 + sum(p * 4 for p in pairs[1:])) / (sum(pairs) * 16)  # segment 0 at full rank
    assert low.scores_flops_fraction == pytest.approx(expected, rel=1e-12)
    long_pairs = [causal_pairs(64, 64), causal_pairs(64, 128)]
    assert long.scores_flops_fraction == pytest.approx((long_pairs[0] * 16 + long_pairs[1] * 8) / (sum(long_pairs) * 16),
                                                       rel=1e-12)
    assert low.attention_flops_fraction < 1.0
    assert 0 < low.fidelity < 1 and 0 < long.fidelity < 1 and 0 < results["ner"].fidelity <= 1
    assert all(np.isfinite(m.perplexity) and m.perplexity > 1 for m in results.values())
    assert low.mean_ranks.shape == (4, 2, 2) and (low.mean_ranks[0] == 16).all() and (low.mean_ranks[1:] == 4).all()
    assert long.mean_ranks.shape == (2, 2, 2) and low.rank_fraction == 0.25 and long.rank_fraction == 0.5
    # a static allocation never changes its choice; a single decision segment has nothing to compare
    assert low.switch_fraction == 0.0 and long.switch_fraction is None
    switching = measure_policies(model, {"random": (RandomRanks(c, seed=0), spec)}, sequences, fidelity=False,
                                 progress=False)["random"]
    assert 0.3 < switching.switch_fraction <= 1.0  # 4 rank choices drawn independently: about 3/4 change

    with pytest.raises(ValueError, match="FullRank"):
        measure_policies(model, {"uniform4": methods["uniform4"], "full": methods["full"]}, sequences, fidelity=True,
                         progress=False)
    without = measure_policies(model, {"uniform4": methods["uniform4"]}, sequences, fidelity=False, progress=False)
    assert without["uniform4"].fidelity is None
    assert without["uniform4"].perplexity == pytest.approx(low.perplexity, rel=1e-5)
    with pytest.raises(ValueError, match="multiple of segment_len"):
        measure_policies(model, methods, sequences[:, :100], fidelity=True, progress=False)


def test_exported_policy_loads_without_its_model_for_the_pareto_benchmark(env, basis, tmp_path) -> None:
    from benchmarks.pareto import learned_methods

    spec = replace(ControllerSpec.from_env_config(env.config), epsilon=2.0)
    policy = NERThreshold(spec.controller(env.geometry), 0.3)
    config = replace(env.config, epsilon_start=2.0, epsilon_end=2.0)
    export_dynamic_rank_model(tmp_path / "run" / "export", env.backbone, policy, basis, config)
    exported = load_exported_policy(tmp_path / "run" / "export")
    assert exported.spec == spec and exported.geometry == env.geometry and torch.equal(exported.basis, basis)
    assert isinstance(exported.policy, NERThreshold) and exported.policy.config() == policy.config()
    methods = learned_methods([tmp_path / "run" / "export"], basis)
    assert list(methods) == ["learned run", "learned run, mask off"]
    assert methods["learned run"][3].epsilon == 2.0 and methods["learned run, mask off"][3].epsilon is None
    with pytest.raises(ValueError, match="another basis"):
        learned_methods([tmp_path / "run" / "export"], basis + 1)


# ------------------------------------------------------------------------------------------ benchmark arguments
def test_pareto_parse_args_rejects_bad_arguments(tmp_path) -> None:
    from benchmarks.pareto import parse_args

    out = ["--out", str(tmp_path / "out")]
    args = parse_args([*out, "--seq-lens", "256", "512", "--segment-len", "64"])
    assert args.seq_lens == [256, 512] and args.segment_len == 64
    for bad in (["--seq-lens", "100", "--segment-len", "32"],  # not a multiple
                ["--seq-lens", "256", "200", "--segment-len", "64"],
                ["--seq-lens", "64", "--segment-len", "64"],  # one segment only
                ["--learned", str(tmp_path / "missing")],
                ["--allocation", str(tmp_path / "missing.json")],
                ["--segment-len", "0"],
                []):  # --out missing
        with pytest.raises(SystemExit):
            parse_args(bad + (out if bad else []))


# ------------------------------------------------------------------------------ Pareto: measured points only
def test_pareto_compares_learned_policies_with_measured_points_only() -> None:
    import benchmarks.pareto as pareto  # the repository root is on sys.path under `python -m pytest`

    def row(family, method, saved, increase):
        return pareto.Result(1024, family, method, None, 25.0, increase, None, saved, 0.0, 1.0, 1 - saved / 100)

    full = row("full rank", "full rank", 0.0, 0.0)
    static = [row("static greedy", "static greedy <= 90%", 10.0, 2.0), row("static greedy", "static greedy <= 80%", 20.0, 4.0)]
    uniform = [row("uniform", "uniform r=56", 12.5, 3.0)]
    # a convex static curve: interpolating 0%/+0% and 10%/+2% at 5% would give +1.0%, which 'learned between' beats
    learned = [row("learned", "learned equal", 10.0, 1.5), row("learned", "learned dominated", 9.0, 2.5),
               row("learned", "learned between", 5.0, 1.5), row("learned", "learned beyond", 30.0, 2.9)]
    lines = pareto.versus_measured([full, *static, *uniform, *learned])
    assert len(lines) == 4 and not any("interpolat" in line for line in lines)
    equal, dominated, between, beyond = lines
    assert "at equal cost static greedy <= 90%" in equal and "dominates static greedy <= 90%" in equal
    assert "saving more static greedy <= 90%" in dominated and "dominated by static greedy <= 90%" in dominated
    assert "saving less full rank" in between and "saving more static greedy <= 90%" in between
    assert "Static greedy, measured: saving less full rank (+0.00% saved, +0.00%); saving more static greedy <= 90% " \
           "(+10.00% saved, +2.00%): neither dominates" in between
    assert "saving less static greedy <= 80%" in beyond and "dominates static greedy <= 80%" in beyond
    assert "saving more" not in beyond.split("Uniform")[0]  # nothing measured saves more: one side only
    # uniform: measured ranks only (full rank and r=56), never an interpolated rank
    assert "Uniform, measured: saving less full rank (+0.00% saved, +0.00%); saving more uniform r=56" in equal
    assert "dominates uniform r=56" in beyond


def test_pareto_brackets_a_learned_cost_with_greedy_path_steps() -> None:
    import benchmarks.pareto as pareto  # the repository root is on sys.path under `python -m pytest`
    from drrl_gym.allocation import AllocationPath, AllocationStep

    ranks = [((8,), (8,)), ((4,), (8,)), ((4,), (4,))]  # fractions 1.0, 0.75, 0.5
    path = AllocationPath([AllocationStep(r, 1.0 + i, sum(x for (x,) in r) / 16) for i, r in enumerate(ranks)],
                          (4, 8), "layer", "tiny", 16)
    scale = 90.0  # measured saving of a path fraction f: 90 * (1 - f)
    assert pareto.bracketing_steps(path, 0.0, scale) == [0]
    assert pareto.bracketing_steps(path, 10.0, scale) == [0, 1]  # 10% lies between 0% and 22.5%
    assert pareto.bracketing_steps(path, 22.5, scale) == [1]  # equal cost: that step alone
    assert pareto.bracketing_steps(path, 30.0, scale) == [1, 2]
    assert pareto.bracketing_steps(path, 60.0, scale) == [2]  # beyond the path's end: its last step

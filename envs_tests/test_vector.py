"""The batched vector env: make_vec, equality with N single envs, same-step and next-step autoreset, the SB3 VecEnv
adapter.

Everything runs a tiny random Llama on the CPU in fp32, where one batched forward and N separate forwards differ
only in float summation order: observations, rewards and float infos agree to ~1e-6 (tolerance 1e-5 below), while
actions, masks, projections, ranks and sequence choices must agree exactly.
"""

from __future__ import annotations

import copy
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import TINY_ENV
from gymnasium.vector import AutoresetMode
from torch._dynamo.utils import counters

from drrl_gym.env import DRRLAttentionEnv
from drrl_gym.observation import FEATURE_GROUPS
from drrl_gym.training.sb3_vec_env import DRRLAttentionSB3VecEnv
from drrl_gym.vector import DRRLAttentionVecEnv

# Epsilon near the tiny model's median transition bound, so that masks both allow and reject (checked below).
TINY = dict(TINY_ENV, epsilon_start=0.05, epsilon_end=0.05)
N = 3
TOLERANCE = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_info_matches(batched: dict, row: int, single: dict) -> None:
    """Row ``row`` of gymnasium vector infos against one env's info: exact for ints/bools, close for floats."""
    assert {k for k in batched if not k.startswith("_") and not k.startswith("final_")} == set(single)
    for key, value in single.items():
        assert batched[f"_{key}"].all(), key
        got = batched[key][row]
        if key.endswith("_executed"):  # what ran depends on the batch: a layer runs at its rows' largest rank
            assert got <= single[key.removesuffix("_executed")] + TOLERANCE, key
            continue
        if np.asarray(value).dtype.kind == "f":
            np.testing.assert_allclose(got, value, rtol=0, atol=TOLERANCE, err_msg=key)
        else:
            assert np.array_equal(got, value), key


def test_make_vec_builds_the_batched_env() -> None:
    venv = gym.make_vec("DRRL-Attention-v0", num_envs=N, vectorization_mode="vector_entry_point", **TINY)
    assert isinstance(venv, DRRLAttentionVecEnv) and venv.num_envs == N
    assert venv.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    single = DRRLAttentionEnv(**TINY)
    assert venv.single_observation_space == single.observation_space
    assert venv.single_action_space == single.action_space
    assert venv.observation_space.shape == (N, single.observation_space.shape[0])
    assert venv.unit_shape == single.unit_shape == (2, 32)
    observation, info = venv.reset(seed=0)
    assert venv.observation_space.contains(observation) and info["segment"].tolist() == [0] * N
    assert venv.action_masks().shape == (N, 2 * 4)
    with pytest.raises(ValueError, match=r"actions must be \(num_envs=3, n_units=2\)"):
        venv.step(np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="render_mode='ansi'.*Fix"):
        DRRLAttentionVecEnv(num_envs=2, render_mode="ansi", **TINY)
    with pytest.raises(ValueError, match="num_envs=0.*Fix"):
        DRRLAttentionVecEnv(num_envs=0, **TINY)
    venv.close()


@pytest.mark.parametrize("granularity, fidelity", [("kv_head", "attention_cosine"), ("layer", "kl")])
def test_vector_env_equals_n_single_envs(granularity: str, fidelity: str) -> None:
    kwargs = dict(TINY, granularity=granularity, fidelity=fidelity)
    venv = DRRLAttentionVecEnv(num_envs=N, **kwargs)
    singles = [DRRLAttentionEnv(**kwargs) for _ in range(N)]
    observation, info = venv.reset(seed=42)
    for i, env in enumerate(singles):  # sub-env i is seeded seed + i, as gymnasium and SB3 seed theirs
        single_observation, single_info = env.reset(seed=42 + i)
        np.testing.assert_allclose(observation[i], single_observation, atol=TOLERANCE)
        assert_info_matches(info, i, single_info)
    rng = np.random.default_rng(0)
    steps_per_episode, rejections = 128 // 32 - 1, 0
    for step in range(2 * steps_per_episode):  # two episodes: the autoreset must draw what the single envs draw
        masks = venv.action_masks()
        for i, env in enumerate(singles):
            assert np.array_equal(masks[i], env.action_masks())
        actions = rng.integers(0, 4, size=(N, venv.n_units))
        observation, reward, terminated, truncated, info = venv.step(actions)
        results = [env.step(actions[i]) for i, env in enumerate(singles)]
        assert terminated.tolist() == [r[2] for r in results] == [step % steps_per_episode == 2] * N
        assert not truncated.any()
        np.testing.assert_allclose(reward, [r[1] for r in results], atol=TOLERANCE)
        # At the episode's end the step's own observation and info are in final_obs and final_info.
        step_info, step_observation = (info, observation)
        if terminated[0]:
            step_info, step_observation = info["final_info"], np.stack(info["final_obs"])
        for i, (single_observation, _, _, _, single_info) in enumerate(results):
            np.testing.assert_allclose(step_observation[i], single_observation, atol=TOLERANCE)
            assert_info_matches(step_info, i, single_info)
            rejections += single_info["mask_rejections"]
        if terminated[0]:  # same step: the vector env already returns the next episodes' first observations
            assert info["_final_obs"].all() and info["segment"].tolist() == [0] * N
            for i, env in enumerate(singles):
                single_observation, single_info = env.reset()
                np.testing.assert_allclose(observation[i], single_observation, atol=TOLERANCE)
                assert_info_matches(info, i, single_info)
    assert rejections > 0  # the masks did reject some actions, so projection was compared too


def test_next_step_autoreset_starts_the_new_episodes_one_step_later() -> None:
    """NEXT_STEP (RLlib's layout): the terminal step returns the last observations, the next step ignores its actions
    and returns what SAME_STEP returned at the terminal step; the episodes themselves are the same."""
    same = DRRLAttentionVecEnv(num_envs=2, **TINY)
    nxt = gym.make_vec("DRRL-Attention-v0", num_envs=2, vectorization_mode="vector_entry_point",
                       autoreset_mode=AutoresetMode.NEXT_STEP, **TINY)
    assert nxt.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP and same.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    np.testing.assert_array_equal(same.reset(seed=3)[0], nxt.reset(seed=3)[0])
    rng = np.random.default_rng(1)
    for _ in range(2):  # two episodes of 3 steps
        for step in range(3):
            actions = rng.integers(0, 4, size=(2, nxt.n_units))
            s_obs, s_reward, s_term, _, s_info = same.step(actions)
            n_obs, n_reward, n_term, n_trunc, n_info = nxt.step(actions)
            np.testing.assert_array_equal(s_reward, n_reward)
            assert s_term.tolist() == n_term.tolist() == [step == 2] * 2 and not n_trunc.any()
            assert "final_obs" not in n_info
            np.testing.assert_array_equal(np.stack(s_info["final_obs"]) if step == 2 else s_obs, n_obs)
        n_obs, n_reward, n_term, n_trunc, n_info = nxt.step(rng.integers(0, 4, size=(2, nxt.n_units)))  # the reset step
        np.testing.assert_array_equal(s_obs, n_obs)
        assert n_reward.tolist() == [0, 0] and not n_term.any() and not n_trunc.any()
        assert n_info["segment"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="autoreset_mode=<AutoresetMode.DISABLED.*Fix"):
        DRRLAttentionVecEnv(num_envs=2, autoreset_mode=AutoresetMode.DISABLED, **TINY)


def test_probe_per_env_equals_single_env_probe() -> None:
    venv = DRRLAttentionVecEnv(num_envs=2, **TINY)
    singles = [DRRLAttentionEnv(**TINY) for _ in range(2)]
    venv.reset(seed=5)
    for i, env in enumerate(singles):
        env.reset(seed=5 + i)
    candidates = np.repeat(np.arange(4)[:, None], venv.n_units, axis=1)
    probed = venv.probe_layer_fidelity(candidates)
    assert probed.shape == (2, 4, venv.n_units)
    for i, env in enumerate(singles):
        np.testing.assert_allclose(probed[i], env.probe_layer_fidelity(candidates), atol=TOLERANCE)
    assert venv.call("probe_layer_fidelity", candidates)[1].shape == (4, venv.n_units)


# ------------------------------------------------------------------------------------------ SB3 adapter
def test_sb3_adapter_autoresets_in_the_same_step_with_terminal_observation() -> None:
    from stable_baselines3.common.vec_env import VecCheckNan

    env = DRRLAttentionSB3VecEnv.make(N, **TINY)
    singles = [DRRLAttentionEnv(**TINY) for _ in range(N)]
    env.seed(7)
    checked = VecCheckNan(env, raise_exception=True)  # raises on any NaN/inf in observations, rewards or actions
    observation = checked.reset()
    assert [info["sequence_index"] for info in env.reset_infos] == [s.reset(seed=7 + i)[1]["sequence_index"]
                                                                   for i, s in enumerate(singles)]
    for step in range(3):
        actions = np.stack([s.action_space.sample() for s in singles])
        observation, reward, done, infos = checked.step(actions)
        results = [s.step(actions[i]) for i, s in enumerate(singles)]
        assert reward.dtype == np.float32 and len(infos) == N and all(not i["TimeLimit.truncated"] for i in infos)
        assert done.tolist() == [step == 2] * N
    for i, (info, single) in enumerate(zip(infos, singles, strict=True)):
        np.testing.assert_allclose(info["terminal_observation"], results[i][0], atol=TOLERANCE)
        np.testing.assert_allclose(info["fidelity"], results[i][4]["fidelity"], atol=TOLERANCE)
        first, reset_info = single.reset()  # the new episode, drawn from sub-env i's own RNG
        np.testing.assert_allclose(observation[i], first, atol=TOLERANCE)
        assert env.reset_infos[i]["sequence_index"] == reset_info["sequence_index"]


def test_sb3_adapter_attributes_and_methods() -> None:
    env = DRRLAttentionSB3VecEnv(DRRLAttentionVecEnv(num_envs=N, **TINY))
    env.reset()
    masks = env.env_method("action_masks")
    assert isinstance(masks, list) and len(masks) == N and all(m.shape == (2 * 4,) and m.dtype == bool for m in masks)
    assert np.array_equal(np.stack(masks), env.venv.action_masks())
    assert [m.shape for m in env.env_method("action_masks", indices=[0, 2])] == [(8,), (8,)]
    assert env.has_attr("action_masks") and env.has_attr("transition_bounds") and not env.has_attr("no_such_thing")
    assert env.get_attr("unit_shape") == [(2, 32)] * N and env.unit_shape == (2, 32)
    assert env.get_attr("transition_bounds", indices=1)[0].shape == (2, 4)
    assert env.env_is_wrapped(gym.Wrapper) == [False] * N
    env.set_attr("custom_flag", 3)
    assert env.get_attr("custom_flag") == [3] * N
    with pytest.raises(ValueError, match="share their attributes.*Fix"):
        env.set_attr("custom_flag", 4, indices=[0])
    with pytest.raises(RuntimeError, match="step_async"):
        env.step_wait()
    env.close()


def test_maskable_ppo_learns_on_the_batched_env() -> None:
    from sb3_contrib import MaskablePPO
    from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported

    env = DRRLAttentionSB3VecEnv.make(2, granularity="kv_head", **TINY)
    env.reset()
    assert is_masking_supported(env) and get_action_masks(env).shape == (2, 4 * 4)
    model = MaskablePPO("MlpPolicy", env, n_steps=6, batch_size=6, n_epochs=1, seed=0)
    model.learn(total_timesteps=12)  # two rollouts of 6 steps x 2 envs: crosses episode ends and autoresets
    assert model.num_timesteps == 12


# ------------------------------------------------------------------------------------------ CUDA graphs
@pytest.mark.parametrize("attention", ["lowrank_scores", "select"])
def test_static_ranks_give_the_same_forward_as_set_ranks(attention: str) -> None:
    """The rank-independent path CUDA graphs capture (full width, zero masks; in selection mode the settings read on
    the device) computes what slicing (and the host settings) compute."""
    venv = DRRLAttentionVecEnv(num_envs=2, attention=attention, **TINY)
    venv.reset(seed=3)
    chosen = np.array([[0, 3], [1, 2]]) if attention == "lowrank_scores" else np.array([[0, 7], [5, 12]])
    batch, ranks = venv.batch, venv.decisions.layer_ranks(chosen)
    batch.attention.set_keep(venv.decisions.layer_keeps(chosen))
    tokens, results = batch._segment_tokens(1), []
    for static in (False, True):
        cache = copy.deepcopy(batch.episode.cache)
        if static:
            batch.attention.set_static_ranks(ranks, torch.device("cpu"))
        with torch.inference_mode():
            results.append(batch._forward(cache, tokens, None if static else ranks, statistics=True, outputs=True))
    (eager, eager_stats), (static, static_stats) = results
    torch.testing.assert_close(static.hidden, eager.hidden, atol=1e-5, rtol=0)
    for a, b in zip(static.attention, eager.attention, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(static_stats.query_gram, eager_stats.query_gram, atol=1e-4, rtol=1e-5)
    if attention == "select":
        assert batch.attention._static  # the settings were read on the device
        torch.testing.assert_close(static_stats.selection_bound, eager_stats.selection_bound, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_step_matches_the_eager_one() -> None:
    """compile=True (torch.compile of the low-rank step) gives the uncompiled step's results, over two episodes of
    more segments than torch's recompile limit, with one compilation: the key count is symbolic from the start, so
    every segment reuses it (a compilation per segment, or a second one once the key count changes, fails here)."""
    kwargs = dict(TINY, seq_len=10 * TINY["segment_len"])  # 9 steps an episode
    compiled = DRRLAttentionVecEnv(num_envs=N, compile=True, **kwargs)
    eager = DRRLAttentionVecEnv(num_envs=N, compile=False, **kwargs)
    assert compiled.batch._compiled and not eager.batch._compiled
    rng = np.random.default_rng(4)
    for env in (compiled, eager):
        env.reset(seed=2)
    torch._dynamo.reset()  # no compilations of earlier tests count against the limit
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for _ in range(2 * 9):
            assert np.array_equal(compiled.action_masks(), eager.action_masks())
            actions = rng.integers(0, 4, size=(N, compiled.n_units))
            (obs_c, reward_c, *_), (obs_e, reward_e, *_) = compiled.step(actions), eager.step(actions)
            np.testing.assert_allclose(obs_c, obs_e, atol=TOLERANCE)
            np.testing.assert_allclose(reward_c, reward_e, atol=TOLERANCE)
    # Each further batch size compiles code of its own: with the batch axis left to torch, the second size would
    # recompile it as symbolic and the third would reuse that code (one compilation for the two, not two).
    compilations = counters["stats"]["unique_graphs"]
    for n in (N + 1, N + 2):
        env = DRRLAttentionVecEnv(num_envs=n, compile=True, **kwargs)
        env.reset(seed=3)
        env.step(np.zeros((n, env.n_units), dtype=np.int64))
    assert counters["stats"]["unique_graphs"] - compilations == 2


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("bound_source", ["agent", "reference"])
def test_compiled_selection_step_matches_the_eager_one(bound_source: str) -> None:
    """Selection mode compiles too, in one piece: its keys are chosen without a sort or a host synchronisation
    (drrl_gym.row_threshold), and its settings are read on the device. One compilation serves every segment of two
    episodes (fullgraph would fail on a graph break, the recompile limit on a second compilation), with the bound
    table recorded by the step or read from the reference."""
    kwargs = dict(TINY, attention="select", seq_len=4 * TINY["segment_len"], bound_source=bound_source)
    compiled = DRRLAttentionVecEnv(num_envs=N, compile=True, **kwargs)
    eager = DRRLAttentionVecEnv(num_envs=N, compile=False, **kwargs)
    rng = np.random.default_rng(5)
    for env in (compiled, eager):
        env.reset(seed=2)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for _ in range(2 * 3):
            assert np.array_equal(compiled.action_masks(), eager.action_masks())
            actions = rng.integers(0, compiled.batch.decisions.n_choices, size=(N, compiled.n_units))
            (obs_c, reward_c, *_), (obs_e, reward_e, *_) = compiled.step(actions), eager.step(actions)
            np.testing.assert_allclose(obs_c, obs_e, atol=TOLERANCE)
            np.testing.assert_allclose(reward_c, reward_e, atol=TOLERANCE)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.mark.gpu
@pytest.mark.parametrize("fidelity, features, compiled, attention, bound_source", [
    ("attention_cosine", FEATURE_GROUPS[:3], True, "lowrank_scores", "agent"),
    ("kl", FEATURE_GROUPS, False, "lowrank_scores", "agent"), ("attention_cosine", FEATURE_GROUPS, False, "select", "agent"),
    ("attention_cosine", FEATURE_GROUPS, True, "select", "reference")])
def test_cuda_graphs_match_the_eager_forward(fidelity: str, features: tuple[str, ...], compiled: bool,
                                             attention: str, bound_source: str) -> None:
    kwargs = dict(TINY, device="cuda", dtype="float32", fidelity=fidelity, observation_features=features,
                  attention=attention, bound_source=bound_source)
    # With compile, a second batch size in the same process compiles its own step and captures its own graphs.
    for n in (N, N + 1) if compiled else (N,):
        graphed = DRRLAttentionVecEnv(num_envs=n, compile=compiled, **kwargs)
        eager = DRRLAttentionVecEnv(num_envs=n, cuda_graphs=False, compile=False, **kwargs)
        assert graphed.batch._graphs is not None and eager.batch._graphs is None
        assert graphed.batch._compiled == compiled
        rng = np.random.default_rng(1)
        for env in (graphed, eager):
            env.reset(seed=9)
        for _ in range(2 * 3 + 1):  # every segment's graph captured, then replayed in the next episode
            assert np.array_equal(graphed.action_masks(), eager.action_masks())
            actions = rng.integers(0, graphed.batch.decisions.n_choices, size=(n, graphed.n_units))
            (obs_g, reward_g, *_), (obs_e, reward_e, *_) = graphed.step(actions), eager.step(actions)
            np.testing.assert_allclose(obs_g, obs_e, atol=1e-4)
            np.testing.assert_allclose(reward_g, reward_e, atol=1e-4)
        assert graphed.batch._graphs is not None and sorted(graphed.batch._graphs.graphs) == [1, 2, 3]
    candidates = np.repeat(np.arange(4)[:, None], graphed.n_units, axis=1)
    probed = graphed.probe_layer_fidelity(candidates)
    np.testing.assert_allclose(probed, eager.probe_layer_fidelity(candidates), atol=1e-4)

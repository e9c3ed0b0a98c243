"""drrl_gym.training and agents/train_ppo.py: features extractor, configuration, oracle and behaviour cloning, the
training script end to end (BC, PPO, checkpoints, export, evaluation) and resuming from a checkpoint. Tiny random
Llama; the fast tests (-m "not slow") take seconds, the training runs well under a minute."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ENV
from omegaconf import OmegaConf
from sb3_contrib import MaskablePPO
from stable_baselines3 import PPO

from agents.train_ppo import main, resolve_config
from drrl_gym.env import DRRLAttentionEnv
from drrl_gym.training.config import ConfigError, TrainConfig
from drrl_gym.training.evaluation import NEIGHBOUR
from drrl_gym.training.extractor import TransformerFeaturesExtractor, policy_network_from_sb3
from drrl_gym.training.oracle import behaviour_clone, collect_demonstrations, oracle_action

TINY_RUN = [
    "env.model=tiny-random-llama", "env.rank_choices=[4, 8, 12, 16]", "env.seq_len=128", "env.segment_len=32",
    "env.calibration_sequences=2", "env.eval_sequences=2", "env.device=cpu", "ppo.device=cpu", "ppo.n_steps=8",
    "ppo.batch_size=8", "ppo.n_epochs=2", "total_timesteps=32", "eval_freq=16", "checkpoint_freq=16", "bc.episodes=2",
    "bc.epochs=5", "evaluate.eval_sequences=2", "evaluate.batch_size=2", "progress_bar=false",
]


def sets(*assignments: str) -> list[str]:
    return [arg for assignment in assignments for arg in ("--set", assignment)]


@pytest.fixture(scope="module")
def env() -> DRRLAttentionEnv:
    return DRRLAttentionEnv(**TINY_ENV)


# -------------------------------------------------------------------------------------------------- extractor
@pytest.mark.parametrize("granularity, n_units", [("layer", 2), ("kv_head", 4)])
def test_extractor_shapes_and_policy(granularity: str, n_units: int) -> None:
    env = DRRLAttentionEnv(**TINY_ENV, granularity=granularity)
    n_features = env.unit_shape[1]
    extractor = TransformerFeaturesExtractor(env.observation_space, env.unit_shape, d_model=32, n_heads=4, n_layers=1)
    assert extractor.features_dim == n_units * 32
    observations = torch.rand(5, n_units * n_features, requires_grad=True)  # flat, as the env gives them
    features = extractor(observations)
    assert features.shape == (5, n_units * 32)
    features.sum().backward()
    assert observations.grad.abs().sum() > 0
    # Tokens attend to each other: changing one token's features changes every token's output.
    changed = observations.detach().clone()
    changed[:, :n_features] += 1
    delta = (extractor(changed) - features).detach().view(5, n_units, 32).abs().sum(-1)
    assert (delta > 0).all()

    model = MaskablePPO("MlpPolicy", env, n_steps=8, batch_size=8, device="cpu", policy_kwargs=dict(
        features_extractor_class=TransformerFeaturesExtractor,
        features_extractor_kwargs=dict(unit_shape=env.unit_shape, d_model=16, n_heads=2)))
    observation, _ = env.reset(seed=0)
    action, _ = model.predict(observation, action_masks=env.action_masks(), deterministic=True)
    assert action.shape == (n_units,)
    network = policy_network_from_sb3(model.policy)  # the exportable copy decides exactly like SB3
    allowed = env.action_masks().reshape(1, n_units, -1)
    assert np.array_equal(network.act(observation.reshape(1, *env.unit_shape), allowed)[0], action)


def test_extractor_needs_the_token_shape(env: DRRLAttentionEnv) -> None:
    with pytest.raises(ValueError, match="unit_shape"):
        TransformerFeaturesExtractor(env.observation_space)
    with pytest.raises(ValueError, match="unit_shape"):
        TransformerFeaturesExtractor(env.observation_space, (3, 7))


# ----------------------------------------------------------------------------------------------------- config
def test_default_yaml_documents_exactly_the_dataclass_defaults() -> None:
    documented = OmegaConf.to_container(OmegaConf.load(Path("agents/configs/default.yaml")))
    assert documented == OmegaConf.to_container(OmegaConf.structured(TrainConfig))


def test_config_overrides_and_errors(tmp_path: Path) -> None:
    config = resolve_config(None, ["ppo.learning_rate=1e-4", "env.rank_choices=[8, 16]", "bc.epochs=2"], seed=7,
                            skip_bc=True)
    assert config.ppo["learning_rate"] == 1e-4 and config.env["rank_choices"] == [8, 16]
    assert config.seed == 7 and config.skip_bc and not config.skip_ppo and config.bc.epochs == 2
    gpu = resolve_config(Path("agents/configs/gpu.yaml"), [])
    assert gpu.env["seq_len"] == 1024 and gpu.ppo["gamma"] == 0.99  # inherits what gpu.yaml leaves out
    bad = {
        "ppo.n_stepz=3": "did you mean 'ppo.n_steps'",
        "n_envs=two": "must be of type int",
        "bc.fidelity_target=1.5": r"must be in \(0, 1\]",
        "env.segment_len=100": "segment_len",
        "ppo.use_sde=true": "not an argument of MaskablePPO",
        "policy_kwargs.activation_fn=sigmoid": "exportable",
        "evaluate.eval_sequences=10": "env.eval_sequences",
        "oops": "expected key.sub=value",
    }
    for assignment, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            resolve_config(None, [assignment])
    (tmp_path / "bad.yaml").write_text("bc:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key 'bc.epochz'"):
        resolve_config(tmp_path / "bad.yaml", [])
    assert resolve_config(None, ["env.epsilon_start=.inf", "env.epsilon_end=.inf", "ppo.use_sde=false"]).ppo["use_sde"] is False


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    """config.yaml of a run is what --resume reads back: it must load to the same tree."""
    config = resolve_config(None, ["env.rank_choices=[8, 16]", "rllib.hidden=[32]"], seed=5)
    (tmp_path / "config.yaml").write_text(config.to_yaml())
    assert resolve_config(tmp_path / "config.yaml") == config


# ------------------------------------------------------------------------------------------- oracle and BC
def test_oracle_respects_target_and_mask(env: DRRLAttentionEnv) -> None:
    env.reset(seed=0)
    cosine = env.probe_layer_fidelity(np.repeat(np.arange(4)[:, None], env.n_units, axis=1))
    assert cosine.shape == (4, env.n_units)
    allowed = env.action_masks().reshape(env.n_units, 4)
    lowest = oracle_action(env, fidelity_target=1e-6)  # every choice reaches it: the smallest allowed one
    assert np.array_equal(lowest, allowed.argmax(axis=1))
    highest = oracle_action(env, fidelity_target=1.01)  # no cosine reaches it: the largest choice
    assert (highest == 3).all()
    demos = collect_demonstrations(env, episodes=2, fidelity_target=0.99, gamma=0.9, seed=0, progress=False)
    assert demos.observations.shape == (6, *env.observation_space.shape)
    assert demos.actions.shape == (6, env.n_units) and demos.masks.shape == (6, env.n_units * 4)
    assert demos.masks.reshape(6, env.n_units, 4)[np.arange(6)[:, None], np.arange(env.n_units), demos.actions].all()
    assert np.allclose(demos.returns[2::3], demos.rewards[2::3])  # last step of an episode: return = reward
    assert np.allclose(demos.returns[1::3], demos.rewards[1::3] + 0.9 * demos.rewards[2::3])


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", [MaskablePPO, PPO])
def test_behaviour_cloning_fits_the_oracle(algorithm) -> None:
    # A tight mask and a target every rank reaches: the oracle takes the smallest allowed rank, a function of the
    # observation (its transition-bound features) that the policy can fit exactly.
    env = DRRLAttentionEnv(**TINY_ENV, epsilon_start=0.05, epsilon_end=0.05)
    demos = collect_demonstrations(env, episodes=2, fidelity_target=1e-6, gamma=0.99, seed=1, progress=False)
    assert len({tuple(a) for a in demos.actions}) > 1
    model = algorithm("MlpPolicy", env, n_steps=8, batch_size=8, device="cpu", seed=0, policy_kwargs=dict(
        features_extractor_class=TransformerFeaturesExtractor,
        features_extractor_kwargs=dict(unit_shape=env.unit_shape, d_model=16, n_heads=2)))
    metrics = behaviour_clone(model, demos, epochs=80, batch_size=4, learning_rate=3e-3, value_coef=0.5, seed=0, progress=False)
    assert metrics["bc/accuracy"] == 1.0 and metrics["bc/cross_entropy"] < 0.2


# -------------------------------------------------------------------------------------------- training script
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One short run of the script (BC + 32 PPO steps + export + evaluation) that the tests below inspect."""
    path = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["--run-dir", str(path), "--seed", "3", *sets(*TINY_RUN)]) == path
    return path


@pytest.mark.slow
def test_short_training_run_writes_everything(run_dir: Path) -> None:
    for name in ("config.yaml", "bc_model.zip", "model.zip", "checkpoints/ppo_16_steps.zip", "checkpoints/ppo_32_steps.zip",
                 "export/drrl_config.json", "export/policy.safetensors", "export/basis.safetensors",
                 "eval/results.csv", "eval/results.json", "eval/results.png", "eval/results.md"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "logs" / "train").glob("events.out.tfevents.*"))
    assert MaskablePPO.load(run_dir / "model.zip").num_timesteps == 32
    rows = {row["method"]: row for row in csv.DictReader(open(run_dir / "eval" / "results.csv"))}
    measured = {"full rank", "uniform r=4", "uniform r=8", "uniform r=12", "learned policy"}
    assert measured <= set(rows)
    # The policy's neighbours are copies of measured rows on the right side of its FLOPs, never interpolated.
    policy = rows["learned policy"]
    neighbours = [name for name in rows if NEIGHBOUR in name]
    assert len(set(rows) - measured) == len(neighbours) >= 2
    for name in neighbours:
        source, row = rows[name.split(f" {NEIGHBOUR}")[0]], rows[name]
        assert {k: row[k] for k in ("rank", "perplexity", "fidelity")} == {k: source[k] for k in ("rank", "perplexity", "fidelity")}
        key = "scores_flops_fraction" if "QK^T" in name else "attention_flops_fraction"
        saves_more = float(row[key]) <= float(policy[key])
        assert saves_more == ("saves more" in name), name
    assert float(rows["full rank"]["fidelity"]) == 1.0 and float(rows["full rank"]["scores_flops_reduction_pct"]) == 0.0
    assert float(rows["uniform r=4"]["scores_flops_reduction_pct"]) > float(rows["uniform r=12"]["scores_flops_reduction_pct"])
    meta = json.loads((run_dir / "eval" / "results.json").read_text())["meta"]
    assert meta["eval_tokens"] == 2 * 128 and meta["model"] == "tiny-random-llama"


@pytest.mark.slow
def test_evaluating_the_sb3_zip_matches_the_export(run_dir: Path, tmp_path: Path) -> None:
    from agents.evaluate import main as evaluate

    rows = {row.method: row for row in evaluate([str(run_dir / "model.zip"), "--eval-sequences", "2", "--batch-size", "2",
                                                 "--device", "cpu", "--out", str(tmp_path)])}
    exported = {row["method"]: row for row in csv.DictReader(open(run_dir / "eval" / "results.csv"))}
    for method in ("full rank", "uniform r=8", "learned policy"):
        assert rows[method].perplexity == pytest.approx(float(exported[method]["perplexity"]), rel=1e-6)
        assert rows[method].scores_flops_fraction == pytest.approx(float(exported[method]["scores_flops_fraction"]))


@pytest.mark.slow
def test_evaluation_perplexity_matches_segmented_perplexity(run_dir: Path) -> None:
    from drrl_gym.backbone import load_backbone
    from drrl_gym.export import load_dynamic_rank_model
    from drrl_gym.perplexity import segmented_perplexity
    from drrl_gym.training.evaluation import evaluate_model

    model = load_dynamic_rank_model(run_dir / "export", "cpu")
    sequences = DRRLAttentionEnv(**TINY_ENV).corpus.eval
    rows = {row.method: row for row in evaluate_model(model, sequences, batch_size=2, progress=False)}
    reference = segmented_perplexity(load_backbone("tiny-random-llama", "cpu"), sequences, 32, progress=False)
    assert rows["full rank"].perplexity == pytest.approx(reference, rel=1e-5)
    for name, row in rows.items():  # neighbours repeat their measured row, latency included
        if NEIGHBOUR in name:
            assert row.latency_ms == rows[name.split(f" {NEIGHBOUR}")[0]].latency_ms


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint_step(run_dir: Path) -> None:
    main(["--resume", str(run_dir / "checkpoints" / "ppo_16_steps.zip"), *sets("total_timesteps=48", "export.enabled=false",
                                                                             "evaluate.enabled=false")])
    assert MaskablePPO.load(run_dir / "model.zip").num_timesteps == 48
    assert (run_dir / "checkpoints" / "ppo_48_steps.zip").is_file()
    steps = [int(row["time/total_timesteps"]) for row in csv.DictReader(open(run_dir / "logs" / "resume-16" / "progress.csv"))]
    assert steps[0] == 32 and steps[-1] == 48  # the first rollout after step 16 ends at 16 + 2 envs x 8 steps


@pytest.mark.slow
def test_skip_both_stages_still_exports(tmp_path: Path) -> None:
    path = main(["--run-dir", str(tmp_path / "untrained"), "--skip-bc", "--skip-ppo",
                 *sets(*TINY_RUN, "evaluate.enabled=false")])
    assert not (path / "bc_model.zip").exists() and (path / "export" / "policy.safetensors").is_file()


@pytest.mark.slow
def test_batched_vector_env_and_reward_normalisation(tmp_path: Path) -> None:
    path = main(["--run-dir", str(tmp_path / "batched"), "--skip-bc", *sets(
        *TINY_RUN, "vec_env=batched", "n_envs=4", "normalize_reward=true", "export.enabled=false", "evaluate.enabled=false")])
    assert MaskablePPO.load(path / "model.zip").num_timesteps == 32
    assert (path / "model.vecnormalize.pkl").is_file() and (path / "checkpoints" / "ppo_16_steps.vecnormalize.pkl").is_file()
    rows = list(csv.DictReader(open(path / "logs" / "train" / "progress.csv")))
    assert any(row.get("rollout/ep_rew_mean") for row in rows)  # VecMonitor reports episodes of the batched env


def test_learning_curves_pool_sb3_and_rllib_logs(tmp_path: Path) -> None:
    """benchmarks/learning_curves.py reads both trainers' logs; seeds pool at the steps all of them logged, with
    the Student-t interval of the last mean."""
    import benchmarks.learning_curves as learning_curves  # the repository root is on sys.path under pytest

    def sb3_run(name: str, returns: list[float]) -> Path:
        log = tmp_path / name / "logs" / "train"
        log.mkdir(parents=True)
        rows = "".join(f"{value},{512 * (i + 1)}\n" for i, value in enumerate(returns))
        (log / "progress.csv").write_text("rollout/ep_rew_mean,time/total_timesteps\n" + rows)
        return tmp_path / name

    seeds = [sb3_run("s0", [1.0, 2.0]), sb3_run("s1", [1.0, 4.0]), sb3_run("s2", [1.0, 6.0, 9.0])]
    rllib = tmp_path / "rllib"
    rllib.mkdir()
    (rllib / "metrics.csv").write_text("iteration,env_steps,episode_return_mean\n1,256,0.5\n2,512,0.75\n")
    out = tmp_path / "out"
    learning_curves.main(["--run", f"ppo=eq={','.join(map(str, seeds))}", "--run", f"rllib={rllib}",
                          "--out", str(out)])
    table = (out / "learning_curves.md").read_text()
    # last common step 1024: returns 2, 4, 6 -> mean 4, sd 2, half-width 4.303 * 2 / sqrt(3)
    assert f"| ppo=eq | 3 | 512, 1,024 | 1.0000 | 4.0000 +/- {4.303 * 2 / 3 ** 0.5:.4f} |" in table
    assert "| rllib | 1 | 256, 512 | 0.5000 | 0.7500 (1 seed: no interval) |" in table
    assert (out / "learning_curves.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="neither"):
        learning_curves.main(["--run", f"x={tmp_path / 'missing'}", "--out", str(out)])


def test_rllib_scaling_uses_steady_iterations_and_needs_a_one_gpu_run(tmp_path: Path) -> None:
    """benchmarks/rllib_scaling.py: throughput after the warm-up iteration, efficiency against 1 GPU, peak memory per
    GPU from nvidia-smi's CSV (idle GPUs left out)."""
    import benchmarks.rllib_scaling as rllib_scaling

    def run(name: str, seconds: list[float], memory_mib: dict[int, int]) -> Path:
        path = tmp_path / name
        path.mkdir()
        rows = "".join(f"{i + 1},{1000 * (i + 1)},{s}\n" for i, s in enumerate(seconds))
        (path / "metrics.csv").write_text("iteration,env_steps,iteration_time_s\n" + rows)
        memory = "".join(f"2026/11/29 16:38:5{i}.5, {gpu}, {mib * i} MiB, 50 %\n"
                         for i in (1, 2) for gpu, mib in memory_mib.items())
        (path / "gpu_memory.csv").write_text("timestamp, index, memory.used [MiB], utilization.gpu [%]\n" + memory)
        return path

    one = run("g1", [9.0, 2.0, 2.0], {0: 1024, 1: 2})  # steady: 2000 steps in 4 s = 500/s
    two = run("g2", [9.0, 1.0, 1.5], {0: 2048, 1: 1536})  # 2000 steps in 2.5 s = 800/s
    out = tmp_path / "out"
    rllib_scaling.main(["--run", f"2={two}", "--run", f"1={one}", "--out", str(out)])
    rows = json.loads((out / "scaling.json").read_text())["runs"]
    assert [row["gpus"] for row in rows] == [1, 2]
    assert rows[0]["env_steps_per_s"] == pytest.approx(500) and rows[1]["env_steps_per_s"] == pytest.approx(800)
    assert rows[1]["efficiency"] == pytest.approx(0.8)
    table = (out / "scaling.md").read_text()
    assert "| 1 | 500 | 1.00x | 100% | 2.0 |" in table and "| 2 | 800 | 1.60x | 80% | 4.0, 3.0 |" in table
    with pytest.raises(SystemExit):
        rllib_scaling.main(["--run", f"2={two}", "--out", str(out)])
    with pytest.raises(SystemExit, match="none after"):
        rllib_scaling.main(["--run", f"1={one}", "--warmup-iterations", "3", "--out", str(out)])

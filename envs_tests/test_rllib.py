"""agents/train_rllib.py and its RLlib pieces, on the CPU with the tiny random Llama.

Without Ray: option checks and the GPU layout's arithmetic. With the ``rllib`` extra (else skipped), still without
starting Ray (seconds): an env runner in this process stepping the batched vector env (its episodes equal a
same-step replay), the PPO config a 4-GPU layout builds, and an RLlib module exported and loaded back (same actions).
Marked slow (Ray start-ups, about a minute on 2 cores each): Ray placing a layout's actors on fake GPUs, and a
short PPO run with checkpoints, a resume, the export and evaluation, and the exported policy acting like the
checkpoint's module."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from agents.train_rllib import (
    MODULE_DIR,
    build_config,
    env_kwargs_from,
    main,
    parse_args,
    resolve_run,
    runner_device,
)
from drrl_gym.training.config import ConfigError, RLlibConfig, TrainConfig
from drrl_gym.training.rllib_layout import GpuLayout

TINY_ENV = ["model=tiny-random-llama", "rank_choices=[4, 8, 12, 16]", "seq_len=64", "segment_len=16",
            "calibration_sequences=2", "eval_sequences=2", "device=cpu"]
SMALL_NET = ["--set", "policy_kwargs.features_extractor_kwargs={d_model: 16, n_heads: 2, n_layers: 1, "
             "dim_feedforward: 32, dropout: 0.0}"]
SMALL_RUN = ["--num-env-runners", "1", "--num-cpus", "2", "--train-batch-size", "32", "--minibatch-size", "16",
             "--num-epochs", "2", "--hidden", "16,16", "--checkpoint-every", "1", *SMALL_NET]


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open(newline="") as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]


# ------------------------------------------------------------------------------------------- options, no Ray
def test_env_kwargs_pairs_and_files_apply_in_order(tmp_path: Path) -> None:
    config = tmp_path / "env.yaml"
    config.write_text("seq_len: 128\nbeta: 1e-3\nrank_choices: [4, 8]\n")
    kwargs = env_kwargs_from(["seq_len=64", str(config), "rank_choices=[4, 8, 12, 16]", "epsilon_start=.inf"])
    assert kwargs == {"seq_len": 128, "beta": 1e-3, "rank_choices": [4, 8, 12, 16], "epsilon_start": math.inf}


def test_settings_defaults_and_config_yaml(tmp_path: Path) -> None:
    config, run_dir = resolve_run(parse_args(["--run-dir", str(tmp_path / "run"), "--env-kwargs", *TINY_ENV]))
    assert run_dir == tmp_path / "run" and config.rllib.iterations == RLlibConfig.iterations
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["env"]["rank_choices"] == [4, 8, 12, 16] and saved["rllib"]["hidden"] == RLlibConfig().hidden


def test_the_export_calibrates_on_the_runners_kind_of_device(tmp_path: Path) -> None:
    """The export's basis must be the runners' own: "auto" resolves as it did in the runners."""
    env = [item for item in TINY_ENV if not item.startswith("device=")]

    def device(*options: str) -> str:
        config, _ = resolve_run(parse_args(["--run-dir", str(tmp_path / "run"), *options, "--env-kwargs", *env]))
        return runner_device(config)

    assert device("--gpus", "2") == "cuda"
    assert device("--num-env-runners", "2") == "cpu"  # CPU runners: "auto" meant the CPU there
    assert device("--num-env-runners", "0") == "auto"  # sampled in the driver: "auto" as usual
    config, _ = resolve_run(parse_args(["--run-dir", str(tmp_path / "run"), "--gpus", "1", "--env-kwargs", *TINY_ENV]))
    assert runner_device(config) == "cpu"  # an explicit device is kept


def test_options_override_config_and_set(tmp_path: Path) -> None:
    (tmp_path / "rllib.yaml").write_text("rllib:\n  lr: 1e-3\n  iterations: 4\n")
    argv = ["--config", str(tmp_path / "rllib.yaml"), "--set", "rllib.iterations=6", "--set", "rllib.num_epochs=3",
            "--num-epochs", "2", "--run-dir", str(tmp_path / "run"), "--env-kwargs", *TINY_ENV]
    config, _ = resolve_run(parse_args(argv))
    assert (config.rllib.lr, config.rllib.iterations, config.rllib.num_epochs) == (1e-3, 6, 2)


def test_resume_keeps_the_learning_problem_and_lets_resources_change(tmp_path: Path) -> None:
    _, run_dir = resolve_run(parse_args(["--run-dir", str(tmp_path / "run"), "--lr", "1e-3", "--env-kwargs", *TINY_ENV]))
    checkpoint = run_dir / "checkpoints" / "iter_000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "rllib_checkpoint.json").write_text("{}")  # all resolve_run looks for
    config, same_dir = resolve_run(parse_args(["--resume", str(checkpoint), "--iterations", "20", "--num-env-runners", "2"]))
    assert same_dir == run_dir.resolve() and config.rllib.lr == 1e-3 and config.env["seq_len"] == 64
    assert (config.rllib.iterations, config.rllib.num_env_runners) == (20, 2)
    for argv in (["--lr", "1e-2"], ["--set", "env.cost_weight=0.5"], ["--hidden", "8"]):
        with pytest.raises(ConfigError, match="define the run's learning problem.*Fix"):
            resolve_run(parse_args(["--resume", str(checkpoint), *argv]))


@pytest.mark.parametrize("argv, message", [
    (["--env-kwargs", "sequ_len=64"], "did you mean 'seq_len'"),
    (["--env-kwargs", "seq_len=65", "segment_len=16"], "not a multiple of segment_len"),
    (["--env-kwargs", "device=gpu"], "not a device"),
    (["--set", "rllib.lrr=0.1"], "did you mean 'rllib.lr'"),
    (["--env-kwargs", "no_such_file.yaml"], "neither KEY=VALUE nor an existing"),
    (["--minibatch-size", "64", "--train-batch-size", "32"], "minibatch size <= the train batch size"),
    (["--num-learners", "3", "--train-batch-size", "32", "--minibatch-size", "8"], "does not split over 3 learners"),
    (["--num-env-runners", "0", "--num-gpus-per-env-runner", "1"], "Ray assigns it no GPU"),
    (["--num-gpus-per-learner", "2"], "at most one GPU"),
    (["--num-cpus", "2", "--ray-address", "auto"], "an existing cluster has its own CPUs"),
    (["--resume", "."], "not an RLlib checkpoint directory"),
    (["--gpus", "2", "--num-env-runners", "3"], "--gpus sets these itself"),
    (["--env-runners-per-gpu", "2"], "without --gpus"),
    (["--gpus", "2", "--env-runners-per-gpu", "3", "--learner-gpu-fraction", "0.3"], "one runner too many"),
])
def test_bad_settings_are_refused_with_a_fix(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        resolve_run(parse_args([*argv, "--run-dir", str(tmp_path / "run")]))
    assert "Fix:" in str(error.value)


@pytest.mark.parametrize("argv", [["--iterations", "0"], ["--lr", "-1"], ["--gamma", "1.5"], ["--hidden", "3,x"],
                                  ["--num-env-runners", "two"]])
def test_out_of_range_options_stop_the_parser(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert f"argument {argv[0]}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ Ray, CPU
@pytest.mark.slow
def test_rllib_ppo_trains_checkpoints_resumes_and_acts(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    torch = pytest.importorskip("torch")
    from ray.rllib.core.rl_module.rl_module import RLModule

    from drrl_gym.export import load_dynamic_rank_model
    from drrl_gym.training.algorithms import make_env

    run_dir = main([*SMALL_RUN, "--iterations", "2", "--seed", "0", "--run-dir", str(tmp_path / "run"),
                    "--num-envs-per-env-runner", "2", "--set", "evaluate.eval_sequences=2",
                    "--env-kwargs", *TINY_ENV, "epsilon_start=.inf", "epsilon_end=.inf"])
    rows = read_metrics(run_dir)
    assert [row["iteration"] for row in rows] == [1, 2]
    assert [row["env_steps"] for row in rows] == [32, 64]
    for row in rows:
        assert math.isfinite(row["episode_return_mean"]) and row["episodes"] > 0, row
        assert row["episode_len_mean"] == 3  # seq_len / segment_len - 1 decisions
        assert 0 < row["fidelity"] <= 1 and 0 <= row["flops_saved_scores"] < 1, row
        assert math.isfinite(row["total_loss"]), row
        assert row["env_steps_per_s"] == pytest.approx(32 / row["iteration_time_s"]), row
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_000001", "iter_000002"]

    # Resume from iteration 1 with another runner count: counters continue from the checkpoint, row 2 is redone.
    main(["--resume", str(checkpoints / "iter_000001"), "--iterations", "3", "--num-env-runners", "2"])
    rows = read_metrics(run_dir)
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    assert [row["env_steps"] for row in rows] == [32, 64, 96]
    assert (checkpoints / "iter_000003" / "rllib_checkpoint.json").is_file()

    module = RLModule.from_checkpoint(checkpoints.joinpath("iter_000003", *MODULE_DIR))
    env = make_env(**env_kwargs_from(TINY_ENV))
    # The resumed run exported iteration 3's trained policy and evaluated it; loaded, it acts as the checkpoint's
    # module and generates.
    assert (run_dir / "eval" / "results.json").is_file()
    model = load_dynamic_rank_model(run_dir / "export", "cpu")
    assert_same_actions(module, model.drrl.policy, make_env(
        **env_kwargs_from([*TINY_ENV, "epsilon_start=.inf", "epsilon_end=.inf"])))
    tokens = model.drrl.tokenizer("The", return_tensors="pt").input_ids
    assert model.generate(tokens, max_new_tokens=4, do_sample=False).shape == (1, tokens.shape[1] + 4)
    observation, _ = env.reset(seed=1)
    output = module.forward_inference({"obs": torch.as_tensor(observation[None])})
    logits = output["action_dist_inputs"]
    assert torch.isfinite(logits).all()
    action = module.get_inference_action_dist_cls().from_logits(logits).to_deterministic().sample()[0].numpy()
    assert env.action_space.contains(np.asarray(action, dtype=np.int64)), action
    env.step(action)


# ------------------------------------------------------------------------------------------- GPU layout, no Ray
@pytest.mark.parametrize("gpus, per_gpu, learner, runners, share", [
    (1, 1, 0.1, 1, 0.9), (4, 2, 0.1, 8, 0.45), (8, 3, 0.2, 24, 0.2666), (2, 4, 0.05, 8, 0.2375)])
def test_gpu_layout_spreads_runners_and_fits_the_learner(gpus: int, per_gpu: int, learner: float, runners: int,
                                                         share: float) -> None:
    layout = GpuLayout(gpus, per_gpu, learner)
    assert layout.rllib_settings() == {"num_env_runners": runners, "num_gpus_per_env_runner": pytest.approx(share),
                                       "num_learners": 1, "num_gpus_per_learner": learner}
    packing = layout.expected_packing()
    assert len(packing) == gpus and max(packing) <= 1 and packing[0] == pytest.approx(per_gpu * share + learner)
    assert (per_gpu + 1) * layout.gpus_per_env_runner > 1  # no GPU can take one runner more


def test_gpus_option_sets_the_resources_and_builds_the_ppo_config(tmp_path: Path) -> None:
    config, _ = resolve_run(parse_args(["--gpus", "4", "--env-runners-per-gpu", "2", "--num-envs-per-env-runner", "8",
                                        "--train-batch-size", "64", "--run-dir", str(tmp_path / "run"),
                                        "--env-kwargs", *TINY_ENV]))
    s = config.rllib
    assert (s.num_env_runners, s.num_gpus_per_env_runner, s.num_learners, s.num_gpus_per_learner) == (8, 0.45, 1, 0.1)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["rllib"]["num_env_runners"] == 8
    pytest.importorskip("ray")
    ppo = build_config(config)  # RLlib's own config object: what Ray will be asked for, no GPU needed to build it
    ppo.validate()  # RLlib accepts the layout (fractional runner and learner GPUs)
    assert (ppo.num_env_runners, ppo.num_gpus_per_env_runner, ppo.num_envs_per_env_runner) == (8, 0.45, 8)
    assert (ppo.num_learners, ppo.num_gpus_per_learner, ppo.gym_env_vectorize_mode) == (1, 0.1, "vector_entry_point")


# ---------------------------------------------------------------------------------- RLlib pieces, no Ray start
def tiny_config(tmp_path: Path, *argv: str) -> TrainConfig:
    config, _ = resolve_run(parse_args([*SMALL_RUN, *argv, "--num-envs-per-env-runner", "2", "--run-dir",
                                        str(tmp_path / "run"), "--env-kwargs", *TINY_ENV]))
    return config


def local_env_runner(config: TrainConfig):
    """RLlib's SingleAgentEnvRunner in this process, building its envs as the Ray runners do."""
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
    from ray.tune.registry import register_env

    from agents.train_rllib import RLLIB_ENV
    from drrl_gym.training.rllib_env import make_rllib_env

    register_env(RLLIB_ENV, make_rllib_env)
    return SingleAgentEnvRunner(config=build_config(config))


def test_env_runner_steps_the_batched_env_and_records_whole_episodes(tmp_path: Path) -> None:
    """Two episodes per env through RLlib's runner (NEXT_STEP autoreset), replayed action for action through a
    same-step DRRLAttentionVecEnv with the runner's seed: every episode's observations and rewards match."""
    pytest.importorskip("ray")
    from drrl_gym import DRRLAttentionVecEnv

    config = tiny_config(tmp_path, "--seed", "7")
    runner = local_env_runner(config)
    try:
        assert isinstance(runner.env.unwrapped, DRRLAttentionVecEnv) and runner.env.unwrapped.num_envs == 2
        episodes = runner.sample(num_episodes=4, random_actions=True)
    finally:
        runner.stop()
    assert len(episodes) == 4 and all(len(e) == 3 and e.is_terminated for e in episodes)
    replay = DRRLAttentionVecEnv(2, **env_kwargs_from(TINY_ENV))
    observation, _ = replay.reset(seed=7)  # the runner's seed: config seed + worker index 0
    by_env = [episodes[0::2], episodes[1::2]]  # episodes end together, in env order
    for round_ in range(2):
        pair = [by_env[i][round_] for i in range(2)]
        for i, episode in enumerate(pair):
            np.testing.assert_array_equal(episode.get_observations(0), observation[i])
        for t in range(3):
            actions = np.stack([episode.get_actions(t) for episode in pair])
            observation, reward, terminated, _, info = replay.step(actions)
            np.testing.assert_array_equal([episode.get_rewards(t) for episode in pair], reward)
            last = np.stack(info["final_obs"]) if terminated.any() else observation
            for i, episode in enumerate(pair):
                np.testing.assert_array_equal(episode.get_observations(t + 1), last[i])
    replay.close()


def test_rllib_module_exports_and_the_loaded_policy_acts_alike(tmp_path: Path) -> None:
    """The runner's (untrained, random) RankPolicyRLModule -> export format v3 -> load_dynamic_rank_model: same
    deterministic actions as the module on env observations (mask off), and the loaded model generates."""
    pytest.importorskip("ray")
    torch = pytest.importorskip("torch")
    from drrl_gym import DRRLAttentionEnv
    from drrl_gym.export import FORMAT_VERSION, export_env_policy, load_dynamic_rank_model, read_export_config
    from drrl_gym.training.rllib_module import policy_network_from_rllib

    config = tiny_config(tmp_path, "--env-kwargs", "epsilon_start=.inf", "epsilon_end=.inf")
    runner = local_env_runner(config)
    module = runner.module
    runner.stop()
    env = DRRLAttentionEnv(**config.env)
    export_dir = export_env_policy(tmp_path / "export", env, policy_network_from_rllib(module))
    assert read_export_config(export_dir)["format_version"] == FORMAT_VERSION
    assert read_export_config(export_dir)["policy"]["arch"]["pi_layers"] == [16, 16]
    model = load_dynamic_rank_model(export_dir, "cpu")
    assert_same_actions(module, model.drrl.policy, env)
    tokens = model.drrl.tokenizer("The", return_tensors="pt").input_ids
    generated = model.generate(tokens, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, tokens.shape[1] + 4) and torch.isfinite(model(generated).logits).all()


def assert_same_actions(module, policy, env, episodes: int = 2) -> None:
    """The RLlib module's deterministic actions equal the exported policy's on the observations of a few episodes."""
    import torch

    seen = 0
    for seed in range(episodes):
        observation, _ = env.reset(seed=seed)
        done = False
        while not done:
            output = module.forward_inference({"obs": torch.as_tensor(observation[None])})
            rllib_action = module.get_inference_action_dist_cls().from_logits(
                output["action_dist_inputs"]).to_deterministic().sample()[0].numpy()
            base = env.unwrapped
            allowed = base.action_masks().reshape(1, base.n_units, -1)
            exported_action = policy.act(observation.reshape(1, *base.unit_shape), allowed)[0]
            np.testing.assert_array_equal(rllib_action, exported_action)
            observation, _, done, _, _ = env.step(rllib_action)
            seen += 1
    assert seen == episodes * 3


@pytest.mark.slow
def test_ray_places_a_gpu_layout_as_planned_on_fake_gpus() -> None:
    """Ray started with 3 declared (fake) GPUs places a 3-GPU layout's actors, asking what RLlib's runners and
    learner ask for: 2 runners on every GPU, the learner beside them, nothing waiting."""
    ray = pytest.importorskip("ray")
    layout = GpuLayout(3, env_runners_per_gpu=2, learner_gpu_fraction=0.2)

    @ray.remote(num_cpus=0)
    class Placed:
        def gpu(self) -> list[str]:
            return [str(i) for i in ray.get_gpu_ids()]

    ray.init(num_cpus=1, num_gpus=3, include_dashboard=False, logging_level="warning")
    try:
        runners = [Placed.options(num_gpus=layout.gpus_per_env_runner).remote() for _ in range(layout.num_env_runners)]
        learner = Placed.options(num_gpus=layout.learner_gpu_fraction).remote()
        placed = ray.get([actor.gpu.remote() for actor in runners], timeout=60)
        assert ray.get(learner.gpu.remote(), timeout=60)  # it fits: every GPU keeps the learner's fraction free
    finally:
        ray.shutdown()
    assert all(len(ids) == 1 for ids in placed)
    assert sorted(sum(placed, [])) == ["0", "0", "1", "1", "2", "2"]

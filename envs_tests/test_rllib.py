"""agents/train_rllib.py: option checks (no Ray needed) and a short Ray RLlib PPO run on CPU with the tiny random
Llama (skipped without the ``rllib`` extra): two iterations with one env runner process holding its own model,
checkpoints, a resume that continues the counters, and the checkpointed policy acting in the env. The Ray test
takes about a minute on 2 cores (two Ray start-ups)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from agents.train_rllib import env_kwargs_from, main, parse_args, resolve_run
from drrl_gym.training.config import ConfigError, RLlibConfig

TINY_ENV = ["model=tiny-random-llama", "rank_choices=[4, 8, 12, 16]", "seq_len=64", "segment_len=16",
            "calibration_sequences=2", "eval_sequences=2", "device=cpu"]
SMALL_RUN = ["--num-env-runners", "1", "--num-cpus", "2", "--train-batch-size", "32", "--minibatch-size", "16",
             "--num-epochs", "2", "--hidden", "16,16", "--checkpoint-every", "1"]


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

    from drrl_gym.training.algorithms import make_env

    run_dir = main([*SMALL_RUN, "--iterations", "2", "--seed", "0", "--run-dir", str(tmp_path / "run"),
                    "--env-kwargs", *TINY_ENV])
    rows = read_metrics(run_dir)
    assert [row["iteration"] for row in rows] == [1, 2]
    assert [row["env_steps"] for row in rows] == [32, 64]
    for row in rows:
        assert math.isfinite(row["episode_return_mean"]) and row["episodes"] > 0, row
        assert row["episode_len_mean"] == 3  # seq_len / segment_len - 1 decisions
        assert 0 < row["fidelity"] <= 1 and 0 <= row["flops_saved_scores"] < 1, row
        assert math.isfinite(row["total_loss"]), row
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_000001", "iter_000002"]

    # Resume from iteration 1 with another runner count: counters continue from the checkpoint, row 2 is redone.
    main(["--resume", str(checkpoints / "iter_000001"), "--iterations", "3", "--num-env-runners", "2"])
    rows = read_metrics(run_dir)
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    assert [row["env_steps"] for row in rows] == [32, 64, 96]
    assert (checkpoints / "iter_000003" / "rllib_checkpoint.json").is_file()

    module = RLModule.from_checkpoint(checkpoints / "iter_000003" / "learner_group" / "learner" / "rl_module" /
                                      "default_policy")
    env = make_env(**env_kwargs_from(TINY_ENV))
    observation, _ = env.reset(seed=1)
    output = module.forward_inference({"obs": torch.as_tensor(observation[None])})
    logits = output["action_dist_inputs"]
    assert torch.isfinite(logits).all()
    action = module.get_inference_action_dist_cls().from_logits(logits).to_deterministic().sample()[0].numpy()
    assert env.action_space.contains(np.asarray(action, dtype=np.int64)), action
    env.step(action)

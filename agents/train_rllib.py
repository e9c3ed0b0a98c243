"""Train a rank policy for DRRL-Attention-v0 with Ray RLlib PPO: parallel env runners, each with its own frozen model.

    pip install -e ".[rllib]"                                          # Ray RLlib, an optional extra
    python agents/train_rllib.py --iterations 3 --num-env-runners 2 --num-cpus 2 \\
        --env-kwargs model=tiny-random-llama "rank_choices=[4, 8, 12, 16]" seq_len=64 segment_len=16
    python agents/train_rllib.py --env-kwargs env.yaml --gpus 4 --num-envs-per-env-runner 16              # 4 GPUs
    python agents/train_rllib.py --resume runs/rllib-X/checkpoints/iter_000004 --iterations 8            # continue

How it scales: RLlib's env runners are Ray actors (processes). Each builds its envs through
``drrl_gym.training.rllib_env.make_rllib_env``: its ``--num-envs-per-env-runner`` envs are one
:class:`drrl_gym.vector.DRRLAttentionVecEnv` (one batched forward per step, NEXT_STEP autoreset as RLlib's runner
expects), so each runner process loads its own frozen model. With
``--num-gpus-per-env-runner 1`` Ray gives every runner its own GPU and restricts the runner's
``CUDA_VISIBLE_DEVICES`` to it; ``device="auto"`` (the default) then means that GPU. In a Ray process "auto" means
"the GPU Ray assigned, else the CPU": a runner never takes a GPU that Ray did not give it. The PPO learner runs in
this (driver) process unless ``--num-learners`` > 0 makes it Ray actors of their own. ``--gpus N`` sets all of this
for one node's N GPUs (``drrl_gym.training.rllib_layout``): ``--env-runners-per-gpu`` runners on each GPU (1: one
model per GPU), each on an equal share of it, and one learner actor on ``--learner-gpu-fraction`` of one GPU.

The policy is :class:`drrl_gym.training.rllib_module.RankPolicyRLModule`, whose actor is the exportable
``RankPolicyNetwork`` (the token transformer of ``policy_kwargs.features_extractor_kwargs``, policy and value MLPs
of ``rllib.hidden``, activation ``policy_kwargs.activation_fn``; dropout is not used), so the run ends with the same
``export/`` as ``agents/train_ppo.py`` (``export.*``) and its held-out evaluation (``evaluate.*``).

The safety mask: the module samples the whole ``MultiDiscrete`` action and ignores ``env.action_masks()``. That
is allowed: the env projects each disallowed sub-action to the closest allowed rank and reports it
(``info["mask_rejections"]``, logged below). The cost is that PPO's log-probabilities are those of the sampled
action, not the applied one; ``agents/train_ppo.py`` (MaskablePPO) masks properly, and ``--env-kwargs
epsilon_start=.inf epsilon_end=.inf`` turns the mask off.

Configuration: the same typed tree as ``agents/train_ppo.py`` (``drrl_gym.training.config``; every key and default
in agents/configs/default.yaml): this script reads ``seed``, ``run_dir``, the ``env`` block (DRRLAttentionEnv
arguments), the ``rllib`` section, ``policy_kwargs`` (the network's sizes), ``export`` and ``evaluate``. ``--config
FILE`` and ``--set key.sub=value`` override the defaults; the options below override both. ``--env-kwargs`` takes
KEY=VALUE pairs (values parsed as YAML) and/or YAML/JSON files holding a mapping of env arguments, applied in order
over the env block. Every key and value is checked (the env block by ``drrl_gym.EnvConfig``) before Ray starts. Everything goes to the run directory (``runs/rllib-<date>-<time>/`` by
default):

    config.yaml            the resolved configuration (what --resume reads back)
    metrics.csv            one row per iteration: env steps, episodes, episode return mean, the env's rank metrics
                           (mean over each runner's last 256 steps), PPO losses, time (also printed)
    export/                the dynamic-rank HF model of the last checkpoint's policy (drrl_gym.export)
    eval/                  its held-out evaluation (drrl_gym.training.evaluation)
    checkpoints/iter_N/    RLlib checkpoints (``Algorithm.restore_from_path``; the policy alone:
                           ``RLModule.from_checkpoint(CKPT/learner_group/learner/rl_module/default_policy)``)

``--resume CKPT`` continues that run in its directory with its config up to ``--iterations``; only the resources
(runners, GPUs, CPUs, address), ``--iterations`` and ``--checkpoint-every`` may change. Checkpoints are pickles: load only your own.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from drrl_gym import DRRLAttentionEnv, EnvConfig
from drrl_gym.cli import int_list, number_in
from drrl_gym.export import export_env_policy
from drrl_gym.training.config import (
    ConfigError,
    RLlibConfig,
    TrainConfig,
    load_config,
    open_run_dir,
    parse_assignment,
    read_yaml,
)
from drrl_gym.training.evaluation import evaluate_export
from drrl_gym.training.rllib_env import INFO_METRICS, log_rank_metrics, make_rllib_env
from drrl_gym.training.rllib_layout import GpuLayout

RLLIB_ENV = "drrl-attention-rllib"  # the name the creator is registered under with Ray
FORWARDED_ENV_VARS = ("DRRL_GYM_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
METRIC_COLUMNS = ("iteration", "env_steps", "episodes", "episode_return_mean", "episode_len_mean", *INFO_METRICS,
                  "total_loss", "entropy", "iteration_time_s", "env_steps_per_s", "total_time_s")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# Each option's config key; the options override --config and --set.
OPTION_KEYS = {"seed": "seed", "run_dir": "run_dir", **{name: f"rllib.{name}" for name in (
    "iterations", "checkpoint_every", "train_batch_size", "minibatch_size", "num_epochs", "lr", "gamma", "hidden",
    "num_env_runners", "num_envs_per_env_runner", "num_gpus_per_env_runner", "num_learners", "num_gpus_per_learner",
    "num_cpus", "ray_address")}}
RESUMABLE = {f"rllib.{name}" for name in RLlibConfig.RESUMABLE} | {"run_dir"}
LAYOUT_KEYS = tuple(f"rllib.{name}" for name in GpuLayout(1).rllib_settings())  # what --gpus sets
MODULE_DIR = ("learner_group", "learner", "rl_module", "default_policy")  # the policy inside a checkpoint


# ---------------------------------------------------------------------------------------------------- settings
def check_runner_env(config: TrainConfig) -> EnvConfig:
    """The env block, checked before any process loads a model. The device is only checked for its form: a
    runner's GPU is not visible here."""
    device = config.env.get("device", "auto")
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(f"env.device={device!r}: not a device. Fix: pass auto (default), cpu, cuda or cuda:N.")
    return config.env_config(device="cpu")


def runner_device(config: TrainConfig) -> str:
    """The kind of device the env runners stepped on: the env's own setting unless it is "auto", which in a runner
    means "the GPU Ray assigned, else the CPU" (sampling in this process, "auto" keeps its usual meaning)."""
    device = config.env.get("device", "auto")
    if device != "auto" or config.rllib.num_env_runners == 0:
        return device
    return "cuda" if config.rllib.num_gpus_per_env_runner > 0 else "cpu"


def env_kwargs_from(items: list[str]) -> dict[str, Any]:
    """``--env-kwargs`` items in order: KEY=VALUE sets one key (YAML value), anything else is a YAML/JSON file."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, _ = item.partition("=")
        if sep and key.isidentifier():
            kwargs.update(OmegaConf.to_container(parse_assignment(item)))
        elif Path(item).is_file():
            kwargs.update(OmegaConf.to_container(read_yaml(Path(item))))
        else:
            raise ConfigError(f"--env-kwargs {item!r}: neither KEY=VALUE nor an existing YAML/JSON file. "
                              "Fix: pass e.g. seq_len=256, or the path of a file holding a mapping.")
    return kwargs


# -------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Every option defaults to None ("not given"): the defaults are the config tree's (or a resumed run's)."""
    d = RLlibConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--config", type=Path, help="YAML overriding agents/configs/default.yaml (its env and rllib sections)")
    add("--set", action="append", default=[], metavar="KEY.SUB=VALUE",
        help="override one key, e.g. rllib.lr=1e-4 or env.seq_len=512 (repeatable)")
    add("--env-kwargs", nargs="+", action="extend", metavar="KEY=VALUE|FILE",
        help="env block entries: KEY=VALUE (YAML value) or a YAML/JSON file of them, applied in order")
    add("--iterations", type=number_in(int, 1), help=f"train until this iteration (default {d.iterations})")
    add("--checkpoint-every", type=number_in(int, 0),
        help=f"checkpoint every N iterations and at the end; 0: at the end only (default {d.checkpoint_every})")
    add("--seed", type=number_in(int, 0, 2**31), help="default 0")
    add("--train-batch-size", type=number_in(int, 1), help=f"env steps per iteration (default {d.train_batch_size})")
    add("--minibatch-size", type=number_in(int, 1), help=f"default {d.minibatch_size}")
    add("--num-epochs", type=number_in(int, 1), help=f"passes over each train batch (default {d.num_epochs})")
    add("--lr", type=number_in(float, 0, low_exclusive=True), help=f"learning rate (default {d.lr})")
    add("--gamma", type=number_in(float, 0, 1, low_exclusive=True, high_inclusive=True),
        help=f"RL discount (default {d.gamma})")
    add("--hidden", type=int_list(1), help=f"MLP sizes of policy and value nets (default {','.join(map(str, d.hidden))})")
    add("--num-env-runners", type=number_in(int, 0),
        help=f"env runner processes, each with its own model; 0: sample in this process (default {d.num_env_runners})")
    add("--num-envs-per-env-runner", type=number_in(int, 1), help="envs per runner, sharing its model (default 1)")
    add("--num-gpus-per-env-runner", type=number_in(float, 0),
        help="GPUs Ray gives each runner, e.g. 1 or 0.5 (default 0)")
    add("--num-learners", type=number_in(int, 0), help="learner actors; 0: learn in this process (default 0)")
    add("--num-gpus-per-learner", type=number_in(float, 0), help="GPUs per learner (default 0)")
    add("--gpus", type=number_in(int, 1), help="lay the run out on N GPUs of this node: sets --num-env-runners, "
        "--num-gpus-per-env-runner, --num-learners 1 and --num-gpus-per-learner (drrl_gym.training.rllib_layout)")
    add("--env-runners-per-gpu", type=number_in(int, 1), help="with --gpus: runners on each GPU, each with its own "
        "model (default 1)")
    add("--learner-gpu-fraction", type=number_in(float, 0, low_exclusive=True),
        help="with --gpus: the learner's share of one GPU (default 0.1)")
    add("--num-cpus", type=number_in(int, 1), help="CPUs of the local Ray instance (default: all)")
    add("--ray-address", help="join an existing cluster (`ray start`), e.g. auto or HOST:6379 (default: start locally)")
    add("--run-dir", help="default runs/rllib-<date>-<time>")
    add("--resume", type=Path, metavar="CHECKPOINT", help="RUN/checkpoints/iter_N written by this script")
    return parser.parse_args(argv)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, by config key (``--env-kwargs`` as the env block's entries)."""
    given = {key: getattr(args, name) for name, key in OPTION_KEYS.items() if getattr(args, name) is not None}
    if "rllib.hidden" in given:
        given["rllib.hidden"] = list(given["rllib.hidden"])
    if "rllib.ray_address" in given and "rllib.num_cpus" not in given:  # joining a cluster: its CPUs, not a count
        given["rllib.num_cpus"] = None
    if args.env_kwargs is not None:
        given["env"] = env_kwargs_from(args.env_kwargs)
    given.update(layout_options(args, given))
    return given


def layout_options(args: argparse.Namespace, given: Mapping[str, Any]) -> dict[str, Any]:
    """The resource settings ``--gpus`` stands for (none without it); refuses options it would contradict."""
    tuned = {name: getattr(args, name) for name in ("env_runners_per_gpu", "learner_gpu_fraction")
             if getattr(args, name) is not None}
    if args.gpus is None:
        if tuned:
            options = ", ".join("--" + name.replace("_", "-") for name in tuned)
            raise ConfigError(f"{options} without --gpus: they only tune the GPU layout. Fix: add --gpus N.")
        return {}
    clash = [key for key in LAYOUT_KEYS if key in given]
    if clash:
        raise ConfigError(f"--gpus with {', '.join(clash)}: --gpus sets these itself. Fix: drop one or the other.")
    layout = GpuLayout(args.gpus, **tuned)
    return {f"rllib.{name}": value for name, value in layout.rllib_settings().items()}


def check_checkpoint(path: Path) -> Path:
    """``--resume`` must name RUN/checkpoints/iter_N written by this script; returns RUN."""
    fix = "Fix: pass RUN_DIR/checkpoints/iter_<N> written by agents/train_rllib.py."
    if not (path / "rllib_checkpoint.json").is_file():
        raise ConfigError(f"--resume {path}: not an RLlib checkpoint directory (no rllib_checkpoint.json). {fix}")
    run_dir = path.resolve().parent.parent
    if path.resolve().parent.name != "checkpoints" or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {path}: no config.yaml two levels up, so the run's settings are unknown. {fix}")
    return run_dir


def _leaves(config: TrainConfig) -> dict[str, Any]:
    """Every value of the tree by dotted key."""
    container = OmegaConf.to_container(OmegaConf.structured(config))
    out: dict[str, Any] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else str(key))
        else:
            out[path] = value

    walk(container, "")
    return out


def resolve_run(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The config (defaults < --config or the resumed run's < --set < options) and the run directory; writes
    RUN/config.yaml."""
    given = given_options(args)
    if args.resume is None:
        config = load_config(args.config, args.set, given)
        run_dir = Path(config.run_dir or Path("runs") / f"rllib-{time.strftime('%Y%m%d-%H%M%S')}")
    else:
        run_dir = check_checkpoint(args.resume)
        if args.config is not None:
            raise ConfigError("--resume with --config: a resumed run keeps its own config.yaml. Fix: drop --config.")
        if args.run_dir is not None and Path(args.run_dir).resolve() != run_dir:
            raise ConfigError(f"--resume continues in {run_dir}, not --run-dir {args.run_dir}. Fix: drop --run-dir.")
        given.pop("run_dir", None)
        saved = load_config(run_dir / "config.yaml")
        config = load_config(run_dir / "config.yaml", args.set, given)
        before = _leaves(saved)
        changed = sorted(key for key, value in _leaves(config).items()  # a key new to the env block is a change too
                         if key not in RESUMABLE and (key not in before or before[key] != value))
        if changed:
            raise ConfigError(f"--resume with {', '.join(changed)} changed: these define the run's learning problem "
                              "and come from its config.yaml. Fix: drop them, or start a new run.")
    check_runner_env(config)
    return open_run_dir(config, run_dir), run_dir


# ------------------------------------------------------------------------------------------------ Ray pieces
def build_config(config: TrainConfig) -> Any:
    """The RLlib ``PPOConfig`` (new API stack: RLModule, Learner, EnvRunner) for this config."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from drrl_gym.training.rllib_module import RankPolicyRLModule

    s = config.rllib
    return (
        PPOConfig()
        .environment(RLLIB_ENV, env_config=dict(config.env))
        .env_runners(num_env_runners=s.num_env_runners, num_envs_per_env_runner=s.num_envs_per_env_runner,
                     num_gpus_per_env_runner=s.num_gpus_per_env_runner, num_cpus_per_env_runner=1,
                     gym_env_vectorize_mode="vector_entry_point")
        .learners(num_learners=s.num_learners, num_gpus_per_learner=s.num_gpus_per_learner)
        .training(train_batch_size_per_learner=s.train_batch_size // max(1, s.num_learners),
                  minibatch_size=s.minibatch_size, num_epochs=s.num_epochs, lr=s.lr, gamma=s.gamma)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=RankPolicyRLModule, model_config=module_config(config)))
        .callbacks(on_episode_step=log_rank_metrics)
        .debugging(seed=config.seed)
    )


def module_config(config: TrainConfig) -> dict[str, Any]:
    """RankPolicyRLModule's sizes: the token transformer and activation of ``policy_kwargs`` (those of
    agents/train_ppo.py's policy), policy and value MLPs of ``rllib.hidden``."""
    extractor = config.policy_kwargs.get("features_extractor_kwargs", {})
    sizes = {key: extractor[key] for key in ("d_model", "n_heads", "n_layers", "dim_feedforward") if key in extractor}
    return {**sizes, "activation": config.policy_kwargs.get("activation_fn", "tanh"),
            "pi_layers": list(config.rllib.hidden), "vf_layers": list(config.rllib.hidden)}


def start_ray(settings: RLlibConfig) -> None:
    """Start Ray locally (or join ``ray_address``); runners get this process' cache and offline settings."""
    import ray

    env_vars = {name: os.environ[name] for name in FORWARDED_ENV_VARS if name in os.environ}
    ray.init(address=settings.ray_address, num_cpus=settings.num_cpus, include_dashboard=False,
             runtime_env={"env_vars": env_vars}, logging_level="warning")


def check_resources(settings: RLlibConfig) -> None:
    """Fail now, not hang: Ray waits forever for resources the cluster does not have."""
    import ray

    s, available = settings, ray.cluster_resources()
    cpus_per_learner = 0 if s.num_gpus_per_learner else 1  # RLlib's "auto"
    needed = {"CPU": s.num_env_runners + s.num_learners * cpus_per_learner,
              "GPU": s.num_env_runners * s.num_gpus_per_env_runner + s.num_learners * s.num_gpus_per_learner}
    for resource, amount in needed.items():
        if amount > available.get(resource, 0):
            raise ConfigError(f"the run needs {amount:g} {resource}(s) (runners and learner actors) but the Ray "
                              f"cluster has {available.get(resource, 0):g}. Fix: fewer --num-env-runners or "
                              f"--num-learners, fewer {resource}s per actor, or more {resource}s (--num-cpus, or "
                              "nodes added by `ray start`).")


# ---------------------------------------------------------------------------------------------- metrics, ckpts
def metrics_row(result: Mapping[str, Any]) -> dict[str, Any]:
    """One row of metrics.csv from an ``Algorithm.train()`` result (NaN where a metric is not there yet)."""
    runners = result.get("env_runners", {})
    learner = result.get("learners", {}).get("default_policy", {})
    drrl = runners.get("drrl", {})
    row = {"iteration": result["training_iteration"], "env_steps": result.get("num_env_steps_sampled_lifetime"),
           "episodes": runners.get("num_episodes_lifetime"), "episode_return_mean": runners.get("episode_return_mean"),
           "episode_len_mean": runners.get("episode_len_mean"), **{key: drrl.get(key) for key in INFO_METRICS},
           "total_loss": learner.get("total_loss"), "entropy": learner.get("entropy"),
           "iteration_time_s": result.get("time_this_iter_s"), "total_time_s": result.get("time_total_s")}
    # Throughput of the whole iteration (sampling and learning), as a user waiting on the run sees it.
    sampled = runners.get("num_env_steps_sampled")
    row["env_steps_per_s"] = sampled / row["iteration_time_s"] if sampled and row["iteration_time_s"] else None
    return {key: math.nan if value is None else value for key, value in row.items()}


def format_row(row: Mapping[str, Any]) -> str:
    return (f"iter {row['iteration']:>3} | env steps {row['env_steps']:>7.0f} | episodes {row['episodes']:>5.0f} | "
            f"return {row['episode_return_mean']:8.4f} | fidelity {row['fidelity']:.4f} | "
            f"FLOPs saved {row['flops_saved_scores']:.3f} | rank {row['rank_fraction']:.3f} | "
            f"mask rejections {row['mask_rejections']:.2f} | loss {row['total_loss']:.4f} | "
            f"entropy {row['entropy']:.3f} | {row['iteration_time_s']:.1f} s, {row['env_steps_per_s']:.0f} env steps/s "
            f"(total {row['total_time_s']:.1f} s)")


def keep_metrics_until(path: Path, iteration: int) -> None:
    """Drop the rows after ``iteration`` (a resumed run redoes them)."""
    if not path.is_file():
        return
    with path.open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if int(row["iteration"]) <= iteration]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def append_metrics(path: Path, row: Mapping[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as file:
        writer = csv.DictWriter(file, METRIC_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def save_checkpoint(algorithm: Any, run_dir: Path) -> Path:
    """RUN/checkpoints/iter_<N>, written to a temporary directory first and renamed (never half written)."""
    final = run_dir / "checkpoints" / f"iter_{algorithm.iteration:06d}"
    partial = final.with_name(f".{final.name}.partial")
    for stale in (partial, final):
        shutil.rmtree(stale, ignore_errors=True)
    algorithm.save_to_path(str(partial.resolve()))
    partial.rename(final)
    return final


# ------------------------------------------------------------------------------------------------------ main
def train(config: TrainConfig, run_dir: Path, resume: Path | None = None) -> Path:
    """Train up to ``rllib.iterations`` (from the checkpoint ``resume`` if given), logging and checkpointing;
    returns the last checkpoint."""
    import ray
    from ray.tune.registry import register_env

    start_ray(config.rllib)
    try:
        check_resources(config.rllib)
        register_env(RLLIB_ENV, make_rllib_env)
        algorithm = build_config(config).build_algo()
        try:
            if resume is not None:
                algorithm.restore_from_path(str(resume.resolve()))
                print(f"resumed from {resume} at iteration {algorithm.iteration}", flush=True)
            return _iterate(algorithm, config.rllib, run_dir)
        finally:
            algorithm.stop()
    finally:
        ray.shutdown()


def _iterate(algorithm: Any, settings: RLlibConfig, run_dir: Path) -> Path:
    metrics = run_dir / "metrics.csv"
    keep_metrics_until(metrics, algorithm.iteration)
    if algorithm.iteration >= settings.iterations:
        print(f"nothing to do: iteration {algorithm.iteration} >= --iterations {settings.iterations}", flush=True)
    while algorithm.iteration < settings.iterations:
        row = metrics_row(algorithm.train())
        append_metrics(metrics, row)
        print(format_row(row), flush=True)
        every, done = settings.checkpoint_every, algorithm.iteration == settings.iterations
        if done or (every and algorithm.iteration % every == 0):
            print(f"checkpoint: {save_checkpoint(algorithm, run_dir)}", flush=True)
    return run_dir / "checkpoints" / f"iter_{algorithm.iteration:06d}"  # the last iteration is always saved


def export_checkpoint(config: TrainConfig, checkpoint: Path, run_dir: Path) -> Path:
    """RUN/export: the checkpoint's policy as a dynamic-rank model (``drrl_gym.export``, as agents/train_ppo.py
    writes it), then RUN/eval, its held-out evaluation, if ``evaluate.enabled``. Returns the export directory."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    from drrl_gym.training.rllib_module import policy_network_from_rllib

    network = policy_network_from_rllib(RLModule.from_checkpoint(checkpoint.joinpath(*MODULE_DIR)))
    # The backbone, basis and settings it was trained on: on the runners' kind of device, so that the calibrated
    # basis is the runners' own (bases are cached per model fingerprint, which differs between a bf16 GPU load and
    # an fp32 CPU one, and a basis calibrated on the other device differs beyond rounding).
    env = DRRLAttentionEnv(**{**config.env, "device": runner_device(config)})
    try:
        export_dir = export_env_policy(run_dir / "export", env, network, config.export.save_backbone, overwrite=True)
    finally:
        env.close()
    print(f"exported the dynamic-rank model of {checkpoint.name} to {export_dir}", flush=True)
    if config.evaluate.enabled:
        evaluate_export(export_dir, run_dir / "eval", config.evaluate.eval_sequences, config.evaluate.batch_size,
                        device=config.env.get("device", "auto"))
    return export_dir


def main(argv: list[str] | None = None) -> Path:
    """Parse, check, train; returns the run directory."""
    args = parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError as error:
        raise ConfigError('Ray RLlib is not installed. Fix: pip install -e ".[rllib]" (the optional extra).') from error
    config, run_dir = resolve_run(args)
    print(f"run directory: {run_dir} (resolved config: config.yaml)", flush=True)
    checkpoint = train(config, run_dir, args.resume)
    if config.export.enabled:
        export_checkpoint(config, checkpoint, run_dir)
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:
        sys.exit(f"error: {error}")

"""Train a rank policy for DRRL-Attention-v0: behaviour cloning from an oracle, then PPO; export and evaluate it.

    python agents/train_ppo.py                                        # smoke-scale CPU run (agents/configs/default.yaml)
    python agents/train_ppo.py --config agents/configs/gpu.yaml       # the real run
    python agents/train_ppo.py --set ppo.learning_rate=1e-4 --set env.cost_weight=0.3 --seed 1 --run-dir runs/cost03
    python agents/train_ppo.py --resume runs/X/checkpoints/ppo_4096_steps.zip   # continue at step 4096

The configuration is the typed tree of ``drrl_gym.training.config``; agents/configs/default.yaml documents every
key with its default. ``--config FILE`` (YAML) overrides it and ``--set key.sub=value`` (repeatable, value parsed as
YAML) overrides both. Unknown keys and bad values stop the run before anything loads. Everything goes to the run
directory:

    config.yaml            the resolved configuration (what ``--resume`` reads back)
    logs/<phase>/          TensorBoard events and progress.csv (bc/*, rollout/*, train/*, env/*, eval/*)
    bc_model.zip           the policy after behaviour cloning
    checkpoints/           ppo_<steps>_steps.zip (+ ppo_<steps>_steps.vecnormalize.pkl), written atomically
    model.zip              the final SB3 model
    export/                the dynamic-rank HF model (drrl_gym.export)
    eval/                  results.csv, results.json, results.png, results.md (drrl_gym.training.evaluation)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor, VecNormalize

from drrl_gym.cli import number_in
from drrl_gym.env import DRRLAttentionEnv
from drrl_gym.export import ACTIVATIONS, export_env_policy
from drrl_gym.files import atomic_write
from drrl_gym.training.config import (
    ConfigError,
    TrainConfig,
    algorithm_name,
    check_sb3_sections,
    load_config,
    open_run_dir,
    sb3_algorithms,
)
from drrl_gym.training.evaluation import evaluate_export
from drrl_gym.training.extractor import TransformerFeaturesExtractor, policy_network_from_sb3
from drrl_gym.training.oracle import behaviour_clone, collect_demonstrations
from drrl_gym.training.sb3_vec_env import DRRLAttentionSB3VecEnv

INFO_KEYS = ("fidelity", "flops_cost", "perturbation", "rank_fraction", "flops_saved_attention", "mask_rejections")


def resolve_config(path: Path | None = None, sets: list[str] | tuple[str, ...] = (), seed: int | None = None,
                   skip_bc: bool = False, skip_ppo: bool = False) -> TrainConfig:
    """The run's configuration: defaults < ``path`` < ``--set`` < flags, checked for SB3 before anything loads."""
    flags = {"seed": seed, "skip_bc": skip_bc or None, "skip_ppo": skip_ppo or None}
    config = load_config(path, sets, {key: value for key, value in flags.items() if value is not None})
    check_sb3_sections(config)
    return config


# ------------------------------------------------------------------------------------------- environments
def make_vec_env(kind: str, env_kwargs: dict[str, Any], n_envs: int, seed: int, normalize_reward: bool, gamma: float,
                 training: bool = True) -> VecEnv:
    """``n_envs`` environments sharing one backbone, seeded, with episode statistics (VecMonitor).

    ``kind="dummy"``: SB3's DummyVecEnv of DRRLAttentionEnv, stepped in turn (one forward per env and step);
    ``"batched"``: DRRLAttentionSB3VecEnv, one batched forward for all envs.
    """
    if kind == "batched":
        env: VecEnv = DRRLAttentionSB3VecEnv.make(n_envs, **env_kwargs)
    else:
        env = DummyVecEnv([lambda: DRRLAttentionEnv(**env_kwargs) for _ in range(n_envs)])
    env.seed(seed)
    env = VecMonitor(env)
    if normalize_reward:  # the eval copy must be wrapped the same way to sync statistics, but never updates them
        env = VecNormalize(env, training=training, norm_obs=False, norm_reward=training, gamma=gamma)
    return env


def uncompiled(env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The env arguments with ``compile`` off: for the probe and evaluation envs, which step too little to repay a
    compilation of their own batch size (docs/env.md, "torch.compile")."""
    return {**env_kwargs, "compile": False}


# ----------------------------------------------------------------------------------------------- callbacks
def checkpoint_path(directory: Path, steps: int) -> Path:
    return directory / f"ppo_{steps}_steps.zip"


def vecnormalize_path(model_path: Path) -> Path:
    """VecNormalize statistics saved beside a model: ppo_N_steps.zip -> ppo_N_steps.vecnormalize.pkl."""
    return model_path.with_suffix(".vecnormalize.pkl")


def save_model(model: BaseAlgorithm, path: Path) -> None:
    # Statistics first: a kill between the two files leaves statistics without a model (ignored), never a model
    # that would resume with fresh statistics.
    normalizer = model.get_vec_normalize_env()
    if normalizer is not None:
        atomic_write(vecnormalize_path(path), normalizer.save)
    atomic_write(path, model.save)


class CheckpointCallback(BaseCallback):
    """Every ``every`` env steps (over all envs), save ``checkpoints/ppo_<steps>_steps.zip`` atomically."""

    def __init__(self, directory: Path, every: int) -> None:
        super().__init__()
        self.directory, self.every = directory, every

    def _on_training_start(self) -> None:
        self._schedule()  # a resumed run continues the schedule from its step count

    def _schedule(self) -> None:
        self._next = (self.num_timesteps // self.every + 1) * self.every

    def _on_step(self) -> bool:
        if self.num_timesteps >= self._next:
            save_model(self.model, checkpoint_path(self.directory, self.num_timesteps))
            self._schedule()
        return True


class EnvInfoCallback(BaseCallback):
    """Mean fidelity, FLOPs cost, perturbation, rank fraction... of each rollout, logged as env/<key>."""

    def _on_rollout_start(self) -> None:
        self._values: dict[str, list[float]] = {key: [] for key in INFO_KEYS}

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            for key in INFO_KEYS:
                if key in info:
                    self._values[key].append(float(info[key]))
        return True

    def _on_rollout_end(self) -> None:
        for key, values in self._values.items():
            if values:
                self.logger.record(f"env/{key}", float(np.mean(values)))


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML overriding agents/configs/default.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE", help="override one key (repeatable)")
    parser.add_argument("--seed", type=number_in(int, 0, 2**31))
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--resume", type=Path, metavar="CHECKPOINT", help="an SB3 .zip written by this script")
    parser.add_argument("--skip-bc", action="store_true", help="no behaviour cloning")
    parser.add_argument("--skip-ppo", action="store_true", help="no PPO (behaviour cloning only)")
    return parser.parse_args(argv)


def _build_model(config: TrainConfig, env: VecEnv, algorithm: type[BaseAlgorithm],
                 unit_shape: tuple[int, int]) -> BaseAlgorithm:
    policy_kwargs = copy.deepcopy(config.policy_kwargs)
    policy_kwargs["activation_fn"] = ACTIVATIONS[policy_kwargs["activation_fn"]]
    policy_kwargs["features_extractor_class"] = TransformerFeaturesExtractor
    policy_kwargs.setdefault("features_extractor_kwargs", {})["unit_shape"] = unit_shape
    return algorithm("MlpPolicy", env, policy_kwargs=policy_kwargs, seed=config.seed, verbose=0, **config.ppo)


def _format(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


def check_checkpoint(path: Path) -> None:
    """``--resume`` must name a checkpoint this script wrote: an SB3 zip, whose "data" entry holds the step count."""
    fix = "Fix: pass RUN_DIR/checkpoints/ppo_<steps>_steps.zip."
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint. {fix}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if "data" in archive.namelist():
                return
    raise ConfigError(f"--resume {path}: not an SB3 checkpoint (a zip with a 'data' entry): the file is truncated, "
                      f"corrupt or of another kind. {fix}")


def _resolve_run(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The configuration and the run directory (a resumed run continues in its own, with its own config)."""
    resume: Path | None = args.resume
    if resume is not None:
        check_checkpoint(resume)
    resumed_run = resume.resolve().parent.parent if resume is not None and resume.parent.name == "checkpoints" else None
    config_path = args.config
    if config_path is None and resumed_run is not None and (resumed_run / "config.yaml").is_file():
        config_path = resumed_run / "config.yaml"
    config = resolve_config(config_path, args.set, args.seed, args.skip_bc, args.skip_ppo)
    name = "default" if config_path is None else config_path.stem
    run_dir = args.run_dir or (Path(config.run_dir) if config.run_dir else None) or resumed_run \
        or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return open_run_dir(config, run_dir), run_dir


def _behaviour_cloning(config: TrainConfig, model: BaseAlgorithm, env: DRRLAttentionEnv, run_dir: Path) -> None:
    bc, gamma = config.bc, config.ppo.get("gamma", 0.99)
    demos = collect_demonstrations(env, bc.episodes, bc.fidelity_target, gamma, config.seed + 10_000)
    print(f"oracle (fidelity target {bc.fidelity_target}): " + _format(demos.summary()), flush=True)
    metrics = behaviour_clone(model, demos, bc.epochs, bc.batch_size, bc.learning_rate, bc.value_coef,
                              config.seed, model.logger)
    print("behaviour cloning, last epoch: " + _format(metrics), flush=True)
    save_model(model, run_dir / "bc_model.zip")


def _ppo(config: TrainConfig, model: BaseAlgorithm, run_dir: Path, phase: str, resumed: bool) -> None:
    """PPO up to ``total_timesteps`` (counting the steps a resumed model already has)."""
    remaining = config.total_timesteps - model.num_timesteps
    if remaining <= 0:
        print(f"nothing to do: the model is at step {model.num_timesteps} >= total_timesteps {config.total_timesteps}")
        return
    callbacks: list[BaseCallback] = [EnvInfoCallback()]
    if config.checkpoint_freq:
        callbacks.append(CheckpointCallback(run_dir / "checkpoints", config.checkpoint_freq))
    eval_env = None
    if config.eval_freq:
        eval_env = make_vec_env(config.vec_env, uncompiled(config.env), 1, config.seed + 20_000,
                                config.normalize_reward, config.ppo.get("gamma", 0.99), training=False)
        evaluation = MaskableEvalCallback if isinstance(model, MaskablePPO) else EvalCallback
        callbacks.append(evaluation(eval_env, n_eval_episodes=config.n_eval_episodes,
                                    eval_freq=max(1, config.eval_freq // config.n_envs),
                                    log_path=str(run_dir / "logs" / phase), deterministic=True, verbose=1))
    model.learn(remaining, callback=callbacks, progress_bar=config.progress_bar, reset_num_timesteps=not resumed)
    if eval_env is not None:
        eval_env.close()


def _export_and_evaluate(config: TrainConfig, model: BaseAlgorithm, env: DRRLAttentionEnv, run_dir: Path) -> None:
    export_dir = export_env_policy(run_dir / "export", env, policy_network_from_sb3(model.policy),
                                   config.export.save_backbone, overwrite=True)
    print(f"exported the dynamic-rank model to {export_dir}", flush=True)
    if config.evaluate.enabled:
        evaluate_export(export_dir, run_dir / "eval", config.evaluate.eval_sequences, config.evaluate.batch_size,
                        device=config.env_config().device)


def main(argv: list[str] | None = None) -> Path:
    """Run the pipeline the config asks for; returns the run directory."""
    args = parse_args(argv)
    config, run_dir = _resolve_run(args)
    print(f"run directory: {run_dir}", flush=True)
    set_random_seed(config.seed)
    name = algorithm_name(config)
    algorithm = sb3_algorithms()[name]
    # One direct env for the oracle and the export (backbone, corpus, basis); all envs share the loaded model.
    probe_env = DRRLAttentionEnv(**uncompiled(config.env))
    env = make_vec_env(config.vec_env, config.env, config.n_envs, config.seed, config.normalize_reward,
                       config.ppo.get("gamma", 0.99))
    if args.resume is not None:
        model = algorithm.load(args.resume, env=env, device=config.ppo.get("device", "auto"))
        if config.normalize_reward and vecnormalize_path(args.resume).is_file():
            model.set_env(VecNormalize.load(str(vecnormalize_path(args.resume)), env.venv))
        env.env_method("continue_schedule", model.num_timesteps // config.n_envs)  # epsilon goes on, not over
        phase = f"resume-{model.num_timesteps}"
        print(f"resumed {name} from {args.resume} at step {model.num_timesteps}", flush=True)
    else:
        model, phase = _build_model(config, env, algorithm, probe_env.unit_shape), "train"
    model.set_logger(configure(str(run_dir / "logs" / phase), ["csv", "tensorboard"]))

    if args.resume is None and not config.skip_bc:
        _behaviour_cloning(config, model, probe_env, run_dir)
    if not config.skip_ppo:
        _ppo(config, model, run_dir, phase, resumed=args.resume is not None)
    save_model(model, run_dir / "model.zip")
    print(f"saved {run_dir / 'model.zip'} at step {model.num_timesteps}", flush=True)
    env.close()
    if config.export.enabled:
        _export_and_evaluate(config, model, probe_env, run_dir)
    probe_env.close()
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")

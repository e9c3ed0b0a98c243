"""Train a rank policy for DRRL-Attention-v0: behaviour cloning from an oracle, then PPO; export and evaluate it.

    python agents/train_ppo.py                                        # smoke-scale CPU run (agents/configs/default.yaml)
    python agents/train_ppo.py --config agents/configs/gpu.yaml       # the real run
    python agents/train_ppo.py --set ppo.learning_rate=1e-4 --set env.beta=0.3 --seed 1 --run-dir runs/beta03
    python agents/train_ppo.py --resume runs/X/checkpoints/ppo_4096_steps.zip   # continue at step 4096

Configs are RL-Zoo-style YAML. agents/configs/default.yaml holds every key with its default; ``--config FILE``
overrides it and ``--set key.sub=value`` (repeatable, value parsed as YAML) overrides both. Unknown keys and bad
values stop the run before anything loads. Everything goes to the run directory:

    config.yaml            the resolved configuration (what ``--resume`` reads back)
    logs/<phase>/          TensorBoard events and progress.csv (bc/*, rollout/*, train/*, env/*, eval/*)
    bc_model.zip           the policy after behaviour cloning
    checkpoints/           ppo_<steps>_steps.zip (+ ppo_<steps>_steps.vecnormalize.pkl), written atomically
    model.zip              the final SB3 model
    export/                the dynamic-rank HF model (drrl_gym.export)
    eval/                  results.csv, results.json, results.png, results.md (agents/evaluate.py)
"""

from __future__ import annotations

import argparse
import copy
import difflib
import inspect
import math
import os
import re
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python agents/train_ppo.py`: make the `agents` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import yaml
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor, VecNormalize

from agents.evaluate import evaluate_export
from agents.extractor import TransformerFeaturesExtractor, policy_network_from_sb3
from agents.oracle import behaviour_clone, collect_demonstrations
from drrl_gym.bases import load_or_calibrate_basis
from drrl_gym.env import DRRLAttentionEnv, EnvConfig
from drrl_gym.export import ACTIVATIONS, export_dynamic_rank_model

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
ALGORITHMS: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "maskable_ppo": MaskablePPO}
VEC_ENVS = ("dummy", "batched")
INFO_KEYS = ("fidelity", "flops_cost", "perturbation", "rank_fraction", "flops_saved_attention", "mask_rejections")


# ---------------------------------------------------------------------------------------------------- config
class ConfigError(ValueError):
    """A configuration problem, with where it came from and how to fix it."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 as a float (YAML 1.1 needs a dot: 1.0e-3), for configs and --set alike."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML ({error}).") from error


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist or is not a file. Fix: pass an existing YAML file, e.g. "
                          f"{CONFIG_DIR / 'gpu.yaml'}.")
    value = _parse_yaml(path.read_text(), str(path))
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(value).__name__}.")
    return value


def _open_keys(path: tuple[str, ...]) -> list[str] | None:
    """Allowed keys of an open block (checked against the signature its values go to); None for closed blocks."""
    if path == ("env",):
        return [f.name for f in fields(EnvConfig)]
    if path == ("ppo",):  # either algorithm's; _validate checks them against the one chosen
        return sorted(set(_algorithm_keys(PPO)) | set(_algorithm_keys(MaskablePPO)))
    if path == ("policy_kwargs",):
        excluded = {"self", "observation_space", "action_space", "lr_schedule", "features_extractor_class"}
        return [p for p in inspect.signature(ActorCriticPolicy.__init__).parameters if p not in excluded]
    if path == ("policy_kwargs", "features_extractor_kwargs"):  # token_shape comes from the env
        excluded = ("self", "observation_space", "token_shape")
        return [p for p in inspect.signature(TransformerFeaturesExtractor.__init__).parameters if p not in excluded]
    if path == ("policy_kwargs", "net_arch"):
        return ["pi", "vf"]
    return None


def _algorithm_keys(algorithm: type[BaseAlgorithm]) -> list[str]:
    excluded = {"self", "policy", "env", "policy_kwargs", "seed", "tensorboard_log", "verbose", "_init_setup_model"}
    return [p for p in inspect.signature(algorithm.__init__).parameters if p not in excluded]


def _merge(base: dict[str, Any], override: dict[str, Any], where: str, path: tuple[str, ...] = ()) -> None:
    """Merge ``override`` into ``base`` in place, refusing unknown keys and values of the wrong type."""
    allowed = _open_keys(path)
    for key, value in override.items():
        dotted = ".".join((*path, str(key)))
        known = list(base) if allowed is None else allowed
        if key not in known:
            close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
            hint = f"did you mean {'.'.join((*path, close[0]))!r}?" if close else f"known keys: {', '.join(map(str, known))}"
            raise ConfigError(f"{where}: unknown key {dotted!r}. Fix: {hint}")
        default = base.get(key)
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {dotted} must be a mapping, got {value!r}.")
            _merge(default, value, where, (*path, key))
        elif allowed is None:
            base[key] = _checked_type(dotted, value, default, where)
        else:
            base[key] = value  # open block: its consumer validates the value (EnvConfig, SB3)


def _checked_type(dotted: str, value: Any, default: Any, where: str) -> Any:
    if default is None:  # optional keys (run_dir): any value; their consumer checks it
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where}: {dotted}={value!r} must be of type {type(default).__name__} (default {default!r}).")
    return value


def env_config(config: dict[str, Any]) -> EnvConfig:
    """The env block as a validated EnvConfig (the env's defaults fill what the block leaves out)."""
    try:
        return EnvConfig(**_env_kwargs(config))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"env: {error}") from error


def _algorithm_name(config: dict[str, Any]) -> str:
    if config["algorithm"] != "auto":
        return config["algorithm"]
    env = env_config(config)
    return "ppo" if math.isinf(env.epsilon_start) and math.isinf(env.epsilon_end) else "maskable_ppo"


def _set(assignment: str) -> dict[str, Any]:
    """``a.b.c=value`` -> the nested override {a: {b: {c: value}}} (value parsed as YAML)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {assignment!r}: expected key.sub=value, e.g. --set ppo.learning_rate=1e-4")
    override: Any = _parse_yaml(text, f"--set {assignment}") if text.strip() else None
    for part in reversed(key.split(".")):
        override = {part: override}
    return override


def _finite(value: Any) -> bool:
    """A real number other than NaN and +-inf (YAML reads .nan and .inf as floats), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Keys of the open ppo block that SB3 takes without a check (or with a bare assert after the model loads); _validate
# adds ppo.batch_size, whose bound depends on ppo.normalize_advantage. A key the config leaves out keeps SB3's default
# and is not checked.
PPO_CHECKS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("ppo.n_steps", lambda v: _whole(v) and v >= 1, "an int >= 1"),
    ("ppo.n_epochs", lambda v: _whole(v) and v >= 1, "an int >= 1"),
    ("ppo.learning_rate", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("ppo.gamma", lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]"),
    ("ppo.gae_lambda", lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]"),
    ("ppo.clip_range", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("ppo.ent_coef", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("ppo.vf_coef", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("ppo.max_grad_norm", lambda v: _finite(v) and v > 0, "a finite number > 0"),
]
_ABSENT = object()


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    """The value at ``dotted`` (e.g. "bc.epochs"), or _ABSENT where an open block leaves the key out."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def _validate(config: dict[str, Any]) -> None:
    """Ranges and cross-field rules; EnvConfig checks the env block itself."""
    eval_sequences = env_config(config).eval_sequences
    algorithm = _algorithm_name(config)
    wrong = sorted(set(config["ppo"]) - set(_algorithm_keys(ALGORITHMS[algorithm])))
    if wrong:
        raise ConfigError(f"ppo.{wrong[0]} is not an argument of {ALGORITHMS[algorithm].__name__} (algorithm={algorithm}). "
                          "Fix: drop it, or choose the algorithm that has it.")
    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("seed", lambda v: 0 <= v < 2**31, "in [0, 2**31) (numpy seeds are 32-bit)"),
        ("run_dir", lambda v: v is None or (isinstance(v, str) and v != ""), "null or a directory path"),
        ("n_envs", lambda v: v >= 1, ">= 1"),
        ("total_timesteps", lambda v: v >= 0, ">= 0"),
        ("eval_freq", lambda v: v >= 0, ">= 0 (0: no evaluation)"),
        ("n_eval_episodes", lambda v: v >= 1, ">= 1"),
        ("checkpoint_freq", lambda v: v >= 0, ">= 0 (0: final model only)"),
        ("vec_env", lambda v: v in VEC_ENVS, f"one of {VEC_ENVS}"),
        ("algorithm", lambda v: v in ("auto", *ALGORITHMS), f"one of {('auto', *ALGORITHMS)}"),
        ("bc.episodes", lambda v: v >= 1, ">= 1"),
        ("bc.fidelity_target", lambda v: 0 < v <= 1, "in (0, 1]"),
        ("bc.epochs", lambda v: v >= 0, ">= 0"),
        ("bc.batch_size", lambda v: v >= 1, ">= 1"),
        ("bc.learning_rate", lambda v: _finite(v) and v > 0, "a finite number > 0"),
        ("bc.value_coef", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
        ("evaluate.eval_sequences", lambda v: 1 <= v <= eval_sequences or not config["evaluate"]["enabled"],
         f"in [1, env.eval_sequences={eval_sequences}] (the eval split's size)"),
        ("evaluate.batch_size", lambda v: v >= 1, ">= 1"),
        ("policy_kwargs.activation_fn", lambda v: v in ACTIVATIONS, f"one of {tuple(ACTIVATIONS)} (exportable)"),
        ("ppo.batch_size", lambda v: _whole(v) and v >= (2 if config["ppo"].get("normalize_advantage", True) else 1),
         "an int >= 2 (SB3 normalises advantages over a batch; >= 1 with ppo.normalize_advantage=false)"),
        *PPO_CHECKS,
    ]
    for dotted, ok, rule in checks:
        value = _lookup(config, dotted)
        if value is not _ABSENT and not ok(value):
            raise ConfigError(f"{dotted}={value!r}: must be {rule}. Fix: change it in the config file or with "
                              f"--set {dotted}=VALUE.")
    if config["evaluate"]["enabled"] and not config["export"]["enabled"]:
        raise ConfigError("evaluate.enabled needs export.enabled (the evaluation loads the exported model). "
                          "Fix: --set export.enabled=true, or --set evaluate.enabled=false.")


def load_config(path: Path | None, sets: list[str], seed: int | None = None, skip_bc: bool = False,
                skip_ppo: bool = False) -> dict[str, Any]:
    """default.yaml, overridden by ``path`` (if any), by ``--set`` assignments and by the command-line flags."""
    config = read_yaml(DEFAULT_CONFIG)
    layers = [] if path is None else [(read_yaml(path), str(path))]
    layers += [(_set(s), f"--set {s}") for s in sets]
    flags = {"seed": seed, "skip_bc": skip_bc or None, "skip_ppo": skip_ppo or None}
    layers.append(({k: v for k, v in flags.items() if v is not None}, "command line"))
    for override, where in layers:
        _merge(config, override, where)
    _validate(config)
    return config


# ------------------------------------------------------------------------------------------- environments
def make_vec_env(kind: str, env_kwargs: dict[str, Any], n_envs: int, seed: int, normalize_reward: bool, gamma: float,
                 training: bool = True) -> VecEnv:
    """``n_envs`` environments sharing one backbone, seeded, with episode statistics (VecMonitor).

    ``kind="dummy"``: SB3's DummyVecEnv of DRRLAttentionEnv, stepped in turn (one forward per env and step);
    ``"batched"``: drrl_gym.vector's DRRLAttentionSB3VecEnv, one batched forward for all envs.
    """
    if kind == "batched":
        from drrl_gym.vector import DRRLAttentionSB3VecEnv  # only this option needs the batched env

        env: VecEnv = DRRLAttentionSB3VecEnv.make(n_envs, **env_kwargs)
    else:
        env = DummyVecEnv([lambda: DRRLAttentionEnv(**env_kwargs) for _ in range(n_envs)])
    env.seed(seed)
    env = VecMonitor(env)
    if normalize_reward:  # the eval copy must be wrapped the same way to sync statistics, but never updates them
        env = VecNormalize(env, training=training, norm_obs=False, norm_reward=training, gamma=gamma)
    return env


def _env_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    env = config["env"]
    return {**env, "rank_choices": tuple(env["rank_choices"])} if "rank_choices" in env else dict(env)


# ----------------------------------------------------------------------------------------------- callbacks
def save_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same directory, then rename: a crash never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


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
        save_atomically(vecnormalize_path(path), normalizer.save)
    save_atomically(path, model.save)


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
    parser.add_argument("--seed", type=int)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--resume", type=Path, metavar="CHECKPOINT", help="an SB3 .zip written by this script")
    parser.add_argument("--skip-bc", action="store_true", help="no behaviour cloning")
    parser.add_argument("--skip-ppo", action="store_true", help="no PPO (behaviour cloning only)")
    return parser.parse_args(argv)


def _build_model(config: dict[str, Any], env: VecEnv, algorithm: type[BaseAlgorithm],
                 token_shape: tuple[int, int]) -> BaseAlgorithm:
    policy_kwargs = copy.deepcopy(config["policy_kwargs"])
    policy_kwargs["activation_fn"] = ACTIVATIONS[policy_kwargs["activation_fn"]]
    policy_kwargs["features_extractor_class"] = TransformerFeaturesExtractor
    policy_kwargs["features_extractor_kwargs"]["token_shape"] = token_shape
    return algorithm("MlpPolicy", env, policy_kwargs=policy_kwargs, seed=config["seed"], verbose=0, **config["ppo"])


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


def _resolve_run(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """The configuration and the run directory (a resumed run continues in its own, with its own config)."""
    resume: Path | None = args.resume
    if resume is not None:
        check_checkpoint(resume)
    resumed_run = resume.resolve().parent.parent if resume is not None and resume.parent.name == "checkpoints" else None
    config_path = args.config
    if config_path is None and resumed_run is not None and (resumed_run / "config.yaml").is_file():
        config_path = resumed_run / "config.yaml"
    config = load_config(config_path, args.set, args.seed, args.skip_bc, args.skip_ppo)
    name = DEFAULT_CONFIG.stem if config_path is None else config_path.stem
    run_dir = args.run_dir or (Path(config["run_dir"]) if config["run_dir"] else None) or resumed_run \
        or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} exists and is not a directory. Fix: pass another --run-dir.")
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = yaml.safe_dump({**config, "run_dir": str(run_dir)}, sort_keys=False)
    save_atomically(run_dir / "config.yaml", lambda tmp: tmp.write_text(resolved))  # what --resume reads back
    return config, run_dir


def _behaviour_cloning(config: dict[str, Any], model: BaseAlgorithm, env: DRRLAttentionEnv, run_dir: Path) -> None:
    bc, gamma = config["bc"], config["ppo"].get("gamma", 0.99)
    demos = collect_demonstrations(env, bc["episodes"], bc["fidelity_target"], gamma, config["seed"] + 10_000)
    print(f"oracle (fidelity target {bc['fidelity_target']}): " + _format(demos.summary()), flush=True)
    metrics = behaviour_clone(model, demos, bc["epochs"], bc["batch_size"], bc["learning_rate"], bc["value_coef"],
                              config["seed"], model.logger)
    print("behaviour cloning, last epoch: " + _format(metrics), flush=True)
    save_model(model, run_dir / "bc_model.zip")


def _ppo(config: dict[str, Any], model: BaseAlgorithm, run_dir: Path, phase: str, resumed: bool) -> None:
    """PPO up to ``total_timesteps`` (counting the steps a resumed model already has)."""
    remaining = config["total_timesteps"] - model.num_timesteps
    if remaining <= 0:
        print(f"nothing to do: the model is at step {model.num_timesteps} >= total_timesteps {config['total_timesteps']}")
        return
    callbacks: list[BaseCallback] = [EnvInfoCallback()]
    if config["checkpoint_freq"]:
        callbacks.append(CheckpointCallback(run_dir / "checkpoints", config["checkpoint_freq"]))
    eval_env = None
    if config["eval_freq"]:
        eval_env = make_vec_env(config["vec_env"], _env_kwargs(config), 1, config["seed"] + 20_000,
                                config["normalize_reward"], config["ppo"].get("gamma", 0.99), training=False)
        evaluation = MaskableEvalCallback if isinstance(model, MaskablePPO) else EvalCallback
        callbacks.append(evaluation(eval_env, n_eval_episodes=config["n_eval_episodes"],
                                    eval_freq=max(1, config["eval_freq"] // config["n_envs"]),
                                    log_path=str(run_dir / "logs" / phase), deterministic=True, verbose=1))
    model.learn(remaining, callback=callbacks, progress_bar=config["progress_bar"], reset_num_timesteps=not resumed)
    if eval_env is not None:
        eval_env.close()


def _export_and_evaluate(config: dict[str, Any], model: BaseAlgorithm, env: DRRLAttentionEnv, run_dir: Path) -> None:
    basis = None
    if env.config.basis == "calibrated":  # the env's own basis (from the disk cache)
        basis = load_or_calibrate_basis(env.backbone, env.corpus.calibration, env.corpus.fingerprint)
    export_dir = export_dynamic_rank_model(run_dir / "export", env.backbone, policy_network_from_sb3(model.policy), basis,
                                           env.config, config["export"]["save_backbone"], overwrite=True)
    print(f"exported the dynamic-rank model to {export_dir}", flush=True)
    if config["evaluate"]["enabled"]:
        evaluate_export(export_dir, run_dir / "eval", config["evaluate"]["eval_sequences"], config["evaluate"]["batch_size"],
                        device=config["env"]["device"])


def main(argv: list[str] | None = None) -> Path:
    """Run the pipeline the config asks for; returns the run directory."""
    args = parse_args(argv)
    config, run_dir = _resolve_run(args)
    print(f"run directory: {run_dir}", flush=True)
    set_random_seed(config["seed"])
    algorithm_name = _algorithm_name(config)
    algorithm = ALGORITHMS[algorithm_name]
    # One direct env for the oracle and the export (backbone, corpus, basis); all envs share the loaded model.
    probe_env = DRRLAttentionEnv(**_env_kwargs(config))
    env = make_vec_env(config["vec_env"], _env_kwargs(config), config["n_envs"], config["seed"], config["normalize_reward"],
                       config["ppo"].get("gamma", 0.99))
    if args.resume is not None:
        model = algorithm.load(args.resume, env=env, device=config["ppo"].get("device", "auto"))
        if config["normalize_reward"] and vecnormalize_path(args.resume).is_file():
            model.set_env(VecNormalize.load(str(vecnormalize_path(args.resume)), env.venv))
        env.env_method("continue_schedule", model.num_timesteps // config["n_envs"])  # epsilon goes on, not over
        phase = f"resume-{model.num_timesteps}"
        print(f"resumed {algorithm_name} from {args.resume} at step {model.num_timesteps}", flush=True)
    else:
        model, phase = _build_model(config, env, algorithm, probe_env.token_shape), "train"
    model.set_logger(configure(str(run_dir / "logs" / phase), ["csv", "tensorboard"]))

    if args.resume is None and not config["skip_bc"]:
        _behaviour_cloning(config, model, probe_env, run_dir)
    if not config["skip_ppo"]:
        _ppo(config, model, run_dir, phase, resumed=args.resume is not None)
    save_model(model, run_dir / "model.zip")
    print(f"saved {run_dir / 'model.zip'} at step {model.num_timesteps}", flush=True)
    env.close()
    if config["export"]["enabled"]:
        _export_and_evaluate(config, model, probe_env, run_dir)
    probe_env.close()
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")

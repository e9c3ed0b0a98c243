"""The typed configuration tree of both training scripts, read from YAML and ``--set`` overrides and validated.

One tree serves ``agents/train_ppo.py`` (every section but ``rllib``) and ``agents/train_rllib.py`` (``seed``,
``run_dir``, ``env`` and ``rllib``). The dataclasses below are the schema and the defaults;
``agents/configs/default.yaml`` documents the same keys and values (a test keeps the two equal). Layers apply in
order, each checked as it is merged so that an error names where the bad value came from:

    the defaults  <  --config FILE  <  --set key.sub=value (repeatable)  <  the script's own flags (--seed, ...)

OmegaConf does the merging, rejects unknown keys of the closed sections and converts or rejects values by the
fields' types (YAML values; ``1e-3`` is a float). Each section then checks its ranges when it is constructed. Three
blocks are open, because their keys belong to someone else: ``env`` holds ``drrl_gym.EnvConfig``'s arguments
(:meth:`TrainConfig.env_config` validates them by constructing one), ``ppo`` and ``policy_kwargs`` SB3's
(:func:`check_sb3_sections` checks them against the signatures they are passed to).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from drrl_gym import EnvConfig
from drrl_gym.files import atomic_write_text

VEC_ENVS = ("dummy", "batched")
ALGORITHM_NAMES = ("auto", "ppo", "maskable_ppo")


class ConfigError(ValueError):
    """A configuration problem, with where it came from and how to fix it."""


# ----------------------------------------------------------------------------------------------- range rules
def _finite(value: Any) -> bool:
    """A real number other than NaN and +-inf (YAML reads .nan and .inf as floats), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """What a value must satisfy, and how the error says it ("must be <text>")."""

    ok: Callable[[Any], bool]
    text: str


AT_LEAST_ONE = Rule(lambda v: _whole(v) and v >= 1, "an int >= 1")
AT_LEAST_ZERO = Rule(lambda v: _whole(v) and v >= 0, ">= 0")
POSITIVE = Rule(lambda v: _finite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = Rule(lambda v: _finite(v) and v >= 0, "a finite number >= 0")
UNIT_INTERVAL = Rule(lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]")


def one_of(names: Sequence[str]) -> Rule:
    return Rule(lambda v: v in names, f"one of {tuple(names)}")


def checked(default: Any, rule: Rule) -> Any:
    """A dataclass field with a default and the rule its section checks at construction."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def fail(dotted: str, value: Any, rule: str, fix: str | None = None) -> None:
    fix = fix or f"change it in the config file or with --set {dotted}=VALUE"
    raise ConfigError(f"{dotted}={value!r}: must be {rule}. Fix: {fix}.")


class Section:
    """A config section that checks its fields' rules when constructed (OmegaConf's ``to_object`` constructs it)."""

    PATH: ClassVar[str] = ""  # the section's key in the tree ("" for the root), for error messages

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            rule: Rule | None = f.metadata.get("rule")
            value = getattr(self, f.name)
            if rule is not None and not rule.ok(value):
                fail(f"{self.PATH}.{f.name}" if self.PATH else f.name, value, rule.text)


# --------------------------------------------------------------------------------------------------- sections
@dataclass
class BehaviourCloningConfig(Section):
    """Behaviour cloning from oracle demonstrations (drrl_gym.training.oracle)."""

    PATH: ClassVar[str] = "bc"
    episodes: int = checked(16, AT_LEAST_ONE)
    # The oracle's smallest rank whose attention-output cosine reaches this; 0.98 gave the oracle's best reward on
    # SmolLM2 with the env's default reward weights.
    fidelity_target: float = checked(0.98, Rule(lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]"))
    epochs: int = checked(30, AT_LEAST_ZERO)
    batch_size: int = checked(16, AT_LEAST_ONE)
    learning_rate: float = checked(1.0e-3, POSITIVE)
    value_coef: float = checked(0.5, NON_NEGATIVE)


@dataclass
class ExportConfig(Section):
    PATH: ClassVar[str] = "export"
    enabled: bool = True
    save_backbone: bool = False  # true: copy the backbone into the export (loads offline; ~540 MB for SmolLM2)


@dataclass
class EvaluateConfig(Section):
    """Held-out evaluation of the export (agents/evaluate.py); eval_sequences <= env.eval_sequences."""

    PATH: ClassVar[str] = "evaluate"
    enabled: bool = True
    eval_sequences: int = checked(8, AT_LEAST_ONE)
    batch_size: int = checked(4, AT_LEAST_ONE)


@dataclass
class RLlibConfig(Section):
    """agents/train_rllib.py only. The first group defines the learning problem and is fixed for a run; the rest
    (length and resources) may change on ``--resume``."""

    PATH: ClassVar[str] = "rllib"
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({
        "iterations", "checkpoint_every", "num_env_runners", "num_envs_per_env_runner", "num_gpus_per_env_runner",
        "num_learners", "num_gpus_per_learner", "num_cpus", "ray_address"})

    train_batch_size: int = checked(256, AT_LEAST_ONE)  # env steps per iteration
    minibatch_size: int = checked(64, AT_LEAST_ONE)
    num_epochs: int = checked(4, AT_LEAST_ONE)  # passes over each train batch
    lr: float = checked(3e-4, POSITIVE)
    gamma: float = checked(0.99, Rule(lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]"))  # the RL discount
    hidden: list[int] = checked([64, 64], Rule(lambda v: bool(v) and all(_whole(n) and n >= 1 for n in v),
                                               "a non-empty list of layer sizes >= 1"))

    iterations: int = checked(10, AT_LEAST_ONE)  # train until this iteration
    checkpoint_every: int = checked(5, AT_LEAST_ZERO)  # and at the end; 0: at the end only
    num_env_runners: int = checked(1, AT_LEAST_ZERO)  # processes with a model each; 0: sample in the driver
    num_envs_per_env_runner: int = checked(1, AT_LEAST_ONE)  # envs per runner, sharing its model
    num_gpus_per_env_runner: float = checked(0.0, NON_NEGATIVE)
    num_learners: int = checked(0, AT_LEAST_ZERO)  # learner actors; 0: learn in the driver
    num_gpus_per_learner: float = checked(0.0, NON_NEGATIVE)
    num_cpus: int | None = checked(None, Rule(lambda v: v is None or (_whole(v) and v >= 1), "null or an int >= 1"))
    ray_address: str | None = None  # join an existing cluster (`ray start`), e.g. auto or HOST:6379

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.minibatch_size > self.train_batch_size:
            fail("rllib.minibatch_size", self.minibatch_size, f"<= rllib.train_batch_size={self.train_batch_size}",
                 "pass a minibatch size <= the train batch size")
        if self.num_learners > 1 and self.train_batch_size % self.num_learners:
            multiple = self.train_batch_size // self.num_learners * self.num_learners
            fail("rllib.train_batch_size", self.train_batch_size, f"a multiple of rllib.num_learners (it does not "
                 f"split over {self.num_learners} learners)", f"pass e.g. {multiple}")
        if self.num_env_runners == 0 and self.num_gpus_per_env_runner > 0:
            fail("rllib.num_gpus_per_env_runner", self.num_gpus_per_env_runner, "0 with rllib.num_env_runners=0 "
                 "(the driver samples and Ray assigns it no GPU)", "pass --num-env-runners >= 1, or env.device=cuda")
        if self.num_learners == 0 and self.num_gpus_per_learner > 1:
            fail("rllib.num_gpus_per_learner", self.num_gpus_per_learner, "<= 1 with rllib.num_learners=0 (the "
                 "local learner uses at most one GPU)", "pass --num-learners N --num-gpus-per-learner 1 for N GPUs")
        if self.num_cpus is not None and self.ray_address is not None:
            fail("rllib.num_cpus", self.num_cpus, "null with rllib.ray_address (an existing cluster has its own "
                 "CPUs)", "drop --num-cpus (set it in `ray start --num-cpus`)")


def _default_env() -> dict[str, Any]:
    # Smoke scale for a 2-core CPU: 4 segments of 64 tokens (a warm-up and 3 decisions per episode).
    return dict(model="smollm2-135m", corpus="shakespeare", seq_len=256, segment_len=64,
                rank_choices=[16, 32, 48, 64], device="auto", calibration_sequences=4, eval_sequences=8)


def _default_ppo() -> dict[str, Any]:
    # n_steps per environment and rollout: 96 steps (32 episodes) per rollout with the 2 envs.
    return dict(n_steps=48, batch_size=48, n_epochs=5, learning_rate=3.0e-4, gamma=0.99, gae_lambda=0.95,
                clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, device="auto")


def _default_policy_kwargs() -> dict[str, Any]:
    return dict(net_arch={"pi": [64, 64], "vf": [64, 64]}, activation_fn="tanh",
                features_extractor_kwargs=dict(d_model=64, n_heads=4, n_layers=2, dim_feedforward=128, dropout=0.0))


@dataclass
class TrainConfig(Section):
    """The whole tree; the defaults are a smoke-scale CPU run of agents/train_ppo.py."""

    seed: int = checked(0, Rule(lambda v: _whole(v) and 0 <= v < 2**31, "in [0, 2**31) (numpy seeds are 32-bit)"))
    # str or null. Typed Any because OmegaConf would turn a number into a path name; the rule keeps it a path.
    run_dir: Any = checked(None, Rule(lambda v: v is None or (isinstance(v, str) and v != ""),
                                      "null or a directory path"))
    n_envs: int = checked(2, AT_LEAST_ONE)
    vec_env: str = checked("dummy", one_of(VEC_ENVS))
    algorithm: str = checked("auto", one_of(ALGORITHM_NAMES))
    normalize_reward: bool = False
    progress_bar: bool = True
    skip_bc: bool = False
    skip_ppo: bool = False
    env: dict[str, Any] = field(default_factory=_default_env)
    ppo: dict[str, Any] = field(default_factory=_default_ppo)
    policy_kwargs: dict[str, Any] = field(default_factory=_default_policy_kwargs)
    total_timesteps: int = checked(480, AT_LEAST_ZERO)
    eval_freq: int = checked(192, Rule(lambda v: _whole(v) and v >= 0, ">= 0 (0: no evaluation)"))
    n_eval_episodes: int = checked(2, AT_LEAST_ONE)
    checkpoint_freq: int = checked(192, Rule(lambda v: _whole(v) and v >= 0, ">= 0 (0: final model only)"))
    bc: BehaviourCloningConfig = field(default_factory=BehaviourCloningConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    rllib: RLlibConfig = field(default_factory=RLlibConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.evaluate.enabled and not self.export.enabled:
            raise ConfigError("evaluate.enabled needs export.enabled (the evaluation loads the exported model). "
                              "Fix: --set export.enabled=true, or --set evaluate.enabled=false.")

    def env_config(self, device: str | None = None) -> EnvConfig:
        """The env block as a validated EnvConfig (its defaults fill what the block leaves out). ``device``, if
        given, replaces the block's: an RLlib driver cannot check the device its runners will get."""
        kwargs = dict(self.env) if device is None else {**self.env, "device": device}
        try:
            config = EnvConfig(**kwargs)
            config.check_files()  # a training run needs its corpus: say so before anything loads
            return config
        except TypeError as error:  # an unknown argument
            known = list(inspect.signature(EnvConfig).parameters)
            unknown = next((key for key in kwargs if key not in known), None)
            if unknown is None:
                raise ConfigError(f"env: {error}") from error
            raise ConfigError(f"unknown key 'env.{unknown}' (not a DRRL-Attention-v0 argument). Fix: "
                              f"{_did_you_mean(unknown, known)}") from error
        except ValueError as error:
            raise ConfigError(f"env: {error}") from error

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self), sort_keys=False)


# ----------------------------------------------------------------------------------------------------- loading
def _did_you_mean(key: str, known: Sequence[str], path: str = "") -> str:
    prefix = f"{path}." if path else ""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"did you mean {prefix + close[0]!r}?" if close else f"use one of {', '.join(map(str, known))}"


def read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist or is not a file. Fix: pass an existing YAML file, "
                          "e.g. agents/configs/gpu.yaml.")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"{path}: not valid YAML ({error}).") from error
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got a list.")
    return loaded


def parse_assignment(assignment: str) -> DictConfig:
    """``a.b.c=value`` -> {a: {b: {c: value}}}, the value read as YAML (empty: null)."""
    key, sep, _ = assignment.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {assignment!r}: expected key.sub=value, e.g. --set ppo.learning_rate=1e-4")
    try:
        return OmegaConf.from_dotlist([assignment])
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"--set {assignment}: not valid YAML ({error}).") from error


def _merge(base: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    """``layer`` merged over ``base``; unknown keys and values of the wrong type become ConfigErrors naming ``where``."""
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except ConfigKeyError as error:
        path, _, key = str(error.full_key).rpartition(".")
        parent = OmegaConf.select(base, path) if path else base
        known = list(parent.keys()) if isinstance(parent, DictConfig) else []
        raise ConfigError(f"{where}: unknown key {error.full_key!r}. Fix: {_did_you_mean(key, known, path)}") from None
    except ValidationError as error:
        if not error.full_key:  # a scalar where a section (a mapping) belongs
            raise ConfigError(f"{where}: a section is set to a single value. Fix: set its keys, e.g. bc.epochs=5.") \
                from None
        default = OmegaConf.select(base, str(error.full_key))
        kind = type(default).__name__
        raise ConfigError(f"{where}: {error.full_key}={error.value!r} must be of type {kind} (default {default!r}). "
                          f"Fix: pass a {kind} there.") from None


def load_config(path: Path | None = None, sets: Sequence[str] = (),
                overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The defaults, overridden by the YAML file ``path``, the ``--set`` assignments and ``overrides`` (dotted
    keys, e.g. {"seed": 3, "rllib.lr": 1e-3}: the script's own flags), in that order; validated."""
    merged: DictConfig = OmegaConf.structured(TrainConfig)
    layers = [] if path is None else [(read_yaml(path), str(path))]
    layers += [(parse_assignment(s), f"--set {s}") for s in sets]
    flags = OmegaConf.create({})
    for key, value in (overrides or {}).items():
        OmegaConf.update(flags, key, value)
    layers.append((flags, "command line"))
    for layer, where in layers:
        merged = _merge(merged, layer, where)
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as error:  # to_object wraps what the sections' checks raise
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise


def open_run_dir(config: TrainConfig, run_dir: Path) -> TrainConfig:
    """Create ``run_dir`` and write ``run_dir/config.yaml``, the resolved tree ``--resume`` reads back (atomically:
    never half written); returns the config with ``run_dir`` filled in."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} exists and is not a directory. Fix: pass another --run-dir.")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = replace(config, run_dir=str(run_dir))
    atomic_write_text(run_dir / "config.yaml", config.to_yaml())
    return config


# ------------------------------------------------------------------------------------------ SB3 sections
def _sb3_arguments(cls: type, excluded: set[str]) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p not in excluded | {"self"}]


def sb3_algorithms() -> dict[str, type]:
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO

    return {"ppo": PPO, "maskable_ppo": MaskablePPO}


def algorithm_name(config: TrainConfig) -> str:
    """``config.algorithm``, with "auto" resolved: MaskablePPO while the safety mask is on (finite epsilon)."""
    if config.algorithm != "auto":
        return config.algorithm
    env = config.env_config()
    return "ppo" if math.isinf(env.epsilon_start) and math.isinf(env.epsilon_end) else "maskable_ppo"


# Keys of the open ppo block that SB3 takes without a check (or with a bare assert after the model loads). A key
# the config leaves out keeps SB3's default and is not checked.
PPO_RULES: dict[str, Rule] = {
    "n_steps": AT_LEAST_ONE, "n_epochs": AT_LEAST_ONE, "learning_rate": POSITIVE, "gamma": UNIT_INTERVAL,
    "gae_lambda": UNIT_INTERVAL, "clip_range": POSITIVE, "ent_coef": NON_NEGATIVE, "vf_coef": NON_NEGATIVE,
    "max_grad_norm": POSITIVE,
}


def check_sb3_sections(config: TrainConfig) -> None:
    """What agents/train_ppo.py needs beyond the sections' own checks: the env block (with this machine's device),
    ``ppo`` against the chosen algorithm's arguments, ``policy_kwargs`` against SB3's policy and the extractor,
    and the evaluation's size against the eval split."""
    from stable_baselines3.common.policies import ActorCriticPolicy

    from drrl_gym.policies import ACTIVATIONS
    from drrl_gym.training.extractor import TransformerFeaturesExtractor

    env = config.env_config()
    algorithms = sb3_algorithms()
    excluded = {"policy", "env", "policy_kwargs", "seed", "tensorboard_log", "verbose", "_init_setup_model"}
    either = sorted({key for cls in algorithms.values() for key in _sb3_arguments(cls, excluded)})
    name = algorithm_name(config)
    chosen = _sb3_arguments(algorithms[name], excluded)
    for key, value in config.ppo.items():
        if key not in either:
            raise ConfigError(f"unknown key 'ppo.{key}'. Fix: {_did_you_mean(key, either, 'ppo')}")
        if key not in chosen:
            raise ConfigError(f"ppo.{key} is not an argument of {algorithms[name].__name__} (algorithm={name}). "
                              "Fix: drop it, or choose the algorithm that has it.")
        if key in PPO_RULES and not PPO_RULES[key].ok(value):
            fail(f"ppo.{key}", value, PPO_RULES[key].text)
    if "batch_size" in config.ppo:  # SB3 normalises advantages over a batch, which needs two samples
        smallest = 2 if config.ppo.get("normalize_advantage", True) else 1
        if not (_whole(config.ppo["batch_size"]) and config.ppo["batch_size"] >= smallest):
            fail("ppo.batch_size", config.ppo["batch_size"],
                 "an int >= 2 (SB3 normalises advantages over a batch; >= 1 with ppo.normalize_advantage=false)")

    extractor_kwargs = config.policy_kwargs.get("features_extractor_kwargs", {})
    open_blocks = {  # path: (block, its allowed keys)
        "policy_kwargs": (config.policy_kwargs, _sb3_arguments(
            ActorCriticPolicy, {"observation_space", "action_space", "lr_schedule", "features_extractor_class"})),
        "policy_kwargs.features_extractor_kwargs": (extractor_kwargs, _sb3_arguments(
            TransformerFeaturesExtractor, {"observation_space", "unit_shape"})),  # unit_shape: from the env
        "policy_kwargs.net_arch": (config.policy_kwargs.get("net_arch"), ["pi", "vf"]),  # or a list: shared layers
    }
    for path, (block, known) in open_blocks.items():
        for key in block if isinstance(block, Mapping) else ():
            if key not in known:
                raise ConfigError(f"unknown key '{path}.{key}'. Fix: {_did_you_mean(str(key), known, path)}")
    activation = config.policy_kwargs.get("activation_fn", "tanh")
    if activation not in ACTIVATIONS:
        fail("policy_kwargs.activation_fn", activation, f"one of {tuple(ACTIVATIONS)} (exportable)")
    if config.evaluate.enabled and config.evaluate.eval_sequences > env.eval_sequences:
        fail("evaluate.eval_sequences", config.evaluate.eval_sequences,
             f"in [1, env.eval_sequences={env.eval_sequences}] (the eval split's size)")

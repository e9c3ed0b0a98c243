"""Hardening: fuzzed env inputs, determinism on the CPU, crash safety of training, CLI validation.

* Fuzz (hypothesis): random valid actions and configurations give finite observations inside the observation space
  and finite rewards; invalid actions, reset options and env arguments raise the documented ``ValueError`` (naming
  what was wrong and how to fix it), never another exception, and leave the episode where it was.
* Determinism: the same seed gives bit-identical trajectories, across episodes, in the vector env, whatever the
  global RNGs hold, and in a fresh process.
* Crash safety: ``agents/train_ppo.py`` killed with SIGKILL mid-run leaves only loadable checkpoints, and
  ``--resume`` continues from the last one.
* CLI validation of ``agents/train_ppo.py`` and ``agents/rollout.py``.

Tiny random Llama on the CPU, 64-token sequences in 16-token segments (3 steps an episode); about 30 s in all.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sb3_contrib import MaskablePPO

from agents import rollout
from agents.train_ppo import main as train
from agents.train_ppo import resolve_config
from drrl_gym.bases import BASIS_MODES
from drrl_gym.config import DTYPES, EnvConfig
from drrl_gym.env import DRRLAttentionEnv
from drrl_gym.episode_view import RESET_OPTIONS
from drrl_gym.observation import GRANULARITIES
from drrl_gym.reward import FIDELITY_METRICS
from drrl_gym.training.config import ConfigError
from drrl_gym.vector import DRRLAttentionVecEnv

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses run torch on one thread: on 2 shared cores a second thread mostly waits for a core (test_env.py).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = dict(model="tiny-random-llama", seq_len=64, segment_len=16, rank_choices=(4, 8, 12, 16),
            calibration_sequences=2, eval_sequences=2, device="cpu")
N_TOKENS, N_CHOICES = 2, 4  # tiny-random-llama: 2 layers; 4 rank choices
FUZZ = settings(max_examples=40, deadline=None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def env() -> DRRLAttentionEnv:
    return DRRLAttentionEnv(**TINY)


# ------------------------------------------------------------------------------------------- valid inputs
def assert_valid_observation(env: DRRLAttentionEnv, observation: np.ndarray) -> None:
    assert np.isfinite(observation).all() and env.observation_space.contains(observation)


def assert_valid_step(env: DRRLAttentionEnv, observation: np.ndarray, reward: float, info: dict[str, Any]) -> None:
    """What every step promises: an observation in the space, finite reward and infos, a usable mask."""
    assert_valid_observation(env, observation)
    assert isinstance(reward, float) and math.isfinite(reward) and reward == info["reward"]
    for key, value in info.items():
        if key != "epsilon":  # the mask threshold: math.inf when the mask is off
            assert np.isfinite(np.asarray(value, dtype=np.float64)).all(), key
    assert set(info["ranks"]) <= set(env.rank_choices)
    assert env.action_masks().reshape(env.n_units, -1).any(axis=1).all()  # never an empty block


ACTION_FORMS = st.sampled_from([list, tuple, np.int8, np.uint8, np.int32, np.int64, np.uint64])


@st.composite
def valid_actions(draw: st.DrawFn, n_units: int) -> Any:
    """A valid action in any of the forms a caller may pass: a list, a tuple or an integer array of any width."""
    indices = draw(st.lists(st.integers(0, N_CHOICES - 1), min_size=n_units, max_size=n_units))
    form = draw(ACTION_FORMS)
    return form(indices) if form in (list, tuple) else np.array(indices, dtype=form)


@FUZZ
@given(sequence=st.integers(0, 1000), actions=st.lists(valid_actions(N_TOKENS), min_size=3, max_size=3))
def test_random_valid_actions_give_finite_observations_and_rewards(env, sequence, actions) -> None:
    observation, _ = env.reset(options={"sequence_index": sequence})
    assert_valid_observation(env, observation)
    for step, action in enumerate(actions, start=1):
        observation, reward, terminated, truncated, info = env.step(action)
        assert_valid_step(env, observation, reward, info)
        assert terminated == (step == 3) and not truncated
        assert np.array_equal(info["ranks"] == np.take(env.rank_choices, np.asarray(action, dtype=np.int64)),
                              ~info["projected"])  # what was not projected is what was asked for


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Env arguments across their whole valid range (weights up to 1e3; epsilon up to no mask at all)."""
    weight = st.floats(0, 1e3)
    if draw(st.booleans()):  # a linear schedule between finite thresholds
        epsilon = dict(epsilon_start=draw(st.floats(0, 20)), epsilon_end=draw(st.floats(0, 20)),
                       epsilon_anneal_steps=draw(st.integers(1, 5)))
    else:  # a constant threshold, math.inf: no mask
        constant = draw(st.floats(0, 20) | st.just(math.inf))
        epsilon = dict(epsilon_start=constant, epsilon_end=constant, epsilon_anneal_steps=0)
    return dict(
        segment_len=draw(st.sampled_from([16, 32])), granularity=draw(st.sampled_from(GRANULARITIES)),
        fidelity=draw(st.sampled_from(tuple(FIDELITY_METRICS))), basis=draw(st.sampled_from(BASIS_MODES)),
        fidelity_weight=draw(weight), cost_weight=draw(weight), perturbation_weight=draw(weight), **epsilon,
    )


@settings(max_examples=20, deadline=None)
@given(config=valid_configs(), seed=st.integers(0, 2**32 - 1))
def test_random_valid_configurations_give_finite_episodes(env, config, seed) -> None:
    shared = {k: v for k, v in TINY.items() if k not in ("model", "device")}  # the backbone fixes those two
    fuzzed = DRRLAttentionEnv(backbone=env.backbone, **{**shared, **config})
    observation, _ = fuzzed.reset(seed=seed)
    assert_valid_observation(fuzzed, observation)
    fuzzed.action_space.seed(seed)
    terminated = False
    while not terminated:
        observation, reward, terminated, _, info = fuzzed.step(fuzzed.action_space.sample())
        assert_valid_step(fuzzed, observation, reward, info)


# ----------------------------------------------------------------------------------------- invalid inputs
@st.composite
def out_of_range_actions(draw: st.DrawFn, n_units: int) -> list[int]:
    action = draw(st.lists(st.integers(0, N_CHOICES - 1), min_size=n_units, max_size=n_units))
    action[draw(st.integers(0, n_units - 1))] = draw(st.integers(max_value=-1) | st.integers(min_value=N_CHOICES))
    return action


def invalid_actions(n_units: int) -> st.SearchStrategy[Any]:
    """Everything an action must not be: wrong length or rank, out of range, not integers, not an array at all."""
    index = st.integers(0, N_CHOICES - 1)
    return st.one_of(
        st.lists(index, max_size=2 * n_units + 1).filter(lambda a: len(a) != n_units),  # wrong length, empty
        out_of_range_actions(n_units),  # negative, >= len(rank_choices), beyond int64
        st.lists(st.floats(), min_size=n_units, max_size=n_units),  # floats, integral ones included
        st.lists(st.floats(), min_size=n_units, max_size=n_units).map(np.array),
        st.lists(st.booleans(), min_size=n_units, max_size=n_units),
        st.lists(index, min_size=n_units, max_size=n_units).map(lambda a: [a]),  # 2-D
        st.lists(st.lists(index, max_size=3), min_size=2, max_size=3),  # nested, often ragged
        st.none(), st.text(max_size=4), st.binary(max_size=4),
        st.dictionaries(st.integers(), st.integers(), max_size=2),
        st.lists(st.one_of(st.none(), st.text(max_size=2), index), min_size=n_units, max_size=n_units)
        .filter(lambda a: not all(isinstance(x, int) for x in a)),  # mixed
    )


@FUZZ
@given(action=invalid_actions(N_TOKENS))
@example(action=[[0], [1, 2]])  # ragged: numpy's own ValueError used to escape
def test_invalid_actions_raise_the_documented_error_and_change_nothing(env, action) -> None:
    if env.batch.segment in (0, env.config.n_segments):
        env.reset(seed=0)
    before = (env.batch.segment, env.batch.total_steps)
    with pytest.raises(ValueError, match=r"action must be 2 integer indices in \[0, 4\).*Fix: "):
        env.step(action)
    assert (env.batch.segment, env.batch.total_steps) == before


def invalid_reset_options() -> st.SearchStrategy[Any]:
    bad_index = st.one_of(st.integers(max_value=-1), st.integers(min_value=10**7),  # beyond any train split here
                          st.floats(), st.text(max_size=3), st.booleans(), st.lists(st.integers(), max_size=2))
    return st.one_of(
        st.lists(st.integers(), max_size=2), st.integers(), st.text(max_size=3),  # not a dict
        st.dictionaries(st.text(max_size=8).filter(lambda k: k not in RESET_OPTIONS), st.integers(0, 3), min_size=1,
                        max_size=2),  # misspelt keys
        bad_index.map(lambda index: {"sequence_index": index}),
    )


@settings(max_examples=25, deadline=None)
@given(options=invalid_reset_options())
@example(options=[1])  # used to escape as an AttributeError
@example(options={"sequence_idx": 3})  # a misspelt key used to be ignored
def test_invalid_reset_options_raise_the_documented_error(env, options) -> None:
    env.reset(seed=1)
    with pytest.raises(ValueError, match=r"^options.*Fix: "):
        env.reset(options=options)
    assert env.batch.segment == 1  # the running episode is untouched
    env.step(np.zeros(N_TOKENS, dtype=np.int64))


NOT_AN_INT = st.one_of(st.floats(), st.booleans(), st.none(), st.text(max_size=3), st.lists(st.integers(), max_size=2))
NOT_A_REAL = st.one_of(st.booleans(), st.none(), st.text(max_size=3), st.complex_numbers(), st.just(math.nan),
                       st.lists(st.floats(), max_size=2))
NOT_A_NAME = st.one_of(st.integers(), st.floats(), st.none(), st.lists(st.text(max_size=2), max_size=2), st.just(""))
INFINITE = st.sampled_from([math.inf, -math.inf, 10**400, -(10**400), np.float32("inf")])


def not_one_of(names: tuple[str, ...]) -> st.SearchStrategy[Any]:
    return st.text(max_size=12).filter(lambda s: s not in names) | NOT_A_NAME


BAD_DEVICES = st.one_of(
    st.sampled_from(["meta", "gpu", "cuda:x", "cpu:-1", "mps", "xla", "auto:0", ""]),
    st.text(max_size=8).filter(lambda s: s != "auto" and not s.startswith(("cpu", "cuda"))),
    st.integers(max_value=-1), st.floats(), st.none(), st.lists(st.text(max_size=2), max_size=2),
)
BAD_RANK_CHOICES = st.one_of(
    st.just(()), st.lists(st.integers(max_value=0), min_size=1, max_size=3),
    st.lists(st.integers(1, 64), min_size=2, max_size=4).filter(lambda c: any(a >= b for a, b in zip(c, c[1:]))),
    st.lists(st.floats(), min_size=1, max_size=3), st.lists(st.text(max_size=2), min_size=1, max_size=3),
    st.integers(), st.none(), st.text(max_size=4),
)
BAD_WEIGHTS = st.floats(max_value=-1e-9) | INFINITE | NOT_A_REAL


@st.composite
def invalid_field(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """(the argument the error must name, kwargs with one invalid value or one broken cross-field rule)."""
    count = st.integers(max_value=0) | NOT_AN_INT
    threshold = st.floats(max_value=-1e-9) | st.just(-math.inf) | NOT_A_REAL.filter(lambda v: v is not None)  # None: the default
    cases: dict[str, st.SearchStrategy[Any]] = {
        "model": NOT_A_NAME, "corpus": NOT_A_NAME, "seq_len": count, "segment_len": count,
        "calibration_sequences": count, "eval_sequences": count, "rank_choices": BAD_RANK_CHOICES,
        "granularity": not_one_of(GRANULARITIES), "fidelity": not_one_of(tuple(FIDELITY_METRICS)),
        "basis": not_one_of(BASIS_MODES), "fidelity_weight": BAD_WEIGHTS, "cost_weight": BAD_WEIGHTS,
        "perturbation_weight": BAD_WEIGHTS,
        "epsilon_start": threshold, "epsilon_anneal_steps": st.integers(max_value=-1) | NOT_AN_INT,
        "device": BAD_DEVICES, "dtype": not_one_of(tuple(DTYPES)).filter(lambda v: v is not None)  # None: the default
        | st.sampled_from([torch.int8, torch.float64]),
        "cuda_graphs": st.integers() | st.floats() | st.none() | st.text(max_size=3),
        "compile": st.integers() | st.floats() | st.none() | st.text(max_size=3),
        "reference_cache_gib": BAD_WEIGHTS,
    }
    name = draw(st.sampled_from(sorted(cases)))
    value = draw(cases[name])
    if name == "epsilon_start":  # both ends alike: a different end would trip the schedule rule instead
        return name, {"epsilon_start": value, "epsilon_end": value}
    return name, {name: value}


@st.composite
def broken_cross_field_rule(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    segment_len = draw(st.integers(2, 64))
    uneven = draw(st.integers(1, 16)) * segment_len + draw(st.integers(1, segment_len - 1))
    return draw(st.sampled_from([
        ("seq_len", {"seq_len": uneven, "segment_len": segment_len}),  # not a multiple
        ("seq_len", {"seq_len": segment_len, "segment_len": segment_len}),  # one segment: no decision
        ("epsilon_anneal_steps", {"epsilon_start": 1.0, "epsilon_end": 0.5, "epsilon_anneal_steps": 0}),
        ("epsilon_start", {"epsilon_start": math.inf, "epsilon_end": 0.0, "epsilon_anneal_steps": 2}),  # inf - inf
        ("epsilon_end", {"epsilon_start": 0.0, "epsilon_end": math.inf, "epsilon_anneal_steps": 1}),
    ]))


KNOWN = {f.name for f in fields(EnvConfig)} | {"render_mode", "backbone"}
UNKNOWN_ARGUMENT = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True).filter(lambda k: k not in KNOWN)


@FUZZ
@given(case=invalid_field() | broken_cross_field_rule()
       | st.tuples(UNKNOWN_ARGUMENT, st.integers()).map(lambda kv: (kv[0], {kv[0]: kv[1]})))
@example(case=("fidelity_weight", {"fidelity_weight": 10**400}))  # regressions found by this test: OverflowError,
@example(case=("dtype", {"dtype": []}))  # TypeError (unhashable),
@example(case=("device", {"device": "meta"}))  # accepted, then failed deep in the first forward,
@example(case=("epsilon_start", {"epsilon_start": math.inf, "epsilon_end": 0.0, "epsilon_anneal_steps": 2}))  # NaN mask
def test_invalid_env_arguments_raise_a_value_error_naming_them(case) -> None:
    name, kwargs = case
    with pytest.raises(ValueError, match=re.compile(rf"^{re.escape(name)}=.*Fix: ", re.DOTALL)):
        EnvConfig.from_kwargs({**TINY, **kwargs})  # what DRRLAttentionEnv(**kwargs) and gymnasium.make validate with


NUMPY_INTS = st.sampled_from([int, np.int8, np.int16, np.int64, np.uint8])
NUMPY_REALS = st.sampled_from([float, int, np.float16, np.float32, np.float64])


@FUZZ
@given(ints=NUMPY_INTS, reals=NUMPY_REALS, segments=st.integers(2, 7), segment_len=st.sampled_from([1, 8, 16]),
       weight=st.integers(0, 100), epsilon=st.integers(0, 8) | st.just(math.inf))
@example(ints=np.int8, reals=np.float32, segments=2, segment_len=16, weight=1, epsilon=4)  # int8: used to overflow
def test_valid_arguments_are_normalised_to_plain_python(ints, reals, segments, segment_len, weight, epsilon) -> None:
    """numpy scalars are accepted but stored as int/float: they would overflow (int8 seq_len) or break the export's
    JSON (``asdict(env_config)`` goes into drrl_config.json)."""
    epsilon = math.inf if math.isinf(epsilon) else reals(epsilon)
    config = EnvConfig(seq_len=ints(segments * segment_len), segment_len=ints(segment_len), rank_choices=np.arange(1, 5,
                       dtype=np.int64), fidelity_weight=reals(weight), epsilon_start=epsilon, epsilon_end=epsilon,
                       calibration_sequences=ints(2), eval_sequences=ints(3))
    assert config.n_segments == segments
    for name in ("seq_len", "segment_len", "calibration_sequences", "eval_sequences", "epsilon_anneal_steps"):
        assert type(getattr(config, name)) is int, name
    for name in ("fidelity_weight", "cost_weight", "perturbation_weight", "epsilon_start", "epsilon_end"):
        assert type(getattr(config, name)) is float, name
    assert json.loads(json.dumps(asdict(config)))["seq_len"] == segments * segment_len


# -------------------------------------------------------------------------------------------- determinism
def trajectory_digest(env: DRRLAttentionEnv | DRRLAttentionVecEnv, seed: int, episodes: int) -> str:
    """SHA-256 of every observation, reward and info value of ``episodes`` episodes with seeded random actions.

    Seeded once: later episodes draw their sequences from the env's own RNG, as in training. Works for the env and
    the vector env (whose episodes all end together and restart in the same step).
    """
    digest = hashlib.sha256()

    def add(*values: Any) -> None:  # numbers, numeric arrays and dicts of them
        for value in values:
            if isinstance(value, dict):
                add(*(value[key] for key in sorted(value)))
            else:
                digest.update(np.ascontiguousarray(value).tobytes())

    observation, info = env.reset(seed=seed)
    env.action_space.seed(seed)
    add(observation, info)
    for _ in range(episodes * (env.config.n_segments - 1)):
        observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
        add(observation, reward, terminated, truncated,
            {k: v for k, v in info.items() if not k.startswith("final")})  # final_*: object arrays (addresses)
        if np.all(terminated) and isinstance(env, DRRLAttentionEnv):
            observation, info = env.reset()
            add(observation, info)
    return digest.hexdigest()


def test_same_seed_gives_identical_trajectories_over_episodes_whatever_the_global_rngs() -> None:
    """Everything random in an episode comes from the seed: reseeding torch, numpy and random changes nothing."""
    first = trajectory_digest(DRRLAttentionEnv(**TINY), seed=3, episodes=4)
    torch.manual_seed(12345)
    np.random.seed(12345)
    assert trajectory_digest(DRRLAttentionEnv(**TINY), seed=3, episodes=4) == first
    assert trajectory_digest(DRRLAttentionEnv(**TINY), seed=4, episodes=4) != first


def test_same_seed_gives_identical_vector_env_trajectories() -> None:
    first = trajectory_digest(DRRLAttentionVecEnv(3, **TINY), seed=5, episodes=3)
    assert trajectory_digest(DRRLAttentionVecEnv(3, **TINY), seed=5, episodes=3) == first


def test_same_seed_gives_identical_trajectories_in_a_fresh_process() -> None:
    """A rerun of an experiment loads the model, corpus and basis anew: its trajectories must not change either."""
    here = trajectory_digest(DRRLAttentionEnv(**TINY), seed=7, episodes=2)
    code = ("from drrl_gym.env import DRRLAttentionEnv; "
            "from envs_tests.test_hardening import TINY, trajectory_digest; "
            "print(trajectory_digest(DRRLAttentionEnv(**TINY), seed=7, episodes=2))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == here


# ------------------------------------------------------------------------------- crash safety of training
TRAIN_SETS = [
    "env.model=tiny-random-llama", "env.rank_choices=[4, 8, 12, 16]", "env.seq_len=64", "env.segment_len=16",
    "env.calibration_sequences=2", "env.eval_sequences=2", "env.device=cpu", "ppo.device=cpu", "ppo.n_steps=8",
    "ppo.batch_size=8", "ppo.n_epochs=1", "total_timesteps=1000000", "checkpoint_freq=16", "eval_freq=0",
    "export.enabled=false", "evaluate.enabled=false", "progress_bar=false",
]
CHECKPOINT = re.compile(r"ppo_(\d+)_steps\.zip")


def sets(*assignments: str) -> list[str]:
    return [arg for assignment in assignments for arg in ("--set", assignment)]


def train_command(*args: str) -> list[str]:
    return [sys.executable, "agents/train_ppo.py", *args]



def wait_for_checkpoints(process: subprocess.Popen, directory: Path, count: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(directory.glob("ppo_*_steps.zip"))) < count:
        assert process.poll() is None, f"training exited early ({process.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {count} checkpoints after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def checkpoint_steps(directory: Path) -> list[int]:
    """Step counts of the checkpoints in ``directory``, after checking that every file there is whole.

    Only two kinds of file may be there: checkpoints that load (valid zip, SB3 loads it, its step count is in its
    name) and hidden temporary files of an interrupted write (never picked up as checkpoints).
    """
    steps = []
    for path in sorted(directory.iterdir()):
        match = CHECKPOINT.fullmatch(path.name)
        if match is None:
            assert path.name.startswith(".") and path.name.endswith(".tmp"), f"unexpected file {path.name}"
            continue
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None, path.name
        assert MaskablePPO.load(path, device="cpu").num_timesteps == int(match[1])
        steps.append(int(match[1]))
    return sorted(steps)


@pytest.mark.slow
def test_training_killed_mid_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    with open(log, "w") as output:
        process = subprocess.Popen(train_command("--run-dir", str(run_dir), "--skip-bc", *sets(*TRAIN_SETS)), cwd=ROOT,
                                   env=ONE_THREAD, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_checkpoints(process, run_dir / "checkpoints", count=2, log=log, timeout=240)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the whole process group, mid-rollout or mid-write
            process.wait()
    assert process.returncode == -signal.SIGKILL
    steps = checkpoint_steps(run_dir / "checkpoints")
    assert len(steps) >= 2 and yaml.safe_load((run_dir / "config.yaml").read_text())["checkpoint_freq"] == 16
    last, target = steps[-1], steps[-1] + 32

    resumed = subprocess.run(train_command("--resume", str(run_dir / "checkpoints" / f"ppo_{last}_steps.zip"),
                                           *sets(f"total_timesteps={target}")),
                             cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed maskable_ppo from" in resumed.stdout and f"at step {last}" in resumed.stdout
    assert MaskablePPO.load(run_dir / "model.zip", device="cpu").num_timesteps == target
    with open(run_dir / "logs" / f"resume-{last}" / "progress.csv") as progress:
        logged = [int(row["time/total_timesteps"]) for row in csv.DictReader(progress)]
    assert logged == [last + 16, last + 32]  # one rollout: 2 envs x 8 steps
    assert checkpoint_steps(run_dir / "checkpoints")[-1] == target


# ----------------------------------------------------------------------------------------- CLI validation
@pytest.mark.parametrize("assignment, message", [
    ("ppo.n_steps=0", r"ppo.n_steps=0: must be an int >= 1"),
    ("ppo.batch_size=1", r"ppo.batch_size=1: must be an int >= 2"),
    ("ppo.n_epochs=2.5", r"ppo.n_epochs=2.5: must be an int >= 1"),
    ("ppo.learning_rate=-1e-4", r"ppo.learning_rate=-0.0001: must be a finite number > 0"),
    ("ppo.learning_rate=.nan", r"ppo.learning_rate=nan: must be a finite number > 0"),
    ("ppo.gamma=1.5", r"ppo.gamma=1.5: must be in \[0, 1\]"),
    ("ppo.clip_range=abc", r"ppo.clip_range='abc': must be a finite number > 0"),
    ("ppo.max_grad_norm=0", r"ppo.max_grad_norm=0: must be a finite number > 0"),
    ("bc.learning_rate=.inf", r"bc.learning_rate=inf: must be a finite number > 0"),
    ("seed=-1", r"seed=-1: must be in \[0, 2\*\*31\)"),
    ("run_dir=5", r"run_dir=5: must be null or a directory path"),
    ("total_timesteps=-5", r"total_timesteps=-5: must be >= 0"),
    ("env.fidelity_weight=-1", r"env: fidelity_weight=-1: reward weights must be finite and >= 0.*Fix"),
])
def test_train_rejects_bad_values_before_loading_anything(assignment: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(None, [assignment])


def test_train_rejects_bad_files_and_paths(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "a zip, but not SB3's")
    truncated = tmp_path / "truncated.zip"
    with zipfile.ZipFile(truncated, "w") as archive:
        archive.writestr("data", "{}")
    truncated.write_bytes(truncated.read_bytes()[:-30])  # as a crash mid-write would leave it without the rename
    for resume in ("notes.txt", "other.zip", "truncated.zip"):
        with pytest.raises(ConfigError, match=rf"--resume .*{resume}: not an SB3 checkpoint.*Fix"):
            train(["--resume", str(tmp_path / resume)])
    with pytest.raises(FileNotFoundError, match=r"--resume .*missing.zip: no such checkpoint.*Fix"):
        train(["--resume", str(tmp_path / "missing.zip")])
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist or is not a file.*Fix"):
        train(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match=r"run directory .*notes.txt exists and is not a directory.*Fix"):
        train(["--run-dir", str(tmp_path / "notes.txt")])


@pytest.mark.slow
def test_train_cli_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(train_command("--resume", str(tmp_path / "missing.zip")), cwd=ROOT, env=ONE_THREAD,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --resume") and "Fix:" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--episodes", "0"], "argument --episodes: 0 must be >= 1"),
    (["--threads", "-2"], "argument --threads: -2 must be >= 1"),
    (["--seed", "-1"], r"argument --seed: -1 must be in [0, 4294967296)"),
    (["--seq-len", "ten"], "argument --seq-len: 'ten' is not an integer (must be >= 1)"),
    (["--rank-choices", "4,x"], "argument --rank-choices: 'x' is not an integer (must be >= 1)"),
    (["--model", "tiny-random-llama", "--seq-len", "100", "--segment-len", "32", "--device", "cpu"],
     "seq_len=100: is not a multiple of segment_len=32. Fix: use seq_len=96"),
])
def test_rollout_rejects_bad_flags_with_a_usage_error(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        rollout.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err

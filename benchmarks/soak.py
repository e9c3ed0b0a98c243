"""Soak test: step DRRL-Attention-v0 with random actions for many steps and watch the resident memory (RSS).

    python benchmarks/soak.py --steps 20000 --out docs/results/soak_cpu.json

Why: RL runs step an env millions of times, so anything a step or a reset keeps by mistake (KV caches, captured
attention outputs, info arrays, hooks left on the shared model) adds up to an out-of-memory crash hours in. Such a
leak shows as RSS that keeps growing with the step count; allocator pools and lazily built caches fill during the
first episodes, hence a warm-up. After ``--warmup`` env steps RSS is sampled every ``--sample-every`` env steps (after
``gc.collect()``: only memory that cannot be reclaimed counts); growth = (last sample - first) / first. Every
observation and reward is checked too: finite, and inside the observation space.

Random actions ignore the safety mask, so the projection path runs as well; ``action_masks()`` is queried every
step, as MaskablePPO does. ``--num-envs 1`` steps one ``gymnasium.make`` env (with gymnasium's wrappers) and
resets it at each episode end; more steps the batched vector env (``gymnasium.make_vec``, same-step autoreset),
counting one env step per sub-env. Exits 1 if growth >= ``--max-growth-pct`` or any check failed. Not part of the
test suite: it takes minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from datetime import date
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import transformers

import drrl_gym
from drrl_gym.cli import number_in
from drrl_gym.perplexity import describe_machine

try:
    import psutil
except ImportError:  # not a dependency: /proc/self/statm gives the same number on Linux
    psutil = None

# (observations (N, obs_dim), rewards (N,), action masks (N, mask_dim)); a reset yields its observations and no reward.
StepBatch = tuple[np.ndarray, np.ndarray, np.ndarray]
RSS_SOURCE = "/proc/self/statm" if psutil is None else "psutil"


def resident_bytes() -> int:
    """This process's resident set size."""
    if psutil is None:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


@dataclass
class Checks:
    """What every observation, reward and mask must satisfy; counts of those that did not."""

    observation_space: gym.spaces.Box
    checked: int = 0  # observations (one per env step and per reset)
    nonfinite_observations: int = 0
    outside_observation_space: int = 0
    nonfinite_rewards: int = 0
    masks_with_an_empty_block: int = 0  # a token with no allowed choice

    def record(self, observations: np.ndarray, rewards: np.ndarray, masks: np.ndarray, n_choices: int) -> None:
        finite = np.isfinite(observations).all(axis=1)
        self.checked += len(observations)
        self.nonfinite_observations += int((~finite).sum())
        self.outside_observation_space += sum(not self.observation_space.contains(o) for o in observations[finite])
        self.nonfinite_rewards += int((~np.isfinite(rewards)).sum())
        blocks = masks.reshape(len(masks), -1, n_choices)
        self.masks_with_an_empty_block += int((~blocks.any(-1)).any(-1).sum())  # never: staying is allowed

    def counts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "observation_space"}

    @property
    def failures(self) -> int:
        return (self.nonfinite_observations + self.outside_observation_space + self.nonfinite_rewards
                + self.masks_with_an_empty_block)


@dataclass
class RssMonitor:
    """RSS every ``every`` env steps from ``warmup`` on: (env steps, bytes) pairs."""

    warmup: int
    every: int
    samples: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._next = self.warmup

    def after(self, steps: int) -> bool:
        """Sample if ``steps`` reached the next sampling point; returns whether it did."""
        if steps < self._next:
            return False
        gc.collect()
        self.samples.append((steps, resident_bytes()))
        self._next = (steps // self.every + 1) * self.every
        return True

    def summary(self) -> dict[str, float]:
        steps, rss = (np.array(column, dtype=np.float64) for column in zip(*self.samples))
        slope = np.polyfit(steps, rss, 1)[0] if len(steps) > 1 else 0.0
        first, last, peak = float(rss[0]), float(rss[-1]), float(rss.max())
        return dict(rss_first_mb=first / 2**20, rss_last_mb=last / 2**20, rss_peak_mb=peak / 2**20,
                    growth_pct=100 * (last - first) / first, peak_growth_pct=100 * (peak - first) / first,
                    trend_mb_per_10k_steps=float(slope) * 1e4 / 2**20)


def single_env_steps(kwargs: dict[str, Any], seed: int) -> Iterator[StepBatch]:
    """One env, reset at every episode end: yields each reset and each step."""
    env = gym.make(drrl_gym.ENV_ID, **kwargs)
    env.action_space.seed(seed)
    reset_seed: int | None = seed
    while True:
        observation, _ = env.reset(seed=reset_seed)
        reset_seed, done = None, False
        yield observation[None], np.empty(0), env.unwrapped.action_masks()[None]
        while not done:
            observation, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            done = terminated or truncated
            yield observation[None], np.array([reward]), env.unwrapped.action_masks()[None]


def vector_env_steps(kwargs: dict[str, Any], num_envs: int, seed: int) -> Iterator[StepBatch]:
    """The batched vector env (same-step autoreset): yields the first reset and each step of all sub-envs."""
    env = gym.make_vec(drrl_gym.ENV_ID, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs)
    env.action_space.seed(seed)
    observations, _ = env.reset(seed=seed)
    yield observations, np.empty(0), env.unwrapped.action_masks()
    while True:
        observations, rewards, *_ = env.step(env.action_space.sample())
        yield observations, rewards, env.unwrapped.action_masks()


def soak(steps: Iterator[StepBatch], total: int, checks: Checks, monitor: RssMonitor, n_choices: int) -> int:
    """Run ``steps`` until ``total`` env steps, checking each and sampling RSS; returns the env steps done."""
    done, start = 0, time.perf_counter()
    while done < total:
        observations, rewards, masks = next(steps)
        checks.record(observations, rewards, masks, n_choices)
        done += len(rewards)
        if monitor.after(done):
            print(f"{done} env steps, {time.perf_counter() - start:.0f} s, RSS {monitor.samples[-1][1] / 2**20:.1f} MB",
                  flush=True)
    return done


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=number_in(int, 1), default=20_000, help="env steps (over all sub-envs)")
    parser.add_argument("--num-envs", type=number_in(int, 1), default=1, help="1: one env; more: the batched vector env")
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--rank-choices", type=number_in(int, 1), nargs="+", default=[4, 8, 12, 16])
    parser.add_argument("--seq-len", type=number_in(int, 1), default=64)
    parser.add_argument("--segment-len", type=number_in(int, 1), default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=number_in(int, 1), default=1, help="torch CPU threads (1: cores are shared)")
    parser.add_argument("--warmup", type=number_in(int, 1), default=1_000, help="env steps before the first RSS sample")
    parser.add_argument("--sample-every", type=number_in(int, 1), default=500, help="env steps between RSS samples")
    parser.add_argument("--max-growth-pct", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/soak_cpu.json"))
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} leaves no step to sample: it must be below --steps {args.steps}")
    return args


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    kwargs = dict(model=args.model, rank_choices=tuple(args.rank_choices), seq_len=args.seq_len,
                  segment_len=args.segment_len, calibration_sequences=2, eval_sequences=2, device=args.device)
    steps = single_env_steps(kwargs, args.seed) if args.num_envs == 1 else vector_env_steps(kwargs, args.num_envs,
                                                                                          args.seed)
    n_choices = len(args.rank_choices)
    first = next(steps)  # builds the env (model, corpus, basis) before anything is timed or sampled
    checks = Checks(gym.spaces.Box(0.0, 1.0, first[0].shape[1:], dtype=np.float32))
    checks.record(*first, n_choices=n_choices)
    monitor = RssMonitor(args.warmup, args.sample_every)
    start = time.perf_counter()
    done = soak(steps, args.steps, checks, monitor, n_choices)
    seconds = time.perf_counter() - start
    memory = monitor.summary()
    passed = memory["growth_pct"] < args.max_growth_pct and checks.failures == 0
    result = dict(
        command="python " + " ".join(sys.argv), env_kwargs=kwargs, num_envs=args.num_envs, env_steps=done,
        seconds=seconds, env_steps_per_s=done / seconds, warmup_steps=args.warmup, sample_every=args.sample_every,
        **memory, max_growth_pct=args.max_growth_pct, checks=checks.counts(), passed=passed, rss_samples=[dict(env_steps=s, rss_bytes=b) for s, b in monitor.samples],
        rss_source=RSS_SOURCE, machine=describe_machine(),
        torch=torch.__version__, transformers=transformers.__version__, date=date.today().isoformat(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=2))
    print(f"{'PASS' if passed else 'FAIL'}: RSS {memory['rss_first_mb']:.1f} -> {memory['rss_last_mb']:.1f} MB "
          f"({memory['growth_pct']:+.2f}%, limit {args.max_growth_pct}%) over {done - args.warmup} env steps after "
          f"warm-up; {checks.failures} failed checks of {checks.checked} observations")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

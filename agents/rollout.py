"""Roll out reference agents in DRRL-Attention-v0: mean reward components and wall time per step.

Agents: ``random`` samples the action space uniformly, ignoring the safety mask (the env projects masked
sub-actions and counts them as rejections); ``full`` always takes the largest rank choice (full rank with the
default choices; exact attention with ``--attention select``). Runs offline on the embedded default model:

    python agents/rollout.py --agent both --episodes 2 --seq-len 512 --segment-len 128 --device cpu
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch

import drrl_gym
from drrl_gym.cli import int_list, number_in

Agent = Callable[[gym.Env], np.ndarray]
COMPONENTS = ("reward", "fidelity", "flops_cost", "perturbation", "rank_fraction", "flops_saved_scores",
              "flops_saved_attention", "mask_rejections")


def random_agent(env: gym.Env) -> np.ndarray:
    return env.action_space.sample()


def full_rank_agent(env: gym.Env) -> np.ndarray:
    return env.action_space.nvec - 1


AGENTS: dict[str, Agent] = {"random": random_agent, "full": full_rank_agent}


@dataclass
class RolloutStats:
    """Per-step values of every reward component, and wall times."""

    components: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in COMPONENTS})
    step_seconds: list[float] = field(default_factory=list)
    reset_seconds: list[float] = field(default_factory=list)

    def row(self, name: str) -> list[str]:
        means = [np.mean(self.components[c]) for c in COMPONENTS]
        return [name, str(len(self.step_seconds))] + [f"{m:.4f}" for m in means] + [
            f"{1e3 * np.mean(self.step_seconds):.0f}", f"{1e3 * np.median(self.step_seconds):.0f}",
            f"{1e3 * np.mean(self.reset_seconds):.0f}",
        ]


def roll_out(env: gym.Env, agent: Agent, episodes: int, seed: int) -> RolloutStats:
    stats = RolloutStats()
    env.action_space.seed(seed)
    for episode in range(episodes):
        start = time.perf_counter()
        env.reset(seed=seed + episode)
        stats.reset_seconds.append(time.perf_counter() - start)
        terminated = truncated = False
        while not (terminated or truncated):
            action = agent(env)
            start = time.perf_counter()
            _, _, terminated, truncated, info = env.step(action)
            stats.step_seconds.append(time.perf_counter() - start)
            for name in COMPONENTS:
                stats.components[name].append(float(info[name]))
    return stats


def print_table(rows: list[list[str]]) -> None:
    header = ["agent", "steps", *COMPONENTS, "step_ms_mean", "step_ms_median", "reset_ms"]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for line in [header, *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(line, widths)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--episodes", type=number_in(int, 1), default=2)
    parser.add_argument("--agent", choices=[*AGENTS, "both"], default="both")
    parser.add_argument("--seq-len", type=number_in(int, 1), default=1024)
    parser.add_argument("--segment-len", type=number_in(int, 1), default=128)
    parser.add_argument("--rank-choices", type=int_list(1), default=None,
                        help="comma-separated, e.g. 4,8,12,16 for the tiny models (default: the env's)")
    parser.add_argument("--fidelity", choices=["attention_cosine", "kl", "hidden_cosine"], default="attention_cosine")
    parser.add_argument("--attention", choices=["lowrank_scores", "select"], default="lowrank_scores",
                        help="low-rank scores (a choice is a rank) or selection (a choice is a (rank, keep) pair)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=number_in(int, 0, 2**32), default=0)
    parser.add_argument("--threads", type=number_in(int, 1), default=None,
                        help="torch CPU threads (default: torch's); 1 avoids stalls when other work shares the cores")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    kwargs = dict(model=args.model, corpus=args.corpus, seq_len=args.seq_len, segment_len=args.segment_len,
                  fidelity=args.fidelity, device=args.device, attention=args.attention)
    if args.rank_choices is not None:
        kwargs["rank_choices"] = args.rank_choices
    start = time.perf_counter()
    try:
        env = gym.make(f"drrl_gym:{drrl_gym.ENV_ID}", **kwargs)
    except ValueError as error:  # EnvConfig's: names the flag's argument, the value and a fix
        parser.error(str(error))
    unwrapped = env.unwrapped
    print(f"env built in {time.perf_counter() - start:.1f} s: {unwrapped.backbone.name} on {unwrapped.backbone.device} "
          f"({unwrapped.backbone.dtype}), {unwrapped.n_units} units x {len(unwrapped.feature_names)} features, "
          f"{unwrapped.decisions.n_choices} choices ({args.attention}), {unwrapped.config.n_segments - 1} steps per episode, "
          f"{torch.get_num_threads()} torch threads")
    names = list(AGENTS) if args.agent == "both" else [args.agent]
    print_table([roll_out(env, AGENTS[name], args.episodes, args.seed).row(name) for name in names])
    env.close()


if __name__ == "__main__":
    main()

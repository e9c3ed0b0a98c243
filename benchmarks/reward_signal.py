"""Do returns separate good policies from bad ones? Episode returns of reference policies under each reward.

    python benchmarks/reward_signal.py --out docs/results/reward_signal_cpu.json            # SmolLM2 on the CPU
    python benchmarks/reward_signal.py --model tiny-random-llama --seq-len 128 --segment-len 32 \\
        --rank-choices 4 8 12 16 --episodes 2 --out /tmp/signal.json                        # a smoke run

Every policy runs the same train sequences (``--episodes`` of them, by index) under every reward
(``drrl_gym.reward.REWARDS``): full rank, each uniform rank, uniform random choices, and the probing oracle of
``drrl_gym.training.oracle`` (per segment and layer the smallest rank whose attention-output cosine reaches 0.98). The
table gives each policy's mean episode return, the standard deviation over episodes, and the return spread between
the best and the worst policy in units of that noise. Writes JSON (command, machine, versions, date) and Markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import transformers

from drrl_gym.cli import number_in
from drrl_gym.env import DRRLAttentionEnv
from drrl_gym.files import atomic_write_text
from drrl_gym.perplexity import describe_machine
from drrl_gym.policies import FullRank, RandomRanks, RankPolicy, UniformRank, act_in_env
from drrl_gym.reward import REWARDS
from drrl_gym.training.oracle import oracle_action

Act = Callable[[DRRLAttentionEnv, np.ndarray], np.ndarray]


def acting(policy: RankPolicy) -> Act:
    return lambda env, observation: act_in_env(policy, env, observation)


def policies(env: DRRLAttentionEnv) -> dict[str, Act]:
    decisions = env.decisions
    table = {"full rank": acting(FullRank(decisions))}
    table.update({f"uniform r={rank}": acting(UniformRank(decisions, rank)) for rank in env.rank_choices[:-1]})
    table["random"] = acting(RandomRanks(decisions, seed=0))
    table["oracle (cosine 0.98)"] = lambda env, observation: oracle_action(env, fidelity_target=0.98)
    return table


def returns(env: DRRLAttentionEnv, act: Act, sequences: list[int]) -> list[float]:
    totals = []
    for index in sequences:
        observation, _ = env.reset(seed=0, options={"sequence_index": index})
        total, terminated = 0.0, False
        while not terminated:
            observation, reward, terminated, _, _ = env.step(act(env, observation))
            total += reward
        totals.append(total)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=number_in(int, 1), default=1024)
    parser.add_argument("--segment-len", type=number_in(int, 1), default=128)
    parser.add_argument("--rank-choices", type=number_in(int, 1), nargs="+", default=None)
    parser.add_argument("--episodes", type=number_in(int, 1), default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    kwargs = dict(model=args.model, seq_len=args.seq_len, segment_len=args.segment_len, device=args.device,
                  calibration_sequences=4, eval_sequences=2, epsilon_start=float("inf"), epsilon_end=float("inf"))
    if args.rank_choices:
        kwargs["rank_choices"] = tuple(args.rank_choices)
    rows = []
    for reward in REWARDS:
        env = DRRLAttentionEnv(reward=reward, **kwargs)
        sequences = list(range(args.episodes))
        results = {name: returns(env, act, sequences) for name, act in policies(env).items()}
        means = {name: float(np.mean(r)) for name, r in results.items()}
        noise = float(np.mean([np.std(r, ddof=1) if len(r) > 1 else 0.0 for r in results.values()]))
        spread = max(means.values()) - min(means.values())
        for name, r in results.items():
            rows.append(dict(reward=reward, policy=name, mean=means[name], std=float(np.std(r, ddof=1)) if len(r) > 1
                             else 0.0, returns=r))
        rows.append(dict(reward=reward, policy="signal: (best - worst mean) / mean std over episodes",
                         mean=spread / max(noise, 1e-12), std=noise, returns=[]))
        print(f"{reward}: " + ", ".join(f"{n} {m:+.4f}" for n, m in means.items()) + f"; spread {spread:.4f}, "
              f"episode std {noise:.4f}", flush=True)
        env.close()
    meta = {"command": " ".join(sys.argv), "machine": describe_machine(), "date":
            datetime.now(UTC).isoformat(timespec="seconds"), "versions": {"python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}, "env": kwargs,
            "episodes": args.episodes, "mask": "off (epsilon inf): the policies act unprojected"}
    atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"Measured by `{meta['command']}` on {meta['machine']}, {meta['date']}.", "",
             "| reward | policy | mean return | std over episodes |", "|---|---|---|---|"]
    lines += [f"| {r['reward']} | {r['policy']} | {r['mean']:+.4f} | {r['std']:.4f} |" for r in rows]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Single-file PPO for DRRL-Attention-v0, written only against the Gymnasium API (no Stable-Baselines3).

A template for plugging in a custom algorithm: a small torch actor-critic with one categorical head per decision unit
(``MultiDiscrete``), optional safety masks from ``env.unwrapped.action_masks()`` (used when the env has it), GAE
and the clipped PPO objective. One env, CPU-friendly, ~200 lines.

    python agents/minimal_ppo.py --total-steps 256 --model tiny-random-llama --seq-len 64 --segment-len 16

or from Python: ``train(env_kwargs, total_steps=256, seed=0) -> dict``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import nn

ENV_ID = "DRRL-Attention-v0"


class ActorCritic(nn.Module):
    """Flat observation -> (n_units, n_choices) logits and a scalar value (separate MLPs)."""

    def __init__(self, obs_dim: int, n_units: int, n_choices: int, hidden: int = 64) -> None:
        super().__init__()
        self.n_units, self.n_choices = n_units, n_choices
        self.actor = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                   nn.Linear(hidden, n_units * n_choices))
        self.critic = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                    nn.Linear(hidden, 1))
        nn.init.orthogonal_(self.actor[-1].weight, gain=0.01)
        nn.init.zeros_(self.actor[-1].bias)

    def distribution(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.distributions.Categorical:
        logits = self.actor(obs).view(-1, self.n_units, self.n_choices)
        if mask is not None:  # disallowed choices get (almost) zero probability; a block is never empty
            logits = logits.masked_fill(~mask.view(-1, self.n_units, self.n_choices), -1e8)
        return torch.distributions.Categorical(logits=logits)  # batch shape (B, n_units)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: np.ndarray, mask: np.ndarray | None = None, deterministic: bool = False) -> np.ndarray:
        """One observation (flat) -> MultiDiscrete action (n_units,)."""
        o = torch.as_tensor(obs, dtype=torch.float32).view(1, -1)
        m = None if mask is None else torch.as_tensor(mask, dtype=torch.bool).view(1, -1)
        dist = self.distribution(o, m)
        action = dist.probs.argmax(-1) if deterministic else dist.sample()
        return action[0].numpy()


def _mask(env: gym.Env, use_masks: bool) -> np.ndarray | None:
    method = getattr(env.unwrapped, "action_masks", None)
    return np.asarray(method(), dtype=bool) if use_masks and callable(method) else None


def gae(rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, last_value: float, gamma: float,
        lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation; ``dones[t]`` means step t ended its episode (no bootstrap past it)."""
    advantages = np.zeros_like(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = last_value if t == len(rewards) - 1 else values[t + 1]
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * not_done - values[t]
        running = delta + gamma * lam * not_done * running
        advantages[t] = running
    return advantages, advantages + values


def train(env_kwargs: dict[str, Any] | None = None, total_steps: int = 256, seed: int = 0, *, env: gym.Env | None = None,
          n_steps: int = 32, n_epochs: int = 4, batch_size: int = 16, lr: float = 3e-4, gamma: float = 0.99,
          gae_lambda: float = 0.95, clip: float = 0.2, ent_coef: float = 0.01, vf_coef: float = 0.5,
          max_grad_norm: float = 0.5, hidden: int = 64, use_masks: bool = True) -> dict[str, Any]:
    """Train PPO for ``total_steps`` env steps. Pass ``env_kwargs`` (for ``gymnasium.make``) or a built ``env``.

    Returns ``dict(policy, num_timesteps, updates, losses, episode_returns, seconds, used_masks)``: ``losses`` has
    one dict per update (policy, value, entropy, approx_kl, clip_fraction); ``policy.act(obs, mask)`` acts.
    """
    if env is None:
        import drrl_gym  # noqa: F401  (registers the id)

        env = gym.make(ENV_ID, **(env_kwargs or {}))
    if not isinstance(env.action_space, spaces.MultiDiscrete) or len(set(env.action_space.nvec.tolist())) != 1:
        raise TypeError(f"minimal_ppo needs MultiDiscrete([k] * n_units), got {env.action_space}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_units, n_choices = len(env.action_space.nvec), int(env.action_space.nvec[0])
    obs_dim = int(np.prod(env.observation_space.shape))
    policy = ActorCritic(obs_dim, n_units, n_choices, hidden)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr, eps=1e-5)

    obs, _ = env.reset(seed=seed)
    mask = _mask(env, use_masks)
    used_masks = mask is not None
    num_timesteps, episode_return, episode_returns, losses = 0, 0.0, [], []
    start = time.perf_counter()
    while num_timesteps < total_steps:
        steps = min(n_steps, total_steps - num_timesteps)
        buf_obs = np.zeros((steps, obs_dim), np.float32)
        buf_act = np.zeros((steps, n_units), np.int64)
        buf_mask = np.ones((steps, n_units * n_choices), bool)
        buf_logp, buf_val, buf_rew, buf_done = (np.zeros(steps, np.float32) for _ in range(4))
        for t in range(steps):  # ---------------------------------------------------------------- rollout
            o = torch.as_tensor(obs, dtype=torch.float32).view(1, -1)
            m = None if mask is None else torch.as_tensor(mask).view(1, -1)
            with torch.no_grad():
                dist = policy.distribution(o, m)
                action = dist.sample()
                buf_logp[t] = dist.log_prob(action).sum(-1).item()
                buf_val[t] = policy.value(o).item()
            buf_obs[t], buf_act[t] = obs.reshape(-1), action[0].numpy()
            if mask is not None:
                buf_mask[t] = mask
            obs, reward, terminated, truncated, _ = env.step(buf_act[t])
            buf_rew[t], buf_done[t] = reward, float(terminated or truncated)
            episode_return += float(reward)
            num_timesteps += 1
            if terminated or truncated:
                episode_returns.append(episode_return)
                episode_return = 0.0
                obs, _ = env.reset()
            # NB: a truncated (time-limit) episode is treated like a terminated one (no bootstrap); the env's
            # episodes end by termination only.
            mask = _mask(env, use_masks)
        with torch.no_grad():
            last_value = policy.value(torch.as_tensor(obs, dtype=torch.float32).view(1, -1)).item()
        advantages, returns = gae(buf_rew, buf_val, buf_done, last_value, gamma, gae_lambda)

        t_obs, t_act = torch.as_tensor(buf_obs), torch.as_tensor(buf_act)
        t_mask = torch.as_tensor(buf_mask) if used_masks else None
        t_logp, t_adv, t_ret = (torch.as_tensor(x, dtype=torch.float32) for x in (buf_logp, advantages, returns))
        stats = dict(policy=[], value=[], entropy=[], approx_kl=[], clip_fraction=[])
        for _ in range(n_epochs):  # ----------------------------------------------------------------- update
            for idx in np.array_split(rng.permutation(steps), max(1, steps // batch_size)):
                idx = torch.as_tensor(idx)
                dist = policy.distribution(t_obs[idx], None if t_mask is None else t_mask[idx])
                logp = dist.log_prob(t_act[idx]).sum(-1)
                adv = t_adv[idx]
                if len(idx) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                ratio = torch.exp(logp - t_logp[idx])
                policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
                value_loss = 0.5 * (policy.value(t_obs[idx]) - t_ret[idx]).pow(2).mean()
                entropy = dist.entropy().sum(-1).mean()
                loss = policy_loss + vf_coef * value_loss - ent_coef * entropy
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
                optimizer.step()
                with torch.no_grad():
                    stats["policy"].append(policy_loss.item())
                    stats["value"].append(value_loss.item())
                    stats["entropy"].append(entropy.item())
                    stats["approx_kl"].append(((ratio - 1) - torch.log(ratio)).mean().item())
                    stats["clip_fraction"].append(((ratio - 1).abs() > clip).float().mean().item())
        losses.append({k: float(np.mean(v)) for k, v in stats.items()})
    return dict(policy=policy, num_timesteps=num_timesteps, updates=len(losses), losses=losses,
                episode_returns=episode_returns, seconds=time.perf_counter() - start, used_masks=used_masks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-steps", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--rank-choices", type=int, nargs="+", default=[4, 8, 12, 16])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--segment-len", type=int, default=16)
    parser.add_argument("--calibration-sequences", type=int, default=2)
    parser.add_argument("--eval-sequences", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-steps", type=int, default=32)
    parser.add_argument("--no-masks", action="store_true", help="ignore env.unwrapped.action_masks()")
    parser.add_argument("--save", type=Path, help="write the policy's state_dict here")
    args = parser.parse_args(argv)
    env_kwargs = dict(model=args.model, rank_choices=tuple(args.rank_choices), seq_len=args.seq_len,
                      segment_len=args.segment_len, calibration_sequences=args.calibration_sequences,
                      eval_sequences=args.eval_sequences, device=args.device)
    result = train(env_kwargs, args.total_steps, args.seed, n_steps=args.n_steps, use_masks=not args.no_masks)
    if args.save:
        torch.save(result["policy"].state_dict(), args.save)
    returns = result["episode_returns"]
    print(json.dumps(dict(num_timesteps=result["num_timesteps"], updates=result["updates"],
                          episodes=len(returns), mean_return_last10=float(np.mean(returns[-10:])) if returns else None,
                          last_losses=result["losses"][-1] if result["losses"] else None,
                          used_masks=result["used_masks"], seconds=round(result["seconds"], 2))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

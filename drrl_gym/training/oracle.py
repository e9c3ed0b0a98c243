"""Oracle demonstrations and behaviour cloning (the first of the two training stages).

Oracle: at every step, probe the current segment at each uniform rank choice k (all tokens at choice k:
``env.probe_layer_fidelity``, which does not advance the episode) and give each decision unit (layer) the smallest choice
whose attention-output cosine reaches ``fidelity_target``, else the largest; then apply the safety mask with the
environment's own projection. The probe measures a token's cosine with every layer at the same choice, so it sees
the error that earlier layers pass on at that rank; mixing per-token picks is a heuristic, not an optimum, which
is why PPO fine-tunes afterwards.

Behaviour cloning trains the SB3 policy object itself (so PPO starts from exactly these weights): cross-entropy of
the oracle's actions under the policy's (masked, for MaskablePPO) MultiDiscrete distribution, plus a value loss
towards the oracle's discounted returns so that PPO's first advantages are not computed against an untrained
critic.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from sb3_contrib import MaskablePPO
from stable_baselines3 import PPO
from stable_baselines3.common.logger import Logger
from tqdm.auto import tqdm

from drrl_gym.env import DRRLAttentionEnv


def oracle_action(env: DRRLAttentionEnv, fidelity_target: float) -> np.ndarray:
    """(n_units,) choice indices for the env's current segment: smallest choice reaching the target, masked."""
    n_choices = env.decisions.n_choices
    candidates = np.repeat(np.arange(n_choices)[:, None], env.n_units, axis=1)  # candidate k: every token at k
    cosine = env.probe_layer_fidelity(candidates)  # (n_choices, n_units)
    reaches = cosine >= fidelity_target
    requested = np.where(reaches.any(axis=0), reaches.argmax(axis=0), n_choices - 1)  # argmax: first True
    allowed = env.action_masks().reshape(1, env.n_units, n_choices)
    chosen, _ = env.decisions.project(requested[None], allowed)
    return chosen[0]


@dataclass
class Demonstrations:
    """Oracle transitions, one row per env step."""

    observations: np.ndarray  # (N, *observation_space.shape) float32, as the env returned them
    actions: np.ndarray  # (N, n_units) int64
    masks: np.ndarray  # (N, n_units * n_choices) bool, the action masks the oracle acted under
    returns: np.ndarray  # (N,) discounted reward-to-go within the episode (value targets)
    rewards: np.ndarray  # (N,)
    fidelity: np.ndarray  # (N,)
    rank_fraction: np.ndarray  # (N,) mean rank / head_dim applied

    def summary(self) -> dict[str, float]:
        return {"steps": len(self.actions), "mean_reward": float(self.rewards.mean()),
                "mean_fidelity": float(self.fidelity.mean()), "mean_rank_fraction": float(self.rank_fraction.mean())}


def collect_demonstrations(env: DRRLAttentionEnv, episodes: int, fidelity_target: float, gamma: float, seed: int,
                           progress: bool = True) -> Demonstrations:
    """Run the oracle for ``episodes`` episodes (train sequences drawn with ``seed``); ``gamma``: the RL discount."""
    if not 0 < fidelity_target <= 1:
        raise ValueError(f"fidelity_target={fidelity_target}: must be in (0, 1] (an attention cosine). Fix: e.g. 0.99.")
    rows: dict[str, list] = {field.name: [] for field in fields(Demonstrations)}
    steps_per_episode = env.config.n_segments - 1
    with tqdm(total=episodes * steps_per_episode, desc="oracle demonstrations", disable=not progress) as bar:
        for episode in range(episodes):
            observation, _ = env.reset(seed=seed + episode)
            rewards, terminated = [], False
            while not terminated:
                action = oracle_action(env, fidelity_target)
                rows["observations"].append(observation)
                rows["actions"].append(action)
                rows["masks"].append(env.action_masks())
                observation, reward, terminated, _, info = env.step(action)
                rewards.append(reward)
                rows["fidelity"].append(info["fidelity"])
                rows["rank_fraction"].append(info["rank_fraction"])
                bar.update()
            rows["rewards"] += rewards
            rows["returns"] += _discounted_returns(rewards, gamma)
    dtypes = {"observations": np.float32, "actions": np.int64, "masks": bool}
    return Demonstrations(**{k: np.asarray(v, dtype=dtypes.get(k, np.float32)) for k, v in rows.items()})


def _discounted_returns(rewards: list[float], gamma: float) -> list[float]:
    returns, running = [], 0.0
    for reward in reversed(rewards):
        running = reward + gamma * running
        returns.append(running)
    return returns[::-1]


def behaviour_clone(model: PPO | MaskablePPO, demos: Demonstrations, epochs: int, batch_size: int, learning_rate: float,
                    value_coef: float, seed: int, logger: Logger | None = None, progress: bool = True) -> dict[str, float]:
    """Fit ``model.policy`` to the demonstrations; returns the last epoch's loss and action accuracy.

    A fresh Adam optimiser is used so that PPO's own optimiser state starts clean. The loss is the cross-entropy
    per sub-action (the MultiDiscrete log-likelihood divided by n_units) plus ``value_coef`` times the value MSE.
    """
    policy, maskable = model.policy, isinstance(model, MaskablePPO)
    device = policy.device
    observations = torch.as_tensor(demos.observations, device=device)
    actions = torch.as_tensor(demos.actions, device=device)
    masks = torch.as_tensor(demos.masks, device=device)
    returns = torch.as_tensor(demos.returns, device=device)
    n_units = actions.shape[1]
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    metrics: dict[str, float] = {}
    policy.set_training_mode(True)
    for epoch in tqdm(range(epochs), desc="behaviour cloning", disable=not progress):
        totals = np.zeros(3)
        for index in torch.randperm(len(actions), generator=generator).split(batch_size):
            index = index.to(device)
            extra = {"action_masks": masks[index]} if maskable else {}
            values, log_prob, _ = policy.evaluate_actions(observations[index], actions[index], **extra)
            cross_entropy = -log_prob.mean() / n_units
            value_loss = F.mse_loss(values.flatten(), returns[index])
            loss = cross_entropy + value_coef * value_loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), model.max_grad_norm)
            optimizer.step()
            totals += np.array([cross_entropy.item(), value_loss.item(), 1.0]) * len(index)
        metrics = {"bc/cross_entropy": float(totals[0] / totals[2]), "bc/value_loss": float(totals[1] / totals[2]),
                   "bc/accuracy": _accuracy(policy, observations, actions, masks if maskable else None)}
        if logger is not None:
            for key, value in metrics.items():
                logger.record(key, value)
            logger.dump(step=epoch)
    policy.set_training_mode(False)
    return metrics


@torch.no_grad()
def _accuracy(policy, observations: torch.Tensor, actions: torch.Tensor, masks: torch.Tensor | None) -> float:
    """Fraction of sub-actions where the policy's deterministic choice equals the oracle's."""
    policy.set_training_mode(False)
    distribution = policy.get_distribution(observations) if masks is None else policy.get_distribution(observations, masks)
    predicted = distribution.get_actions(deterministic=True)
    policy.set_training_mode(True)
    return float((predicted == actions).float().mean())

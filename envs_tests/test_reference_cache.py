"""The reference cache: rows kept per sequence within a budget, and resets of seen sequences that run no forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_ENV

from drrl_gym.reference_cache import ReferenceCache
from drrl_gym.vector import DRRLAttentionVecEnv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows(keys: list[int]) -> list[torch.Tensor]:
    """Two tensors per entry (4 + 1 float32 = 20 bytes), their values naming the key."""
    key = torch.tensor(keys, dtype=torch.float32)
    return [key[:, None, None].expand(-1, 2, 2).clone(), key[:, None].clone()]


def test_cache_keeps_rows_and_evicts_the_least_recently_used() -> None:
    cache = ReferenceCache(budget_bytes=3 * 20 + 19)  # room for 3 entries
    cache.store([5, 6, 5], rows([5, 6, 5]))  # the repeated key is stored once
    held, slots = cache.lookup([6, 7, 5])
    assert held.tolist() == [True, False, True] and len(cache) == 2 and cache.entry_bytes == 20
    gathered = cache.gather(slots[held])
    assert gathered[1][:, 0].tolist() == [6.0, 5.0] and gathered[0].shape == (2, 2, 2)
    cache.store([7, 8], rows([7, 8]))  # 6 and 5 were just used: 7 enters, then 8 evicts 6 (least recently used)
    held, _ = cache.lookup([5, 6, 7, 8])
    assert held.tolist() == [True, False, True, True] and cache.allocated_bytes == 3 * 20
    assert (cache.hits, cache.misses) == (5, 2)
    with pytest.raises(ValueError, match="its own cache"):  # one cache, one layout of rows
        cache.store([9], rows([9]), layout=("selection_bound",))


def test_a_budget_below_one_entry_stores_nothing() -> None:
    cache = ReferenceCache(budget_bytes=19)
    cache.store([1], rows([1]))
    assert len(cache) == 0 and not cache.lookup([1])[0].any()
    with pytest.raises(ValueError, match="Fix: pass 0"):
        ReferenceCache(-1)


EVERY_GROUP = ("spectra", "bounds", "context", "attention", "attention_change")


@pytest.mark.parametrize("attention, features", [("lowrank_scores", None), ("select", None), ("select", EVERY_GROUP)])
def test_reset_of_seen_sequences_runs_no_forward_and_repeats_the_episode(attention: str, features) -> None:
    """An episode replayed from the cache equals the first run of it exactly, with no reference forward (also in an
    env the cache is handed to, which has stored nothing itself); a batch of seen and unseen sequences equals the
    uncached env. With every feature group the cached starts carry the attention signals too."""
    kwargs = dict(TINY_ENV, attention=attention, **({} if features is None else {"observation_features": features}))
    cached, uncached = DRRLAttentionVecEnv(num_envs=2, **kwargs), DRRLAttentionVecEnv(num_envs=2, reference_cache_gib=0,
                                                                                      **kwargs)
    actions = np.zeros((2, cached.n_units), dtype=np.int64)

    def episode(env: DRRLAttentionVecEnv, sequences: list[int]) -> tuple[list[np.ndarray], int]:
        """Observations and rewards of one episode on ``sequences``, and how many forwards its reset ran."""
        forwards: list[int] = []
        hook = env.backbone.model.base_model.register_forward_hook(lambda *_: forwards.append(1))
        try:
            observation, _ = env.reset(seed=0, options={"sequence_index": sequences})
        finally:
            hook.remove()
        out = [observation]
        for _ in range(env.config.n_segments - 1):
            observation, reward, _, _, info = env.step(actions)
            out += [observation if "final_obs" not in info else np.stack(info["final_obs"]), reward]
        return out, len(forwards)

    first, first_forwards = episode(cached, [3, 4])
    again, reset_forwards = episode(cached, [4, 3])
    assert first_forwards == 2 and reset_forwards == 0  # warm-up and reference, then nothing
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b[::-1])
    handed = DRRLAttentionVecEnv(num_envs=2, **kwargs)
    handed.batch.references = cached.batch.references
    replayed, handed_forwards = episode(handed, [3, 4])
    assert handed_forwards == 0
    for a, b in zip(first, replayed, strict=True):
        np.testing.assert_array_equal(a, b)
    (mixed, _), (plain, _) = episode(cached, [3, 5]), episode(uncached, [3, 5])
    for a, b in zip(mixed, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)

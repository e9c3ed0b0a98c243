"""drrl_gym.export: the dynamic-rank HF model (round trip, integrity checks, same decisions as the environment,
segment-by-segment semantics in ``model(...)`` and ``generate``). Tiny random Llama, seconds in all."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ENV as TINY
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from drrl_gym.backbone import load_backbone
from drrl_gym.calibration import load_or_calibrate_basis
from drrl_gym.env import DRRLAttentionEnv
from drrl_gym.export import (
    BASIS_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    POLICY_FILE,
    ControllerSpec,
    PolicyArch,
    RankPolicyNetwork,
    build_dynamic_rank_model,
    export_dynamic_rank_model,
    load_dynamic_rank_model,
)
from drrl_gym.hf_compat import cache_argument, output_cache
from drrl_gym.policies import FullRank, UniformRank


@pytest.fixture(scope="module")
def env() -> DRRLAttentionEnv:
    return DRRLAttentionEnv(**TINY)


@pytest.fixture(scope="module")
def basis(env: DRRLAttentionEnv) -> torch.Tensor:
    return load_or_calibrate_basis(env.backbone, env.corpus.calibration, env.corpus.fingerprint)


def random_policy(env: DRRLAttentionEnv, seed: int = 0) -> RankPolicyNetwork:
    torch.manual_seed(seed)
    n_units, n_features = env.unit_shape
    policy = RankPolicyNetwork(PolicyArch(n_units, n_features, env.decisions.n_choices, d_model=16, n_heads=2,
                                          dim_feedforward=32, pi_layers=(32,)))
    with torch.no_grad():  # larger logits than the default init, so that choices differ between observations
        policy.action.weight.mul_(20)
    return policy.eval()


def fresh_model(env: DRRLAttentionEnv, basis: torch.Tensor, policy: RankPolicyNetwork):
    """A dynamic-rank model on a backbone of its own (the runtime wraps its forward; the env's stays untouched)."""
    return build_dynamic_rank_model(load_backbone("tiny-random-llama", "cpu"), policy, basis,
                                    ControllerSpec.from_env_config(env.config), env.config)


def test_round_trip_is_identical_for_forward_and_generate(env, basis, tmp_path) -> None:
    policy = random_policy(env)
    in_memory = fresh_model(env, basis, policy)
    export_dynamic_rank_model(tmp_path / "export", env.backbone, policy, basis, env.config)
    loaded = load_dynamic_rank_model(tmp_path / "export", "cpu")
    tokens = env.corpus.eval[:2]
    with torch.no_grad():
        a, b = in_memory(tokens).logits, loaded(tokens).logits
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(in_memory.drrl.rank_history, loaded.drrl.rank_history))
    assert len(loaded.drrl.rank_history) == 4 and loaded.drrl.rank_history[0].min() == 16  # warm-up at full rank
    prompt = tokens[:1, :40]
    generated = [m.generate(prompt, max_new_tokens=60, do_sample=False) for m in (in_memory, loaded)]
    assert generated[0].shape == (1, 100) and torch.equal(*generated)
    assert len(loaded.drrl.rank_history) == 4  # decisions at 32, 64 and 96 tokens, as in the env


def test_tampered_or_wrong_version_export_is_refused(env, basis, tmp_path) -> None:
    path = export_dynamic_rank_model(tmp_path / "export", env.backbone, random_policy(env), basis, env.config)
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["controller"]["rank_choices"] == [4, 8, 12, 16] and config["controller"]["epsilon"] == env.config.epsilon_end
    assert set(config["files"]) == {"policy.safetensors", "basis.safetensors"}

    weights = load_file(path / POLICY_FILE)
    weights["action.bias"] = weights["action.bias"] + 1
    save_file(weights, path / POLICY_FILE)
    with pytest.raises(ValueError, match="checksum mismatch .*policy.safetensors"):
        load_dynamic_rank_model(path, "cpu")

    (path / CONFIG_FILE).write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        load_dynamic_rank_model(path, "cpu")
    with pytest.raises(FileExistsError):
        export_dynamic_rank_model(path, env.backbone, random_policy(env), basis, env.config)


def edit_config(path: Path, change: Callable[[dict], object]) -> None:
    """Change drrl_config.json in place (it holds the checksums, so it is not checksummed itself)."""
    config = json.loads((path / CONFIG_FILE).read_text())
    change(config)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


# Each way an export can be damaged or mismatched after it was written: (damage, error, what the message says).
TAMPERING: dict[str, tuple[Callable[[Path], object], type[Exception], str]] = {
    "config missing": (lambda p: (p / CONFIG_FILE).unlink(), FileNotFoundError,
                       r"is not a dynamic-rank export: no drrl_config.json. Fix"),
    "listed file missing": (lambda p: (p / BASIS_FILE).unlink(), FileNotFoundError,
                            r"basis.safetensors is listed in drrl_config.json but missing. Fix"),
    "basis byte flipped": (lambda p: flip_last_byte(p / BASIS_FILE), ValueError,
                           r"checksum mismatch for .*basis.safetensors.*Fix"),
    "policy truncated": (lambda p: truncate(p / POLICY_FILE), ValueError, r"checksum mismatch for .*policy.safetensors.*Fix"),
    "wrong format": (lambda p: edit_config(p, lambda c: c.update(format="other/format")), ValueError,
                     r"format 'other/format' is not 'drrl-gym/dynamic-rank-model'. Fix"),
    "older version": (lambda p: edit_config(p, lambda c: c.update(format_version=FORMAT_VERSION - 1)), ValueError,
                      rf"format version {FORMAT_VERSION - 1}, but this drrl-gym reads version {FORMAT_VERSION}. Fix"),
    "no version": (lambda p: edit_config(p, lambda c: c.pop("format_version")), ValueError, r"format version None.*Fix"),
    "other geometry": (lambda p: edit_config(p, lambda c: c["backbone"].update(spec="tiny-random-gpt2")), ValueError,
                       r"backbone 'tiny-random-gpt2' has geometry .*num_kv_heads=4.* but the export was made for "
                       r".*num_kv_heads=2.*Fix"),
}


@pytest.mark.parametrize("damage", sorted(TAMPERING))
def test_damaged_or_mismatched_export_is_refused_with_a_clear_error(env, basis, tmp_path, damage: str) -> None:
    path = export_dynamic_rank_model(tmp_path / "export", env.backbone, random_policy(env), basis, env.config)
    change, error, message = TAMPERING[damage]
    change(path)
    with pytest.raises(error, match=message):
        load_dynamic_rank_model(path, "cpu")


def test_saved_backbone_loads_from_the_directory(env, basis, tmp_path) -> None:
    policy = random_policy(env, seed=1)
    path = export_dynamic_rank_model(tmp_path / "export", env.backbone, policy, basis, env.config, save_backbone=True)
    assert (path / "backbone" / "config.json").is_file()
    loaded = load_dynamic_rank_model(path, "cpu")
    tokens = env.corpus.eval[:1]
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, fresh_model(env, basis, policy)(tokens).logits)


@pytest.mark.parametrize("seed, epsilon", [(0, None), (2, None), (1, 0.05)])
def test_model_decides_like_the_environment(env, basis, seed, epsilon) -> None:
    """Same policy, same sequence: the exported controller picks the ranks the env applies for the same actions."""
    if epsilon is not None:  # a tight mask, so that masking changes what the policy would pick
        env = DRRLAttentionEnv(**{**TINY, "epsilon_start": epsilon, "epsilon_end": epsilon})
    policy = random_policy(env, seed)
    n_choices = env.decisions.n_choices
    if epsilon is not None:  # push the policy towards the lowest rank, which the tight mask forbids from full rank
        with torch.no_grad():
            policy.action.bias.view(env.n_units, n_choices)[:, 0] += 50
    observation, _ = env.reset(options={"sequence_index": seed})
    env_ranks, masked, terminated = [], 0, False
    while not terminated:
        allowed = env.action_masks().reshape(1, env.n_units, n_choices)
        matrix = observation.reshape(1, *env.unit_shape)
        action = policy.act(matrix, allowed)[0]
        masked += int((action != policy.act(matrix, np.ones_like(allowed))[0]).any())
        observation, _, terminated, _, info = env.step(action)
        env_ranks.append(info["ranks"])
    model = fresh_model(env, basis, policy)
    with torch.no_grad():
        model(env.corpus.train[seed : seed + 1])
    model_ranks = [r[0, :, 0].numpy() for r in model.drrl.rank_history[1:]]  # layer granularity: KV heads share
    assert np.array_equal(np.stack(env_ranks), np.stack(model_ranks))
    assert epsilon is None or masked > 0


def test_token_by_token_matches_one_call(env, basis) -> None:
    model = fresh_model(env, basis, random_policy(env, seed=3))
    tokens = env.corpus.eval[1:2, :100]
    with torch.no_grad():
        whole = model(tokens).logits
        ranks_whole = [r.clone() for r in model.drrl.rank_history]
        cache, pieces = DynamicCache(config=model.config), []
        for chunk in (tokens[:, :20], *tokens[:, 20:].split(1, dim=1)):  # a prompt, then one token at a time
            pieces.append(model(chunk, **cache_argument(cache)).logits)
    assert all(torch.equal(a, b) for a, b in zip(ranks_whole, model.drrl.rank_history))
    assert torch.allclose(whole, torch.cat(pieces, dim=1), atol=1e-4)


def test_full_rank_policy_is_the_unmodified_model(env, basis) -> None:
    model = fresh_model(env, basis, random_policy(env))
    reference = load_backbone("tiny-random-llama", "cpu").model
    tokens = env.corpus.eval[:2]
    controller, unmasked = model.drrl.controller, replace(model.drrl.spec, epsilon=None)
    model.drrl.use(FullRank(controller), unmasked)
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, reference(tokens).logits, atol=1e-4)
    assert model.drrl.unmodified and not model.drrl.attention.cache_projected_keys
    model.drrl.use(UniformRank(controller, 4), unmasked)
    with torch.no_grad():
        low = model(tokens).logits
    assert [int(r.max()) for r in model.drrl.rank_history] == [16, 4, 4, 4]
    assert (low - reference(tokens).logits).abs().max() > 1e-3
    plain = model.drrl.uninstall()
    assert not hasattr(plain, "drrl") and plain.config._attn_implementation != "drrl_dynamic_rank"
    with torch.no_grad():
        assert torch.allclose(plain(tokens).logits, reference(tokens).logits, atol=1e-4)


def test_unsupported_inputs_fail_clearly(env, basis) -> None:
    model = fresh_model(env, basis, random_policy(env))
    tokens = env.corpus.eval[:2, :40]
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0
    with pytest.raises(NotImplementedError, match="padding"):
        model(tokens, attention_mask=mask)
    out = model(tokens[:, :20])
    output_cache(out).crop(-10)
    with pytest.raises(RuntimeError, match="no longer matches the cache"):
        model(tokens[:, 10:20], **cache_argument(output_cache(out)))


def test_forward_options_logits_to_keep_labels_hidden_states(env, basis) -> None:
    model = fresh_model(env, basis, random_policy(env, seed=4))
    tokens = env.corpus.eval[:2, :80]
    with torch.no_grad():
        full = model(tokens, output_hidden_states=True)
        last = model(tokens, logits_to_keep=1).logits
        with_loss = model(tokens, labels=tokens).loss
    assert last.shape == (2, 1, full.logits.shape[-1]) and torch.allclose(last[:, 0], full.logits[:, -1], atol=1e-5)
    vocab = full.logits.shape[-1]
    expected = torch.nn.functional.cross_entropy(full.logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    assert torch.allclose(with_loss, expected, atol=1e-5)
    assert len(full.hidden_states) == 3 and all(h.shape == (2, 80, 64) for h in full.hidden_states)


def test_export_trained_on_a_local_corpus_loads_where_that_corpus_is_missing(env, basis, tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("text the export was trained on, which the machine it moves to does not have\n")
    trained_on = replace(env.config, corpus=str(corpus))
    path = export_dynamic_rank_model(tmp_path / "export", env.backbone, random_policy(env), basis, trained_on)
    corpus.unlink()
    with pytest.raises(ValueError, match="no such file"):
        trained_on.check_files()  # what an env or a training run would say
    model = load_dynamic_rank_model(path, "cpu")  # loading only records the training config: no check of its files
    assert model.drrl.env_config.corpus == str(corpus)
    assert model(torch.zeros((1, 40), dtype=torch.long)).logits.shape[:2] == (1, 40)


@pytest.mark.parametrize(("bound_queries", "epsilon"), [(None, 0.3), (4, 0.6)])  # the last queries drop more mass
def test_selection_model_decides_like_the_environment(tmp_path, bound_queries, epsilon) -> None:
    """Selection mode end to end: the exported model picks the (rank, keep) settings the env applies (observing
    the bound over the same queries), and generate() switches them every segment."""
    env = DRRLAttentionEnv(**{**TINY, "attention": "select", "keep_choices": (0.25, 0.5, 1.0),
                              "epsilon_start": epsilon, "epsilon_end": epsilon, "bound_queries": bound_queries})
    basis = env.batch.attention.basis
    policy = random_policy(env, seed=4)
    observation, _ = env.reset(options={"sequence_index": 1})
    applied, terminated = [], False
    while not terminated:
        allowed = env.action_masks().reshape(1, env.n_units, env.decisions.n_choices)
        action = policy.act(observation.reshape(1, *env.unit_shape), allowed)[0]
        observation, _, terminated, _, info = env.step(action)
        applied.append((info["ranks"], info["keeps"]))
    assert len({tuple(k) for _, k in applied}) > 1 or len({tuple(r) for r, _ in applied}) > 1  # settings vary
    path = export_dynamic_rank_model(tmp_path / "export", env.backbone, policy, basis, env.config)
    model = load_dynamic_rank_model(path, "cpu")
    assert model.drrl.spec.attention == "select" and model.drrl.attention.approximation == "select"
    assert model.drrl.spec.bound_queries == env.config.bound_queries == (bound_queries or 32)  # TINY: 32 a segment
    with torch.no_grad():
        model(env.corpus.train[1:2])
    runtime = model.drrl
    for (ranks, keeps), rank, keep in zip(applied, runtime.rank_history[1:], runtime.keep_history[1:], strict=True):
        assert np.array_equal(ranks, rank[0, :, 0].numpy()) and np.allclose(keeps, keep[0, :, 0].numpy())
    with torch.no_grad():
        model.generate(env.corpus.eval[:1, :8], max_new_tokens=70, do_sample=False)
    assert len(runtime.rank_history) == 3  # 78 tokens: segments 0, 1 and 2 of 32


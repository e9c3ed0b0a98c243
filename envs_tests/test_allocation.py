"""Greedy static rank allocation: full-rank start, the greedy choice against an independent recomputation, batching,
the FLOPs fraction, save/load, budgets, bad input and the CLI. Tiny random models (head_dim 16) and short sequences."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from drrl_gym import allocation
from drrl_gym.allocation import AllocationPath, greedy_static_allocation, parse_args, static_rank_losses
from drrl_gym.calibration import calibrate_basis
from drrl_gym.flops import layer_flops
from drrl_gym.lowrank import DynamicRankAttention

GRID = (4, 8, 12, 16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sequences() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def basis(tiny_llama, sequences) -> torch.Tensor:
    return calibrate_basis(tiny_llama, sequences, progress=False)


@pytest.fixture(scope="module")
def layer_path(tiny_llama, basis, sequences) -> AllocationPath:
    return greedy_static_allocation(tiny_llama, basis, sequences, GRID, "layer", 0.25, progress=False)


@pytest.fixture(scope="module")
def head_path(tiny_llama, basis, sequences) -> AllocationPath:
    return greedy_static_allocation(tiny_llama, basis, sequences, GRID, "kv_head", 0.5, batch_size=3, progress=False)


def plain_nll(model, tokens: torch.Tensor) -> float:
    """Mean next-token NLL from the model's own logits, one sequence at a time."""
    total = 0.0
    for row in tokens:
        logits = model(row[None]).logits[0, :-1]
        total += F.cross_entropy(logits, row[1:], reduction="sum").item()
    return total / (tokens.shape[0] * (tokens.shape[1] - 1))


# ------------------------------------------------------------------------------------------------ the search
@torch.no_grad()
def test_first_step_is_full_rank_with_the_plain_model_loss(tiny_backbone, sequences):
    basis = calibrate_basis(tiny_backbone, sequences, progress=False)
    path = greedy_static_allocation(tiny_backbone, basis, sequences, GRID, min_scores_fraction=1.0, progress=False)
    (step,) = path.steps
    assert torch.equal(step.ranks_tensor(), torch.full((2, tiny_backbone.geometry.num_kv_heads), 16))
    assert step.scores_fraction == 1.0
    assert step.loss == pytest.approx(plain_nll(tiny_backbone.model, sequences), rel=1e-5)


@pytest.mark.parametrize("path_name", ["layer_path", "head_path"])
def test_each_step_lowers_one_token_by_one_grid_step_until_the_budget(request, path_name, tiny_llama):
    path: AllocationPath = request.getfixturevalue(path_name)
    target = 0.25 if path_name == "layer_path" else 0.5
    heads_per_step = tiny_llama.geometry.num_kv_heads if path.granularity == "layer" else 1
    fractions = [step.scores_fraction for step in path.steps]
    assert all(a > b for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] <= target < fractions[-2]
    for before, after in zip(path.steps, path.steps[1:]):
        lowered = before.ranks_tensor() - after.ranks_tensor()
        assert sorted(lowered.flatten().tolist())[-heads_per_step:] == [4] * heads_per_step
        assert lowered.count_nonzero() == heads_per_step
    # the fraction is drrl_gym.flops' scores term relative to full rank, for any segment shape
    g, last = tiny_llama.geometry, path.steps[-1]
    scores = sum(layer_flops(g, 8, 40, ranks).scores for ranks in last.ranks_tensor().tolist())
    assert last.scores_fraction == pytest.approx(scores / (g.num_layers * layer_flops(g, 8, 40, 16).scores))


@torch.no_grad()
def test_accepted_candidate_was_the_best_one(tiny_llama, basis, sequences, head_path):
    """Recompute every candidate of step 1 alone, one row at a time through the model's own logits."""
    full, accepted = head_path.steps[0], head_path.steps[1]
    attention = DynamicRankAttention(tiny_llama.geometry, basis)
    losses, fractions = {}, {}
    with attention.attached(tiny_llama.model):
        for layer in range(2):
            for head in range(2):
                ranks = full.ranks_tensor()
                ranks[layer, head] = 12
                attention.set_ranks(ranks[None])
                losses[layer, head] = plain_nll(tiny_llama.model, sequences)
                fractions[layer, head] = ranks.sum().item() / (ranks.numel() * 16)
    cost = {token: (losses[token] - full.loss) / (1 - fractions[token]) for token in losses}
    chosen = tuple((full.ranks_tensor() != accepted.ranks_tensor()).nonzero()[0].tolist())
    assert accepted.loss == pytest.approx(losses[chosen], rel=1e-5)
    assert cost[chosen] <= min(cost.values()) + 1e-5
    assert len(set(losses.values())) == 4  # the candidates really differ, so the choice means something


def test_batched_losses_equal_losses_alone(tiny_llama, basis, sequences, monkeypatch):
    candidates = torch.tensor([[[16, 8], [4, 12]], [[4, 4], [16, 16]], [[12, 16], [8, 4]]])
    monkeypatch.setattr(allocation, "LOGIT_ELEMENTS", 1)  # the LM head one row at a time
    batched = static_rank_losses(tiny_llama, basis, sequences, candidates, batch_size=3)  # row 2 starts candidate 1
    monkeypatch.undo()
    alone = torch.cat([static_rank_losses(tiny_llama, basis, sequences[i : i + 1], c[None], batch_size=1)
                       for c in candidates for i in range(2)]).view(3, 2).mean(1)
    assert batched.shape == (3,)
    assert torch.allclose(batched, alone, rtol=1e-5, atol=0)
    assert batched.unique().numel() == 3


# -------------------------------------------------------------------------------------- the path as a record
def test_save_load_round_trip(layer_path, tmp_path):
    file = tmp_path / "sub" / "allocation.json"
    layer_path.save(file)
    assert AllocationPath.load(file) == layer_path
    assert [p.name for p in file.parent.iterdir()] == ["allocation.json"]  # the temporary file was renamed
    assert layer_path.calibration_tokens == 2 * 40 and layer_path.model == "tiny-random-llama"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="other"), "not an allocation path"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.pop("rank_grid"), "misses or mistypes"),
    (lambda d: d["steps"][1].update(scores_fraction=0.1), "its ranks give a different one"),
    (lambda d: d["steps"][1]["ranks"][0].__setitem__(0, 5), "outside the rank grid"),
    (lambda d: d.update(granularity="head"), "granularity"),
])
def test_load_rejects_bad_files(layer_path, tmp_path, edit, message):
    file = tmp_path / "allocation.json"
    layer_path.save(file)
    payload = json.loads(file.read_text())
    edit(payload)
    file.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=message):
        AllocationPath.load(file)
    file.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        AllocationPath.load(file)


def test_at_budget(layer_path):
    assert layer_path.at_budget(1.0) is layer_path.steps[0]
    half = layer_path.at_budget(0.5)
    i = layer_path.steps.index(half)
    assert half.scores_fraction <= 0.5 < layer_path.steps[i - 1].scores_fraction
    assert layer_path.at_budget(0.25) is layer_path.steps[-1]
    with pytest.raises(ValueError, match="never gets down to scores_fraction 0.1"):
        layer_path.at_budget(0.1)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("overrides, message", [
    (dict(rank_grid=(4, 8, 12)), "must end at head_dim=16"),
    (dict(rank_grid=(4, 8, 32)), r"must lie in \[1, head_dim=16\]"),
    (dict(rank_grid=()), "empty"),
    (dict(sequences=torch.zeros((0, 40), dtype=torch.long)), "at least one sequence"),
    (dict(sequences=torch.zeros((2, 1), dtype=torch.long)), "at least one sequence"),
    (dict(sequences=torch.zeros(40, dtype=torch.long)), "integer token tensor"),
    (dict(granularity="head"), "unknown"),
    (dict(min_scores_fraction=0.0), r"must lie in \(0, 1\]"),
    (dict(min_scores_fraction=1.5), r"must lie in \(0, 1\]"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_inputs_raise(tiny_llama, basis, sequences, overrides, message):
    kwargs = {"sequences": sequences, "rank_grid": GRID, "progress": False, **overrides}
    with pytest.raises(ValueError, match=message):
        greedy_static_allocation(tiny_llama, basis, **kwargs)


@pytest.mark.parametrize("argv, message", [
    (["--rank-grid", "8,x"], "strictly increasing comma-separated"),
    (["--rank-grid", "16,8"], "strictly increasing comma-separated"),
    (["--min-fraction", "0"], "not a number in (0, 1]"),
    (["--seq-len", "-3"], "-3 must be >= 1"),
    (["--calibration-sequences", "9", "--basis-sequences", "8"], "exceeds --basis-sequences"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path / "a.json"), *argv])
    assert message in capsys.readouterr().err


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "allocation.json"
    path = allocation.main(["--model", "tiny-random-gpt2", "--out", str(out), "--rank-grid", "8,16", "--seq-len", "32",
                            "--calibration-sequences", "1", "--basis-sequences", "2", "--min-fraction", "0.5",
                            "--device", "cpu"])
    assert AllocationPath.load(out) == path
    assert path.steps[-1].scores_fraction == 0.5 and len(path.steps) == 3  # 2 layers of 4 heads, 16 -> 8 each
    table = capsys.readouterr().out
    assert "full rank" in table and "layer 0: 16->8" in table and "layer 1: 16->8" in table
    assert f"{math.exp(path.steps[-1].loss):.3f}" in table

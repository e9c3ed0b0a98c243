"""Greedy static rank allocation by marginal gain: the baseline a learned rank policy has to beat.

A static allocation gives every layer (or every (layer, KV head)) one rank for the whole text. The naive way to pick
one, ranking layers by one-at-a-time sensitivity and dropping the least sensitive ones to a low rank, loses badly:
on SmolLM2 it gave +14% perplexity at mean r/d = 0.75 where a uniform rank of the same mean gave +3.3%
(measured on 4 x 512 held-out tokens on an H100 on 2026-11-22, before this repository had a script for it). Errors compound across layers and grow fast as rank falls, so the search here moves ranks in
small steps and re-measures after every one:

    start with every token at the top of the grid (full rank, head_dim)
    repeat until scores_fraction <= min_scores_fraction or every token is at the bottom of the grid:
        candidates = the current ranks with one token lowered by one grid step, for every token that can go lower
        accept the candidate with the smallest  (loss - current loss) / (current fraction - its fraction)

where loss is the mean next-token NLL on calibration text and fraction is the QK^T FLOPs relative to full rank
(``scores_fraction``). Dividing by the FLOPs saved makes steps of different sizes comparable: a (layer, KV head) token
saves 1/num_kv_heads of what a layer token saves, and an uneven grid has uneven steps.

Protocol: every candidate runs each whole calibration sequence in one forward pass (no segments, no KV cache) with
its static ranks in every layer, through :class:`~drrl_gym.lowrank.DynamicRankAttention` with the calibrated basis.
For static ranks this is what the environment computes segment by segment, because cached keys are stored at full
width and projected afresh every segment; the one difference is the environment's warm-up segment, which runs at
full rank (1/n_segments of the queries see exact scores there). That changes little and would tie the search to one
segment length. Candidates are batched: row ``candidate * n_sequences + sequence`` of one forward holds one pair,
with per-row ranks.

Cost: (steps x candidates) forwards of every calibration sequence. With layer tokens and an m-value grid there are
at most num_layers * (m - 1) steps of at most num_layers candidates each; for SmolLM2 (30 layers), the grid 8..64 and
min_scores_fraction 0.25 that is 180 steps and at most 5,400 candidates, with 4 x 1024 calibration tokens at most
22M tokens of forward passes: roughly a minute on an H100 at its measured 0.4-0.6 Mtok/s of plain forwards (an estimate, not
a measurement), hours on a CPU. Per (layer, KV head) there are num_kv_heads^2 = 9 times as many.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from drrl_gym.backbone import DEFAULT_MODEL, Backbone, load_backbone
from drrl_gym.calibration import load_or_calibrate_basis
from drrl_gym.cli import number_in
from drrl_gym.corpus import DEFAULT_CORPUS, CorpusConfig, load_corpus
from drrl_gym.files import atomic_write_text
from drrl_gym.lowrank import DynamicRankAttention, validate_rank_choices
from drrl_gym.observation import GRANULARITIES

DEFAULT_RANK_GRID = (8, 16, 24, 32, 40, 48, 56, 64)
FILE_FORMAT = "drrl-gym/allocation-path"
FILE_VERSION = 1
# Logits materialised at once, in elements: 1 GiB of fp32 (5 SmolLM2 rows of 1024 tokens; its vocab is 49152).
LOGIT_ELEMENTS = 2**28


# ------------------------------------------------------------------------------------------------ the path
@dataclass(frozen=True)
class AllocationStep:
    """One point of the greedy path."""

    ranks: tuple[tuple[int, ...], ...]  # (num_layers, num_kv_heads) ranks after this step
    loss: float  # mean next-token NLL on the calibration tokens at these ranks
    scores_fraction: float  # QK^T FLOPs at these ranks / at full rank = mean over query heads of r / head_dim

    def ranks_tensor(self) -> torch.Tensor:
        """The ranks as a (num_layers, num_kv_heads) long tensor; ``[None]`` makes it ``set_ranks`` input."""
        return torch.tensor(self.ranks, dtype=torch.long)


@dataclass
class AllocationPath:
    """The greedy path from full rank downwards; ``steps[0]`` is full rank. Validated at construction."""

    steps: list[AllocationStep]
    rank_grid: tuple[int, ...]
    granularity: str  # "layer" or "kv_head" (drrl_gym.observation.GRANULARITIES)
    model: str  # backbone name
    calibration_tokens: int  # tokens of the calibration sequences the losses are measured on (n_sequences * seq_len)

    def __post_init__(self) -> None:
        self.rank_grid = tuple(self.rank_grid)
        problem = _path_problem(self)
        if problem:
            raise ValueError(f"invalid allocation path: {problem}. Fix: build it with greedy_static_allocation.")

    def at_budget(self, scores_fraction: float) -> AllocationStep:
        """The first step whose scores_fraction is <= ``scores_fraction``: the least compressed one within budget."""
        for step in self.steps:
            if step.scores_fraction <= scores_fraction:
                return step
        raise ValueError(
            f"the path never gets down to scores_fraction {scores_fraction}: its last step is at "
            f"{self.steps[-1].scores_fraction:.4f}. Fix: ask for a budget >= {self.steps[-1].scores_fraction:.4f}, or "
            f"rerun greedy_static_allocation with min_scores_fraction <= {scores_fraction} (and a rank grid whose "
            f"smallest rank / {self.rank_grid[-1]} is at most that)."
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the path as JSON, atomically (a temporary file, then a rename)."""
        path = Path(path)
        payload = {
            "format": FILE_FORMAT, "version": FILE_VERSION, "model": self.model, "granularity": self.granularity,
            "rank_grid": list(self.rank_grid), "calibration_tokens": self.calibration_tokens,
            "steps": [{"ranks": [list(row) for row in s.ranks], "loss": s.loss, "scores_fraction": s.scores_fraction}
                      for s in self.steps],
        }
        atomic_write_text(path, json.dumps(payload))

    @classmethod
    def load(cls, path: str | os.PathLike) -> AllocationPath:
        """Read a path written by :meth:`save`; anything else raises ``ValueError`` saying what is wrong."""
        try:
            payload = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON ({error}). Fix: pass a file written by AllocationPath.save.") \
                from error
        if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not an allocation path (no \"format\": {FILE_FORMAT!r}). "
                             "Fix: pass a file written by AllocationPath.save.")
        if payload.get("version") != FILE_VERSION:
            raise ValueError(f"{path} has version {payload.get('version')!r}; this drrl-gym reads version "
                             f"{FILE_VERSION}. Fix: rerun python -m drrl_gym.allocation to write it again.")
        try:
            steps = [AllocationStep(tuple(tuple(int(r) for r in row) for row in s["ranks"]), float(s["loss"]),
                                    float(s["scores_fraction"])) for s in payload["steps"]]
            fields = (tuple(int(r) for r in payload["rank_grid"]), str(payload["granularity"]), str(payload["model"]),
                      int(payload["calibration_tokens"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} misses or mistypes a field ({type(error).__name__}: {error}). "
                             "Fix: pass a file written by AllocationPath.save, unedited.") from error
        return cls(steps, *fields)


def _path_problem(path: AllocationPath) -> str | None:
    """What is inconsistent in ``path``, or None."""
    grid, steps = path.rank_grid, path.steps
    if path.granularity not in GRANULARITIES:
        return f"granularity {path.granularity!r} is not one of {GRANULARITIES}"
    if not grid or any(r < 1 for r in grid) or any(a >= b for a, b in zip(grid, grid[1:])):
        return f"rank_grid {grid} is not a strictly increasing sequence of positive ints"
    if not steps:
        return "it has no steps"
    if path.calibration_tokens < 1 or not path.model:
        return f"calibration_tokens={path.calibration_tokens} and model={path.model!r} must be positive and non-empty"
    shape = (len(steps[0].ranks), len(steps[0].ranks[0]) if steps[0].ranks else 0)
    for i, step in enumerate(steps):
        ranks = step.ranks
        if len(ranks) != shape[0] or any(len(row) != shape[1] for row in ranks) or 0 in shape:
            return f"step {i} has ranks that are not a {shape} table like step 0's"
        if any(r not in grid for row in ranks for r in row):
            return f"step {i} has ranks outside the rank grid {grid}"
        if path.granularity == "layer" and any(len(set(row)) > 1 for row in ranks):
            return f"step {i} gives the KV heads of one layer different ranks, but the granularity is 'layer'"
        if not math.isclose(step.scores_fraction, _scores_fraction(step.ranks_tensor(), grid[-1]), abs_tol=1e-9):
            return f"step {i} has scores_fraction {step.scores_fraction}, but its ranks give a different one"
        if not math.isfinite(step.loss):
            return f"step {i} has a non-finite loss {step.loss}"
    if any(r != grid[-1] for row in steps[0].ranks for r in row):
        return f"step 0 is not at full rank {grid[-1]}"
    if any(a.scores_fraction <= b.scores_fraction for a, b in zip(steps, steps[1:])):
        return "scores_fraction does not strictly decrease along the steps"
    return None


def _scores_fraction(ranks: torch.Tensor, head_dim: int) -> float:
    """QK^T FLOPs relative to full rank: every KV head serves the same number of query heads and every layer sees
    the same (query, key) pairs, so it is the mean of r / head_dim (``drrl_gym.flops``'s scores term, divided)."""
    return ranks.sum().item() / (ranks.numel() * head_dim)


# ---------------------------------------------------------------------------------------------- the losses
@torch.inference_mode()
def static_rank_losses(
    backbone: Backbone, basis: torch.Tensor, sequences: torch.Tensor, candidates: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """Mean next-token NLL over ``sequences`` (n, L) for each static rank setting in ``candidates``
    (C, num_layers, num_kv_heads): a float64 tensor (C,). All C * n (candidate, sequence) rows go through the
    model in micro-batches of at most ``batch_size`` rows, row ``candidate * n + sequence``."""
    n, length = sequences.shape
    rows = len(candidates) * n
    attention = DynamicRankAttention(backbone.geometry, basis)
    nll = []
    with attention.attached(backbone.model):
        for start in range(0, rows, batch_size):
            row = torch.arange(start, min(start + batch_size, rows))
            attention.set_ranks(candidates[row // n])
            nll.append(_summed_nll(backbone, sequences[row % n].to(backbone.device)))
    return torch.cat(nll).view(len(candidates), n).sum(1) / (n * (length - 1))


def _summed_nll(backbone: Backbone, tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each row of ``tokens`` (B, L), float64 (B,), at the attention's current ranks.

    The LM head runs on a few rows at a time: the logits of a whole micro-batch would not fit (64 SmolLM2 rows of
    1024 tokens are 13 GB in fp32)."""
    hidden = backbone.model.base_model(tokens, use_cache=False).last_hidden_state[:, :-1]  # positions with a target
    targets = tokens[:, 1:]
    head = backbone.model.get_output_embeddings()
    chunk = max(1, LOGIT_ELEMENTS // (targets.shape[1] * head.weight.shape[0]))
    nll = []
    for start in range(0, len(tokens), chunk):
        logits = head(hidden[start : start + chunk]).float()  # (b, L - 1, vocab)
        target = targets[start : start + chunk]
        token_nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        nll.append(token_nll.view(target.shape).double().sum(1))
    return torch.cat(nll).cpu()


# ----------------------------------------------------------------------------------------------- the search
def greedy_static_allocation(
    backbone: Backbone,
    basis: torch.Tensor,
    sequences: torch.Tensor,
    rank_grid: Sequence[int] = DEFAULT_RANK_GRID,
    granularity: str = "layer",
    min_scores_fraction: float = 0.25,
    batch_size: int = 64,
    progress: bool = True,
) -> AllocationPath:
    """Greedy path of static ranks from full rank down to ``min_scores_fraction`` (see the module docstring).

    Args:
        backbone: the frozen model.
        basis: its calibrated basis (num_layers, num_kv_heads, d, d), e.g. from ``load_or_calibrate_basis``.
        sequences: (n, L) calibration tokens; each sequence runs whole.
        rank_grid: the ranks a token may take, strictly increasing, ending at head_dim.
        granularity: ``"layer"`` (all KV heads of a layer move together) or ``"kv_head"``.
        min_scores_fraction: stop once the QK^T FLOPs are at most this fraction of full rank, in (0, 1].
        batch_size: most (candidate, sequence) rows per forward pass.
        progress: show a progress bar over the steps.
    """
    g = backbone.geometry
    grid = _checked_grid(rank_grid, g.head_dim)
    _check_search_args(sequences, granularity, min_scores_fraction, batch_size)
    heads_per_unit = g.num_kv_heads if granularity == "layer" else 1
    n_units = g.num_layers * g.num_kv_heads // heads_per_unit
    grid_ranks = torch.tensor(grid)

    def ranks_of(index: torch.Tensor) -> torch.Tensor:  # (C, n_units) grid indices -> (C, layers, kv_heads) ranks
        return grid_ranks[index].view(len(index), g.num_layers, -1).repeat_interleave(heads_per_unit, dim=2)

    def evaluate(index: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        ranks = ranks_of(index)
        losses = static_rank_losses(backbone, basis, sequences, ranks, batch_size)
        return losses, [_scores_fraction(r, g.head_dim) for r in ranks]

    index = torch.full((1, n_units), len(grid) - 1)  # the current allocation, as grid indices
    (loss,), (fraction,) = evaluate(index)
    steps = [AllocationStep(_as_tuples(ranks_of(index)[0]), loss.item(), fraction)]
    with tqdm(total=_most_steps(grid, n_units, min_scores_fraction), desc="greedy allocation",
              disable=not progress) as bar:
        while fraction > min_scores_fraction and (index > 0).any():
            movable = (index[0] > 0).nonzero()[:, 0]  # tokens that can go one grid step lower
            candidates = index.repeat(len(movable), 1)
            candidates[torch.arange(len(movable)), movable] -= 1
            losses, fractions = evaluate(candidates)
            cost = (losses - loss) / (fraction - torch.tensor(fractions, dtype=torch.float64))  # loss per FLOP saved
            best = int(cost.argmin())
            index, loss, fraction = candidates[best : best + 1], losses[best], fractions[best]
            steps.append(AllocationStep(_as_tuples(ranks_of(index)[0]), loss.item(), fraction))
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", scores_fraction=f"{fraction:.3f}")
    return AllocationPath(steps, grid, granularity, backbone.name, sequences.numel())


def _checked_grid(rank_grid: Sequence[int], head_dim: int) -> tuple[int, ...]:
    grid = validate_rank_choices(rank_grid, head_dim)
    if grid[-1] != head_dim:
        raise ValueError(f"rank_grid {grid} must end at head_dim={head_dim}: the path starts at full rank. "
                         f"Fix: append {head_dim}, e.g. {(*grid, head_dim)}.")
    return grid


def _check_search_args(sequences: torch.Tensor, granularity: str, min_scores_fraction: float, batch_size: int) -> None:
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.dtype.is_floating_point:
        got = tuple(sequences.shape) if isinstance(sequences, torch.Tensor) else type(sequences).__name__
        raise ValueError(f"sequences must be an (n, L) integer token tensor, got {got}. "
                         "Fix: pass e.g. load_corpus(...).calibration.")
    if sequences.shape[0] < 1 or sequences.shape[1] < 2:
        raise ValueError(f"sequences has shape {tuple(sequences.shape)}: need at least one sequence of >= 2 tokens "
                         "(a next-token loss needs a target). Fix: pass e.g. load_corpus(...).calibration.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: unknown. Fix: choose one of {GRANULARITIES}.")
    if not 0 < min_scores_fraction <= 1:
        raise ValueError(f"min_scores_fraction={min_scores_fraction} must lie in (0, 1]: it is the QK^T FLOPs of the "
                         "last step relative to full rank. Fix: pass e.g. 0.25.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 row. Fix: pass e.g. 64.")


def _most_steps(grid: tuple[int, ...], n_units: int, min_scores_fraction: float) -> int:
    """Most steps the search can take, for the progress bar (exact for an evenly spaced grid): a step lowers the
    mean r / head_dim by at least the smallest grid gap / (head_dim * n_units), at either granularity."""
    if len(grid) == 1:
        return 0
    smallest_saving = min(b - a for a, b in zip(grid, grid[1:])) / (grid[-1] * n_units)
    to_save = 1 - max(min_scores_fraction, grid[0] / grid[-1])
    return min(n_units * (len(grid) - 1), math.ceil(to_save / smallest_saving - 1e-9))


def _as_tuples(ranks: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(row) for row in ranks.tolist())


# ---------------------------------------------------------------------------------------------------- CLI
def changed_token(before: AllocationStep, after: AllocationStep) -> str:
    """Which token a step lowered, e.g. ``"layer 3: 64->56"`` or ``"layer 3 head 1: 64->56"``."""
    changed = (before.ranks_tensor() != after.ranks_tensor()).nonzero().tolist()
    if not changed:
        return "-"
    layer, head = changed[0]
    where = f"layer {layer}" if len(changed) > 1 or len(before.ranks[0]) == 1 else f"layer {layer} head {head}"
    return f"{where}: {before.ranks[layer][head]}->{after.ranks[layer][head]}"


def format_table(path: AllocationPath) -> str:
    """One line per step: step, changed token, loss, perplexity, scores_fraction."""
    lines = [f"{'step':>4}  {'changed':<24}  {'loss':>8}  {'perplexity':>10}  {'scores_fraction':>15}"]
    for i, step in enumerate(path.steps):
        changed = "full rank" if i == 0 else changed_token(path.steps[i - 1], step)
        perplexity = math.exp(step.loss)
        lines.append(f"{i:>4}  {changed:<24}  {step.loss:>8.4f}  {perplexity:>10.3f}  {step.scores_fraction:>15.4f}")
    return "\n".join(lines)


def _rank_grid_arg(text: str) -> tuple[int, ...]:
    try:
        grid = tuple(int(r) for r in text.split(","))
    except ValueError:
        grid = ()
    if not grid or any(r < 1 for r in grid) or any(a >= b for a, b in zip(grid, grid[1:])):
        raise argparse.ArgumentTypeError(f"{text!r} is not strictly increasing comma-separated positive ranks. "
                                         "Fix: pass e.g. 8,16,24,32,40,48,56,64 (ending at the model's head_dim).")
    return grid


def _fraction_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1]. Fix: pass e.g. 0.25 (the QK^T FLOPs "
                                         "relative to full rank at which the search stops).")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--corpus", default=DEFAULT_CORPUS)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write the path to")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="layer")
    parser.add_argument("--rank-grid", type=_rank_grid_arg, default=DEFAULT_RANK_GRID,
                        help="comma-separated, ending at head_dim (e.g. 4,8,12,16 for the tiny models)")
    parser.add_argument("--min-fraction", type=_fraction_arg, default=0.25, help="stop at this QK^T FLOPs fraction")
    parser.add_argument("--calibration-sequences", type=number_in(int, 1), default=4,
                        help="sequences of the calibration split the losses are measured on (its first ones)")
    parser.add_argument("--basis-sequences", type=number_in(int, 1), default=CorpusConfig.calibration_sequences,
                        help="size of the calibration split the basis is calibrated on; keep the env's "
                             "calibration_sequences so the search uses the env's basis")
    parser.add_argument("--seq-len", type=number_in(int, 1), default=1024)
    parser.add_argument("--batch-size", type=number_in(int, 1), default=64, help="most rows per forward pass")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=number_in(int, 1), default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.calibration_sequences > args.basis_sequences:
        parser.error(f"--calibration-sequences {args.calibration_sequences} exceeds --basis-sequences "
                     f"{args.basis_sequences}, the size of the calibration split. "
                     "Fix: lower the first or raise the second.")
    if args.seq_len < 2:
        parser.error(f"--seq-len {args.seq_len}: a next-token loss needs >= 2 tokens. Fix: pass e.g. 1024.")
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a directory. Fix: pass a file name, e.g. {args.out / 'allocation.json'}.")
    return args


def main(argv: list[str] | None = None) -> AllocationPath:
    """Load model, corpus and basis as the environment does, search, save the path and print its table."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    backbone = load_backbone(args.model, args.device)
    # The env's CorpusConfig (same splits, same fingerprint), so the basis comes from the same cache entry.
    splits = load_corpus(backbone.tokenizer, CorpusConfig(args.corpus, args.seq_len, args.basis_sequences))
    basis = load_or_calibrate_basis(backbone, splits.calibration, splits.fingerprint)
    sequences = splits.calibration[: args.calibration_sequences]
    loaded = time.perf_counter()
    path = greedy_static_allocation(backbone, basis, sequences, args.rank_grid, args.granularity, args.min_fraction,
                                    args.batch_size)
    searched = time.perf_counter()
    path.save(args.out)
    print(format_table(path))
    print(f"{backbone.name} on {backbone.device} ({backbone.dtype}), {len(sequences)} x {args.seq_len} calibration "
          f"tokens, {args.granularity} granularity: {len(path.steps) - 1} steps in {searched - loaded:.1f} s "
          f"(+{loaded - start:.1f} s loading). Saved to {args.out}")
    return path


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")

"""Host time of an env step's cost accounting (``drrl_gym.flops``): the FLOPs fractions counted for every row.

    python benchmarks/cost_accounting.py --out docs/results/cost_accounting_cpu

Each step of the env counts two fractions per row on the CPU, after it has queued the device's work and before it
reads the results: in selection mode ``selection_fractions`` as counted and as the dense reference runs it, in
low-rank mode ``flops_fractions`` at the chosen and at the executed ranks. This times both pairs at SmolLM2's
geometry (30 layers, 9 query heads over 3 KV heads, d = 64) for each ``--batch`` (envs), a segment of 128 new
tokens over ``--keys`` keys, with ranks and keeps drawn from the env's default choices. That time is beside the
device's step while it is shorter, and in the step once the device is faster. Median of ``--repeats`` calls after
one warm-up. Writes ``results.json`` (command, machine, date, versions, git commit, every time) and ``results.md``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
import torch
from bound_table import run_record, timed, write_results

from drrl_gym.backbone import AttentionGeometry
from drrl_gym.cli import number_in
from drrl_gym.config import EnvConfig
from drrl_gym.flops import flops_fractions, selection_fractions

SMOLLM2 = AttentionGeometry(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576)
NEW_TOKENS = 128


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=number_in(int, 1), nargs="+", default=[16, 64, 256], help="envs per step")
    parser.add_argument("--keys", type=number_in(int, NEW_TOKENS), nargs="+", default=[128, 1024],
                        help=f"keys the segment's last query sees (at least its {NEW_TOKENS} new tokens)")
    parser.add_argument("--repeats", type=number_in(int, 1), default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    defaults = EnvConfig(attention="select")
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch:
        shape = (batch, SMOLLM2.num_layers, SMOLLM2.num_kv_heads)
        ranks, keeps = rng.choice(defaults.rank_choices, shape), rng.choice(defaults.keep_choices, shape)
        for keys in args.keys:
            for mode in ("select", "lowrank_scores"):
                step = functools.partial(step_counts, mode, ranks, keeps, keys)
                ms = 1e3 * timed(step, args.repeats, torch.device("cpu"))
                rows.append({"mode": mode, "batch": batch, "keys": keys, "ms_per_step": ms})
                print(f"{mode}, {batch} envs, {keys} keys: {ms:.3f} ms per step", flush=True)
    meta = {**run_record(torch.device("cpu")), "threads": torch.get_num_threads(), "rows": rows}
    table = "\n".join(["| mode | envs | keys | ms per step (both counts) |", "|---|---:|---:|---:|",
                       *(f"| {r['mode']} | {r['batch']} | {r['keys']} | {r['ms_per_step']:.3f} |" for r in rows)])
    write_results(args.out, meta, f"SmolLM2's geometry, {NEW_TOKENS} new tokens a segment, ranks and keeps drawn "
                  f"from {defaults.rank_choices} and {defaults.keep_choices}; the median of {args.repeats} steps.",
                  table)


def step_counts(mode: str, ranks: np.ndarray, keeps: np.ndarray, keys: int) -> tuple:
    """The two fractions one step of ``mode`` counts (``drrl_gym.episode.EpisodeBatch.step``)."""
    if mode == "select":  # as counted, and as the dense reference executes it
        return (selection_fractions(SMOLLM2, ranks, keeps, NEW_TOKENS, keys),
                selection_fractions(SMOLLM2, ranks, keeps, NEW_TOKENS, keys, dense_reference=True))
    # at the chosen ranks, and at the ranks executed (a graphed step runs every layer at full width)
    return (flops_fractions(SMOLLM2, ranks, NEW_TOKENS, keys),
            flops_fractions(SMOLLM2, np.full_like(ranks, SMOLLM2.head_dim), NEW_TOKENS, keys))


if __name__ == "__main__":
    main()

"""How much the selection mask changes when its bound is taken over a segment's last m queries only, or from the
full-rank reference instead of the agent's own forward.

    python benchmarks/bound_queries.py --out docs/results/bound_queries_cpu          # SmolLM2 on the CPU (~5 min)
    python benchmarks/bound_queries.py --model tiny-random-llama --seq-len 128 --segment-len 32 --bound-queries 8 \\
        --rank-choices 4 8 16 --sequences 0 --out /tmp/bound_queries                     # a smoke run

In selection mode the safety mask compares, per unit and candidate (rank, keep), the mean over a segment's query rows
of the dropped-mass bound (7) with epsilon (docs/selection.md, section 5; docs/env.md). ``bound_queries=m`` takes
that mean over the segment's last m queries: the bound table's work falls by T / m. This runs the same episodes
(``--sequences``, by train index; the same uniform random actions, seeded) with every query and with each m, and
compares at every step the bounds the mask compares (``full_rank_bounds``) and the mask itself. Beside them, the
same comparison between consecutive segments of the all-query run: how much the quantity the mask predicts (the next
segment's bound) moves anyway. ``--reference-bound-queries m`` adds runs with ``bound_source="reference"`` (the
full-rank reference's table of the same segment, whatever the actions). A second table compares every run with what
its mask predicts: the next segment's bound over every query of the agent's own forward. Writes ``results.json``
(command, machine, date, versions, every number) and ``results.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from bound_table import run_record, write_results
from tqdm import tqdm

from drrl_gym.cli import number_in
from drrl_gym.env import DRRLAttentionEnv


def run_episodes(m: int, sequences: list[int], env_args: dict, source: str = "agent") -> tuple[np.ndarray, np.ndarray]:
    """(steps, units, choices) bounds and masks of every step of the episodes, at bound_queries=m."""
    env = DRRLAttentionEnv(attention="select", bound_queries=m, bound_source=source, **env_args)
    bounds, masks = [], []
    for index in tqdm(sequences, desc=f"bound_queries={m}, {source}", leave=False):
        env.reset(seed=0, options={"sequence_index": index})
        actions = np.random.default_rng(index)
        terminated = False
        while not terminated:
            bounds.append(env.full_rank_bounds.copy())
            masks.append(env.action_masks().reshape(bounds[-1].shape))
            _, _, terminated, _, _ = env.step(actions.integers(0, env.action_space.nvec))
    env.close()
    return np.stack(bounds), np.stack(masks)


def compare(bounds: np.ndarray, masks: np.ndarray, reference_bounds: np.ndarray, reference_masks: np.ndarray,
            episodes: int) -> dict:
    """Agreement of the masks and change of the bounds, over all steps and per step of an episode (the same number
    of steps each)."""
    relative = np.abs(bounds - reference_bounds) / np.maximum(np.abs(reference_bounds), 1e-12)
    agree = (masks == reference_masks).reshape(episodes, len(masks) // episodes, -1)
    return {"mask_agreement": float(agree.mean()), "masks_differing": int((~agree).sum()), "mask_entries":
            int(masks.size), "mask_agreement_by_step": agree.mean((0, 2)).tolist(), "bound_relative_error_median":
            float(np.median(relative)), "bound_relative_error_p90": float(np.quantile(relative, 0.9)),
            "mean_bound_ratio": float(bounds.mean() / reference_bounds.mean())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=number_in(int, 2), default=1024)
    parser.add_argument("--segment-len", type=number_in(int, 1), default=128)
    parser.add_argument("--rank-choices", type=number_in(int, 1), nargs="+", default=None, help="default: the env's")
    parser.add_argument("--bound-queries", type=number_in(int, 1), nargs="+", default=[16, 32, 64])
    parser.add_argument("--reference-bound-queries", type=number_in(int, 1), nargs="*", default=[32],
                        help="bound_source='reference' runs at these m")
    parser.add_argument("--sequences", type=number_in(int, 0), nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=number_in(int, 1), default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env_args = {"model": args.model, "seq_len": args.seq_len, "segment_len": args.segment_len, "device": args.device,
                "calibration_sequences": 2, "eval_sequences": 2}
    if args.rank_choices:
        env_args["rank_choices"] = tuple(args.rank_choices)
    started = time.perf_counter()
    reference_bounds, reference_masks = run_episodes(args.segment_len, args.sequences, env_args)  # every query
    steps = len(reference_bounds) // len(args.sequences)  # consecutive segments of one episode, not across them
    later = np.arange(len(reference_bounds)) % steps > 0
    episodes = len(args.sequences)
    earlier = np.roll(later, -1)  # step i where step i + 1 is in the same episode

    def predicting(bounds: np.ndarray, masks: np.ndarray) -> dict:
        """A run's bounds and masks at step i against every query's of the agent's own forward at step i + 1."""
        return compare(bounds[earlier], masks[earlier], reference_bounds[later], reference_masks[later], episodes)

    rows = {"consecutive segments, every query": compare(reference_bounds[later], reference_masks[later],
                                                         reference_bounds[earlier], reference_masks[earlier], episodes)}
    predictions = {"every query": predicting(reference_bounds, reference_masks)}
    runs = [(f"bound_queries={m}", m, "agent") for m in args.bound_queries]
    runs += [(f"bound_source=reference, bound_queries={m}", m, "reference") for m in args.reference_bound_queries]
    for name, m, source in runs:
        run = run_episodes(m, args.sequences, env_args, source)
        rows[name] = compare(*run, reference_bounds, reference_masks, episodes)
        predictions[name] = predicting(*run)
        print(name, rows[name], predictions[name], flush=True)
    meta = {**run_record(torch.device(args.device)), "seconds": time.perf_counter() - started, "env": env_args,
            "sequences": args.sequences, "steps": len(reference_bounds), "rows": rows,
            "predictions_of_the_next_segment": predictions}
    header = ("| bound over | mask agreement | entries differing | agreement by step | relative bound change, median | "
              "p90 | mean bound ratio |\n|---|---:|---:|---|---:|---:|---:|\n")
    write_results(args.out, meta, f"{len(args.sequences)} episodes, {meta['steps']} steps, uniform random actions. "
                  "Each row against every query's bounds and mask of the same step; the first row compares each step "
                  "with the one before.", header + markdown_rows(rows) + "\n\nWhat each mask predicts: each row at a "
                  "step against every query's bounds and mask of the agent's own forward at the next step of the "
                  "episode.\n\n" + header + markdown_rows(predictions))


def markdown_rows(rows: dict[str, dict]) -> str:
    return "\n".join(f"| {name} | {r['mask_agreement']:.4f} | {r['masks_differing']} of {r['mask_entries']} | "
                     f"{' '.join(f'{a:.3f}' for a in r['mask_agreement_by_step'])} | "
                     f"{r['bound_relative_error_median']:.3f} | {r['bound_relative_error_p90']:.3f} | "
                     f"{r['mean_bound_ratio']:.4f} |" for name, r in rows.items())


if __name__ == "__main__":
    main()

"""Held-out evaluation of a learned rank policy against full rank and the measured uniform static ranks.

    python agents/evaluate.py runs/X/export                  # an export directory (drrl_gym.export)
    python agents/evaluate.py runs/X/model.zip               # an SB3 model of train_ppo.py (reads runs/X/config.yaml)

Every method runs the env's protocol on the held-out eval split: full rank, every uniform rank choice, the learned
policy, and, for the policy's QK^T and whole-attention FLOPs, the measured uniform ranks nearest on each side
("uniform r=32 (measured, saves less QK^T FLOPs)", "uniform r=16 (measured, saves more QK^T FLOPs)"): measured rows,
never interpolated, because perplexity is convex in FLOPs and interpolating would flatter the policy.
``drrl_gym.training.evaluation`` documents the columns. Writes results.csv, results.json, results.png and results.md;
prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from drrl_gym.cli import number_in
from drrl_gym.training.evaluation import Row, evaluate_export, evaluate_sb3


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policy", type=Path, help="an export directory, or an SB3 .zip written by train_ppo.py")
    parser.add_argument("--config", type=Path, help="for a .zip: the run's config.yaml (default: beside the run's model)")
    parser.add_argument("--out", type=Path, help="output directory (default: <run dir>/eval)")
    parser.add_argument("--eval-sequences", type=number_in(int, 1), default=4)
    parser.add_argument("--batch-size", type=number_in(int, 1), default=4)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if not args.policy.exists():
        parser.error(f"{args.policy} does not exist: pass an export directory (RUN_DIR/export) or an SB3 .zip")
    if args.policy.is_dir():
        out = args.out or args.policy.parent / "eval"
        return evaluate_export(args.policy, out, args.eval_sequences, args.batch_size, args.device)
    run_dir = args.policy.parent.parent if args.policy.parent.name == "checkpoints" else args.policy.parent
    config = args.config or run_dir / "config.yaml"
    if not config.is_file():
        parser.error(f"no config {config}: pass --config RUN_DIR/config.yaml for {args.policy}")
    return evaluate_sb3(args.policy, config, args.out or run_dir / "eval", args.eval_sequences, args.batch_size, args.device)


if __name__ == "__main__":
    main()

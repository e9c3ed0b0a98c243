"""Perplexity on the held-out eval split at a uniform rank in every layer, for calibrated and exact bases.

    python benchmarks/uniform_rank_perplexity.py --out docs/results/uniform_rank_cpu.json

Each sequence runs segment by segment (``--segment-len`` tokens, one KV cache). ``--segment0 full`` (the default)
runs segment 0 at full rank and the later segments at rank r: the environment's protocol (its warm-up segment) and
``drrl_gym.policy_metrics``'s. ``--segment0 low`` runs every segment at rank r, segment 0 included; the tables stored in
docs/results/uniform_rank_{h100,cpu}.json were measured that way, before the flag existed (their JSON has no
``segment0`` field).

Writes JSON (every number plus the machine, versions, date and protocol) and prints a Markdown table for docs/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch
import transformers

from drrl_gym.backbone import DEFAULT_MODEL, load_backbone
from drrl_gym.bases import BASIS_MODES
from drrl_gym.calibration import load_or_calibrate_basis
from drrl_gym.corpus import DEFAULT_CORPUS, CorpusConfig, load_corpus
from drrl_gym.lowrank import DynamicRankAttention
from drrl_gym.perplexity import describe_machine, segmented_perplexity


@torch.inference_mode()
def uniform_rank_perplexity(backbone, attention: DynamicRankAttention, sequences: torch.Tensor, rank: int,
                            segment_len: int, batch_size: int, full_first_segment: bool) -> float:
    """exp(mean next-token NLL) over ``sequences`` (n, L) run ``segment_len`` tokens at a time through one KV cache,
    at ``rank`` in every layer; segment 0 at full rank when ``full_first_segment`` (the environment's protocol)."""
    def set_ranks(start: int) -> None:
        attention.set_ranks(backbone.geometry.head_dim if start == 0 and full_first_segment else rank)

    return segmented_perplexity(backbone, sequences, segment_len, batch_size, progress=False, before_segment=set_ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--corpus", nargs="+", default=[DEFAULT_CORPUS])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--segment-len", type=int, default=128)
    parser.add_argument("--eval-sequences", type=int, default=16)
    parser.add_argument("--calibration-sequences", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 48, 32, 16])
    parser.add_argument("--bases", nargs="+", default=list(BASIS_MODES), choices=BASIS_MODES)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--segment0", choices=("full", "low"), default="full",
                        help="rank of segment 0: full (the environment's protocol) or the same low rank as the rest")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    backbone = load_backbone(args.model, device=args.device)
    rows = []
    for corpus in args.corpus:
        config = CorpusConfig(corpus, args.seq_len, args.calibration_sequences, args.eval_sequences)
        splits = load_corpus(backbone.tokenizer, config)
        basis = load_or_calibrate_basis(backbone, splits.calibration, splits.fingerprint)
        for mode in args.bases:
            attention = DynamicRankAttention(backbone.geometry, basis, mode=mode)
            with attention.attached(backbone.model):
                for rank in args.ranks:
                    start = time.perf_counter()
                    ppl = uniform_rank_perplexity(backbone, attention, splits.eval, rank, args.segment_len,
                                                  args.batch_size, args.segment0 == "full")
                    rows.append(dict(corpus=corpus, basis=mode, rank=rank, perplexity=ppl, seconds=time.perf_counter() - start))
                    print(rows[-1], flush=True)
    full = {(r["corpus"], r["basis"]): r["perplexity"] for r in rows if r["rank"] == backbone.geometry.head_dim}
    for row in rows:
        reference = full.get((row["corpus"], row["basis"]))
        row["increase_pct"] = None if reference is None else 100 * (row["perplexity"] / reference - 1)
    meta = dict(
        command="python " + " ".join(sys.argv), machine=describe_machine(), date=date.today().isoformat(),
        torch=torch.__version__, transformers=transformers.__version__, dtype=str(backbone.dtype),
        model=args.model, seq_len=args.seq_len, segment_len=args.segment_len, eval_tokens=args.eval_sequences * args.seq_len,
        segment0=args.segment0,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"\n{meta}\n\n| corpus | basis | rank r | perplexity | vs full rank |\n|---|---|---|---|---|")
    for row in rows:
        increase = "" if row["increase_pct"] is None else f"{row['increase_pct']:+.1f}%"
        print(f"| {row['corpus']} | {row['basis']} | {row['rank']} | {row['perplexity']:.2f} | {increase} |")


if __name__ == "__main__":
    main()

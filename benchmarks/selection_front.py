"""Perplexity against executed cost for selection attention, low-rank scores, a recent window and full attention.

    python benchmarks/selection_front.py --out docs/results/selection_h200            # the H200 run (~5 min)
    python benchmarks/selection_front.py --model tiny-random-llama --seq-lens 128 --eval-tokens 512 \\
        --calibration-len 128 --segment-len 32 --out /tmp/front                       # a CPU smoke run

Fit on one text, measure on another: the calibrated basis and the per-layer sensitivities come from the
Shakespeare plays (``--fit-corpus``); perplexity is measured on the 1911 Britannica article (``--eval-corpus``),
the same ``--eval-tokens`` tokens at every length (``eval-tokens / L`` sequences of L tokens). Every sequence runs
``--segment-len`` tokens at a time through one KV cache, every segment at the method's setting (no full-rank warm-up
segment), so the numbers compare with a deployment that approximates every token.

Methods, each measured (never interpolated):

* ``full``: the unmodified model.
* ``lowrank r=R``: attention on rank-R scores in every layer (``approximation="lowrank_scores"``).
* ``select r=R keep=K``: rank-R scores choose ``K`` of the visible keys per query (plus 4 sink and 8 recent tokens),
  exact attention over them, in every layer (``approximation="select"``).
* ``window K``: the 4 first tokens and the last ``K * L`` tokens each query sees, nothing chosen by score.
* ``allocation@B``: a static per-layer setting from the select grid (or full) with mean decode traffic <= B. The
  per-layer choice minimises the sum of one-at-a-time loss increases measured on the fit corpus (layer l alone at
  setting s, every other layer exact) plus lambda times traffic; lambda is bisected to meet B. The sum is only the
  search's guide: each allocation is then measured like every other method.

Costs, both counted as a deployed kernel executes them (``drrl_gym.selection`` docs (9)-(10)), never this script's
dense reference work: ``traffic`` = K/V bytes a decoded token at position L reads, relative to full attention
(r/(2d) + k/L for selection, (r + d)/(2d) for low-rank scores, k/L for the window, 1 for full), averaged over
layers and KV heads; ``flops`` = attention FLOPs of the whole prefill (every segment), relative to full attention.
Writes ``results.json`` (command, machine, versions, date, every number), ``results.md`` and ``front.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from drrl_gym.backbone import DEFAULT_MODEL, Backbone, load_backbone, resolve_device
from drrl_gym.calibration import corpus_basis
from drrl_gym.corpus import CorpusConfig, load_corpus
from drrl_gym.files import atomic_write_text
from drrl_gym.flops import layer_flops
from drrl_gym.lowrank import DynamicRankAttention
from drrl_gym.perplexity import describe_machine, segmented_perplexity
from drrl_gym.selection import DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS
from drrl_gym.selection_cost import decode_traffic, full_attention_flops, selection_flops

RANKS = (8, 16, 32)
KEEPS = (1 / 16, 1 / 8, 1 / 4)
LOWRANK_RANKS = (48, 32)
WINDOWS = (1 / 8, 1 / 4)
BUDGETS = (0.15, 0.2, 0.25, 0.3)


@dataclass(frozen=True)
class Setting:
    """One (layer, KV head)'s attention: full, low-rank scores at ``rank``, selection at (rank, keep), or a window."""

    kind: str  # "full", "lowrank", "select", "window"
    rank: int = 0
    keep: float = 1.0

    def traffic(self, keys: int, head_dim: int) -> float:
        """K/V values a decoded token at position ``keys`` reads, relative to full attention's 2 * keys * d."""
        if self.kind == "full":
            return 1.0
        if self.kind == "lowrank":
            return (self.rank + head_dim) / (2 * head_dim)
        if self.kind == "window":
            return min(keys, DEFAULT_SINK_TOKENS + round(self.keep * keys)) / keys
        return float(decode_traffic(self.rank, self.keep, keys=keys, head_dim=head_dim))


@dataclass
class Row:
    length: int
    method: str
    perplexity: float
    increase_pct: float
    traffic: float
    flops: float
    seconds: float


# ------------------------------------------------------------------------------------------------ settings
def attention_for(backbone: Backbone, basis: torch.Tensor, per_layer: list[Setting], length: int,
                  selection: str = "group") -> DynamicRankAttention:
    """A DynamicRankAttention running ``per_layer[l]`` in layer l (one approximation kind per model)."""
    g = backbone.geometry
    kinds = {s.kind for s in per_layer} - {"full"}
    if len(kinds) > 1:
        raise ValueError(f"one approximation per model, got {kinds}")
    kind = kinds.pop() if kinds else "full"
    if kind == "window":  # a window is selection that keeps only its forced keys: sinks and the recent tokens
        window = round(per_layer[0].keep * length)
        attention = DynamicRankAttention(g, basis, approximation="select", recent_tokens=window)
        attention.set_ranks(1)
        attention.set_keep(1e-9)
        return attention
    attention = DynamicRankAttention(g, basis, approximation="lowrank_scores" if kind == "lowrank" else "select",
                                     selection=selection)
    ranks = torch.tensor([s.rank if s.kind != "full" else g.head_dim for s in per_layer])
    keeps = torch.tensor([s.keep if s.kind == "select" else 1.0 for s in per_layer], dtype=torch.float64)
    attention.set_ranks(ranks[None, :, None].expand(1, -1, g.num_kv_heads).clone())
    attention.set_keep(keeps[None, :, None].expand(1, -1, g.num_kv_heads).clone())
    return attention


def prefill_flops_fraction(per_layer: list[Setting], backbone: Backbone, length: int, segment_len: int) -> float:
    """Attention FLOPs of the segment-by-segment prefill relative to full attention, summed over layers."""
    g = backbone.geometry
    spent = full = 0.0
    for end in range(segment_len, length + 1, segment_len):
        baseline = full_attention_flops(new_tokens=segment_len, keys=end, head_dim=g.head_dim, group_size=g.group_size)
        for setting in per_layer:
            full += g.num_kv_heads * float(baseline.total)
            if setting.kind == "full":
                spent += g.num_kv_heads * float(baseline.total)
            elif setting.kind == "lowrank":
                counted = layer_flops(g, segment_len, end, [setting.rank] * g.num_kv_heads, statistics=False)
                exact = layer_flops(g, segment_len, end, None)
                spent += float(counted.total - counted.projections) / float(exact.total - exact.projections) \
                    * g.num_kv_heads * float(baseline.total)
            elif setting.kind == "select":
                cost = selection_flops(setting.rank, setting.keep, new_tokens=segment_len, keys=end,
                                       head_dim=g.head_dim, group_size=g.group_size, sink_tokens=DEFAULT_SINK_TOKENS,
                                       recent_tokens=DEFAULT_RECENT_TOKENS)
                spent += g.num_kv_heads * float(cost.total)
            else:  # a window reads its keys by position: exact attention over them, nothing scored or chosen
                cost = selection_flops(1, 1e-9, new_tokens=segment_len, keys=end, head_dim=g.head_dim,
                                       group_size=g.group_size, sink_tokens=DEFAULT_SINK_TOKENS,
                                       recent_tokens=round(setting.keep * length))
                spent += g.num_kv_heads * float(cost.scores + cost.softmax + cost.values)
    return spent / full


# -------------------------------------------------------------------------------------------- allocation
@torch.no_grad()
def layer_sensitivities(backbone: Backbone, basis: torch.Tensor, sequences: torch.Tensor, grid: list[Setting],
                        segment_len: int) -> np.ndarray:
    """(num_layers, len(grid)) increase of log-perplexity with layer l alone at grid[s], every other layer exact."""
    g = backbone.geometry
    full = [Setting("full")] * g.num_layers
    with attention_for(backbone, basis, full, sequences.shape[1]).attached(backbone.model):
        base = math.log(segmented_perplexity(backbone, sequences, segment_len, progress=False))
    table = np.zeros((g.num_layers, len(grid)))
    with tqdm(total=table.size, desc="layer sensitivities") as bar:
        for layer in range(g.num_layers):
            for s, setting in enumerate(grid):
                per_layer = [setting if i == layer else Setting("full") for i in range(g.num_layers)]
                with attention_for(backbone, basis, per_layer, sequences.shape[1]).attached(backbone.model):
                    loss = math.log(segmented_perplexity(backbone, sequences, segment_len, progress=False))
                table[layer, s] = loss - base
                bar.update()
    return table


def allocate(sensitivity: np.ndarray, grid: list[Setting], traffic: np.ndarray, budget: float) -> list[Setting] | None:
    """Per layer argmin over {full} + grid of sensitivity + lambda * traffic, lambda bisected so that the mean
    traffic is <= budget (the smallest lambda that meets it); None if even the cheapest settings exceed it."""
    costs = np.concatenate([np.zeros((len(sensitivity), 1)), sensitivity], axis=1)  # column 0: full
    loads = np.concatenate([[1.0], traffic])

    def choice(lam: float) -> np.ndarray:
        return (costs + lam * loads).argmin(axis=1)

    low, high = 0.0, 1e3
    if loads[choice(high)].mean() > budget:
        return None
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if loads[choice(middle)].mean() > budget else (low, middle)
    options = [Setting("full"), *grid]
    return [options[i] for i in choice(high)]


# ---------------------------------------------------------------------------------------------- measuring
def measure(backbone: Backbone, basis: torch.Tensor, name: str, per_layer: list[Setting], sequences: torch.Tensor,
            segment_len: int, batch_size: int, reference: float | None, selection: str = "group") -> Row:
    length, d = sequences.shape[1], backbone.geometry.head_dim
    attention = attention_for(backbone, basis, per_layer, length, selection)
    start = time.perf_counter()
    with attention.attached(backbone.model):
        perplexity = segmented_perplexity(backbone, sequences, segment_len, batch_size, progress=False)
    seconds = time.perf_counter() - start
    traffic = float(np.mean([s.traffic(length, d) for s in per_layer]))
    flops = prefill_flops_fraction(per_layer, backbone, length, segment_len)
    increase = 0.0 if reference is None else 100 * (perplexity / reference - 1)
    return Row(length, name, perplexity, increase, traffic, flops, seconds)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r.length for r in rows})
    figure, axes = plt.subplots(2, len(lengths), figsize=(5 * len(lengths), 8), squeeze=False)
    families = {"lowrank": "tab:red", "select": "tab:blue", "window": "tab:orange", "allocation": "tab:green",
                "full": "black"}
    for column, length in enumerate(lengths):
        for row_index, cost in enumerate(("traffic", "flops")):
            axis = axes[row_index, column]
            for family, colour in families.items():
                points = [r for r in rows if r.length == length and r.method.startswith(family)]
                axis.scatter([getattr(r, cost) for r in points], [max(r.increase_pct, 1e-3) for r in points],
                             color=colour, label=family, s=18)
            axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
            axis.set_yscale("log")
            axis.set_xlabel(f"{cost} relative to full attention (executed by a kernel)")
            axis.set_ylabel("perplexity increase, % (log)")
            axis.set_title(f"L = {length}")
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "", "| L | method | perplexity | increase | traffic | FLOPs | seconds |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.length, r.traffic)):
        lines.append(f"| {r.length} | {r.method} | {r.perplexity:.3f} | {r.increase_pct:+.2f}% | {r.traffic:.3f} | "
                     f"{r.flops:.3f} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--fit-corpus", default="shakespeare-plays")
    parser.add_argument("--eval-corpus", default="britannica-1911")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--segment-len", type=int, default=128)
    parser.add_argument("--calibration-len", type=int, default=2048, help="sequence length of the sensitivity run")
    parser.add_argument("--calibration-sequences", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--selection", choices=("group", "head"), default="group",
                        help="one key set per KV head (group) or per query head (head); traffic is charged per group")
    parser.add_argument("--only", default=None, help="measure only the methods whose name contains this (and full); "
                        "skips the sensitivity run unless it names 'allocation'")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if any(length % args.segment_len or args.eval_tokens % length for length in args.seq_lens):
        parser.error("every --seq-lens value must be a multiple of --segment-len and divide --eval-tokens")

    device = resolve_device(args.device)
    backbone = load_backbone(args.model, device)
    g = backbone.geometry
    basis = corpus_basis(backbone, args.fit_corpus).to(device)
    ranks = [r for r in RANKS if r < g.head_dim] or [g.head_dim // 2]
    grid = [Setting("select", r, k) for r in ranks for k in KEEPS]
    tuning = load_corpus(backbone.tokenizer, CorpusConfig(args.fit_corpus, seq_len=args.calibration_len,
                                                          calibration_sequences=1, eval_sequences=1))
    wanted = args.only is None or "allocation" in args.only
    sensitivity = layer_sensitivities(backbone, basis, tuning.train[: args.calibration_sequences].to(device), grid,
                                      args.segment_len) if wanted else np.zeros((g.num_layers, len(grid)))

    meta = {
        "command": " ".join(sys.argv),
        "machine": describe_machine(device),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "dtype": str(backbone.dtype),
        "protocol": {"fit_corpus": args.fit_corpus, "eval_corpus": args.eval_corpus, "eval_tokens": args.eval_tokens,
                     "segment_len": args.segment_len, "warm_up_segment": "none: every segment approximated",
                     "sink_tokens": DEFAULT_SINK_TOKENS, "recent_tokens": DEFAULT_RECENT_TOKENS,
                     "selection": args.selection, "sensitivity_len": args.calibration_len,
                     "sensitivity_sequences": args.calibration_sequences},
        "grid": [asdict(s) for s in grid],
        "sensitivity": sensitivity.tolist(),
        "allocations": {},
        "rows": [],
    }
    header = (f"Measured by `{meta['command']}` on {meta['machine']}, {meta['date']}, {meta['dtype']}; fit on "
              f"{args.fit_corpus}, measured on {args.eval_corpus} ({args.eval_tokens} tokens at every L).")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for length in args.seq_lens:
        n = args.eval_tokens // length
        held_out = load_corpus(backbone.tokenizer, CorpusConfig(args.eval_corpus, seq_len=length,
                                                                calibration_sequences=1, eval_sequences=n)).eval
        methods: dict[str, list[Setting]] = {"full": [Setting("full")] * g.num_layers}
        methods.update({f"lowrank r={r}": [Setting("lowrank", r)] * g.num_layers for r in LOWRANK_RANKS if r < g.head_dim})
        methods.update({f"select r={s.rank} keep=1/{round(1 / s.keep)}": [s] * g.num_layers for s in grid})
        methods.update({f"window 1/{round(1 / k)}": [Setting("window", 0, k)] * g.num_layers for k in WINDOWS})
        traffic = np.array([s.traffic(length, g.head_dim) for s in grid])
        for budget in BUDGETS if wanted else ():
            chosen = allocate(sensitivity, grid, traffic, budget)
            if chosen is None:
                print(f"L={length}: budget {budget} is below the cheapest settings of the grid; skipped", flush=True)
                continue
            methods[f"allocation@{budget:g}"] = chosen
            meta["allocations"][f"L={length} allocation@{budget:g}"] = [asdict(s) for s in chosen]
            print(f"L={length} allocation@{budget:g}: " + " ".join(
                "F" if s.kind == "full" else f"{s.rank}/{round(1 / s.keep)}" for s in chosen), flush=True)
        if args.only is not None:
            methods = {name: chosen for name, chosen in methods.items() if name == "full" or args.only in name}
        reference = None
        for name, per_layer in tqdm(methods.items(), desc=f"L={length}"):
            row = measure(backbone, basis, name, per_layer, held_out, args.segment_len, args.batch_size, reference,
                          args.selection)
            reference = row.perplexity if name == "full" else reference
            rows.append(row)
            print(f"L={length} {name}: ppl {row.perplexity:.3f} ({row.increase_pct:+.2f}%) traffic {row.traffic:.3f} "
                  f"flops {row.flops:.3f} [{row.seconds:.1f} s]", flush=True)
        # Written after every length, so a run stopped part-way keeps what it measured.
        meta["rows"] = [asdict(r) for r in rows]
        atomic_write_text(args.out / "results.json", json.dumps(meta, indent=1))
        atomic_write_text(args.out / "results.md", markdown(rows, header))
        plot(rows, args.out / "front.png")
    print(markdown(rows, header))


if __name__ == "__main__":
    main()

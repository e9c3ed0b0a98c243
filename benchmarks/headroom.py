"""Headroom of per-segment decisions: how much better than the best static allocation could ANY per-segment policy do?

    python benchmarks/headroom.py --out docs/results/headroom_h200        # the H200 run (~4-6 min, an estimate)
    python benchmarks/headroom.py --attention select --seq-lens 1024 --eval-tokens 1024 --device cpu \\
        --out docs/results/headroom_cpu                                  # SmolLM2 on the CPU (~15 min on 2 cores)
    python benchmarks/headroom.py --smoke --out /tmp/headroom                             # tiny model, CPU, seconds

Per sequence length L and attention mode (``--attention``), on held-out text (the calibrated basis is fitted on
``--fit-corpus``; everything is measured on ``--eval-corpus``, ``--eval-tokens`` tokens at every L), segments of
``--segment-len`` tokens through one KV cache, segment 0 exact (the environment's warm-up), layers in ``--groups``
contiguous groups (a group is one decision unit), the choices of ``drrl_gym.headroom.ChoiceSet`` below:

* ``full``: exact attention everywhere.
* ``static``: the greedy static allocation (``drrl_gym.headroom.greedy_static_path``) fitted *on the measured text
  itself*, in hindsight like the oracle, so the difference isolates what per-segment adaptivity is worth; at each
  budget B the first path point with cost <= B.
* ``oracle``: per sequence and segment, first-order NLL changes of every (unit, choice) from that static plan
  (``first_order_gains``), then per segment the choices minimising their sum within the static plan's cost in that
  segment (``segment_allocation``); the resulting plan is run and its perplexity measured.
* policies that see only the past (``causal`` in the JSON, ``drrl_gym.headroom.predicted_changes``): the same
  search, but segment s allocated from what was measurable before it ran: ``previous``, segment s-1's changes (the
  exact need of the last segment), ``past_mean``, the mean of the decided segments' changes, or ``fitted``, the
  best linear weighing of those two per (unit, choice), fitted on the other sequences (at least 2). Each plan is run.
  Their share of the oracle's headroom says how far need persists from one segment to the next, which is what a
  policy observing by-products of earlier segments has to go on; ``need_autocorrelation`` is the correlation of
  the changes of consecutive segments.

headroom = static - oracle in perplexity increase over full (percentage points), at each one's measured cost (the
oracle's cost is at most the static's; nothing is interpolated). The spread: per sequence, and per segment (NLL per
token of the static plan minus the oracle's). Cost: the environment's ``flops_cost`` (``drrl_gym.headroom``).
Writes ``results.json`` (command, machine, versions, date, sizes, every number) and ``results.md`` after every
(L, mode).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import transformers

from drrl_gym.backbone import DEFAULT_MODEL, load_backbone, resolve_device
from drrl_gym.calibration import load_or_calibrate_basis
from drrl_gym.cli import number_in
from drrl_gym.corpus import CorpusConfig, load_corpus
from drrl_gym.files import atomic_write_text
from drrl_gym.headroom import (
    CAUSAL_RULES,
    ChoiceSet,
    at_budget,
    first_order_gains,
    greedy_static_path,
    layer_groups,
    per_segment_plan,
    plan_cost,
    predicted_changes,
    segment_nll,
    unit_costs,
)
from drrl_gym.lowrank import DynamicRankAttention
from drrl_gym.perplexity import describe_machine

# Choices as fractions of head_dim (so the tiny model gets valid ranks too), chosen from the measured fronts in
# docs/results.md: low-rank scores below r = d/2 lose > 50% perplexity, selection at (d/4, 1/8) ~6-20% and at
# (d/4, 1/4) ~2-4% (L = 4096, 8192).
LOWRANK_RANKS = (1 / 2, 3 / 4, 7 / 8)
SELECT_SETTINGS = ((1 / 4, 1 / 8), (1 / 4, 1 / 4))
BUDGETS = {"lowrank_scores": (0.85,), "select": (0.5,)}


def choice_set(approximation: str, head_dim: int) -> ChoiceSet:
    if approximation == "select":
        pairs = [(max(1, round(r * head_dim)), k) for r, k in SELECT_SETTINGS]
    else:
        pairs = [(max(1, round(r * head_dim)), 1.0) for r in LOWRANK_RANKS]
    return ChoiceSet(approximation, (*pairs, (head_dim, 1.0)), head_dim)


def increase_pct(nll: np.ndarray, full: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Perplexity increase over full, %, of summed NLL (..., n_sequences) against full's (n_sequences,) over their
    target counts; totals over all sequences (scalars) give the increase of the whole set."""
    return 100 * (np.exp((nll - full) / tokens) - 1)


def measure_mode(backbone, basis, held_out: torch.Tensor, approximation: str, budgets: tuple[float, ...],
                 args) -> list[dict]:
    g = backbone.geometry
    choices = choice_set(approximation, g.head_dim)
    groups = layer_groups(g.num_layers, min(args.groups, g.num_layers))
    n, length = held_out.shape
    n_segments = length // args.segment_len
    costs = unit_costs(choices.layer_costs(g, args.segment_len, n_segments), groups)
    attention = DynamicRankAttention(g, basis, approximation=approximation)
    targets = np.full(n, length - 1.0)  # next-token targets per sequence

    def run(plans: np.ndarray) -> np.ndarray:  # (C, n_segments, n_units) -> (C, n, n_segments)
        rows = np.repeat(plans, n, 0)  # row c * n + i: plan c on sequence i
        nll = segment_nll(backbone, attention, choices, groups, held_out.repeat(len(plans), 1), rows,
                          args.segment_len, args.max_rows)
        return nll.reshape(len(plans), n, n_segments)

    def run_static(units: np.ndarray) -> np.ndarray:
        began = time.perf_counter()
        nll = run(np.repeat(units[:, None, :], n_segments, 1))
        print(f"L={length} {approximation}: measured {len(units)} static plan(s) "
              f"[{time.perf_counter() - began:.1f} s]", flush=True)
        return nll

    start = time.perf_counter()
    path = greedy_static_path(run_static, costs, n_segments, min(budgets))
    full = path[0].nll.sum(1)  # the path starts at exact attention everywhere
    searched = time.perf_counter()
    rows = []
    for budget in budgets:
        step = at_budget(path, budget)
        if step is None:
            print(f"L={length} {approximation}: the static path never reaches cost {budget}; skipped", flush=True)
            continue
        static = np.asarray(step.units)
        delta, static_nll = first_order_gains(backbone, attention, choices, groups, held_out, static,
                                              args.segment_len, args.max_rows)
        print(f"L={length} {approximation} B={budget}: first-order gains measured "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)
        plan = per_segment_plan(delta, costs, static)  # (n, n_segments, n_units)
        oracle_nll = segment_nll(backbone, attention, choices, groups, held_out, plan, args.segment_len,
                                 args.max_rows)
        rules = [rule for rule in CAUSAL_RULES if rule != "fitted" or n >= 2]  # fitted: on the other sequences
        causal = {rule: per_segment_plan(predicted_changes(delta, rule), costs, static) for rule in rules}
        causal_nll = {rule: segment_nll(backbone, attention, choices, groups, held_out, causal_plan,
                                        args.segment_len, args.max_rows) for rule, causal_plan in causal.items()}
        static_pct = increase_pct(static_nll.sum(1), full, targets)
        oracle_pct = increase_pct(oracle_nll.sum(1), full, targets)
        per_token = (static_nll - oracle_nll)[:, 1:] / args.segment_len  # per decision segment, nats per token
        total = targets.sum()
        plan_figures = plan_measures(costs, static, delta, static_nll, full, total)
        oracle = plan_figures(plan, oracle_nll)
        row = {
            "length": length, "attention": approximation, "budget": budget, "sequences": n,
            "full_perplexity": math.exp(full.sum() / total),
            "static_units": static.tolist(), "static_cost": step.cost,
            "static_increase_pct": float(increase_pct(static_nll.sum(), full.sum(), total)),
            "oracle_cost": oracle["cost"], "oracle_increase_pct": oracle["increase_pct"],
            "oracle_changed_fraction": oracle["changed_fraction"],
            "first_order_estimate_pct": oracle["first_order_estimate_pct"],
            "per_sequence": {"static_increase_pct": static_pct.tolist(), "oracle_increase_pct": oracle_pct.tolist(),
                             "headroom_pp": (static_pct - oracle_pct).tolist()},
            "segment_gain_nats_per_token": {q: float(np.quantile(per_token, p)) for q, p in
                                            (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))},
            "static_path": [{"units": list(map(int, s.units)), "cost": s.cost,
                             "increase_pct": float(increase_pct(s.nll.sum(), full.sum(), total))}
                            for s in path],
            "seconds": {"static_search": searched - start, "total": time.perf_counter() - start},
        }
        row["headroom_pp"] = row["static_increase_pct"] - row["oracle_increase_pct"]
        row["causal"] = {rule: plan_figures(causal_plan, causal_nll[rule]) for rule, causal_plan in causal.items()}
        for figures in row["causal"].values():
            figures["share_of_headroom"] = ((row["static_increase_pct"] - figures["increase_pct"]) / row["headroom_pp"]
                                            if row["headroom_pp"] > 0 else None)
        row["need_autocorrelation"] = need_autocorrelation(delta, static)
        rows.append(row)
        print(f"L={length} {approximation} B={budget}: static {row['static_increase_pct']:+.2f}% @ {step.cost:.3f}, "
              f"oracle {row['oracle_increase_pct']:+.2f}% @ {row['oracle_cost']:.3f}, headroom "
              f"{row['headroom_pp']:.2f} pp; "
              + ", ".join(f"{rule} {f['increase_pct']:+.2f}% @ {f['cost']:.3f}" for rule, f in row["causal"].items())
              + f" [{row['seconds']['total']:.0f} s]", flush=True)
    return rows


def plan_measures(costs: np.ndarray, static: np.ndarray, delta: np.ndarray, static_nll: np.ndarray,
                  full: np.ndarray, total: float) -> Callable[[np.ndarray, np.ndarray], dict]:
    """A function of (plan, its measured NLL) giving a plan's figures: its measured increase over full (%) and
    cost, its first-order estimate (the increase if each change from the static plan cost exactly its
    first-order change, measured alone: no interaction through the KV cache), and how often a decision segment
    leaves the static plan."""
    def figures(plan: np.ndarray, nll: np.ndarray) -> dict:
        n, n_segments, n_units = plan.shape
        changes = delta[np.arange(n)[:, None, None], np.arange(n_segments)[None, :, None], np.arange(n_units), plan]
        return {"cost": float(plan_cost(plan, costs).mean()),
                "increase_pct": float(increase_pct(nll.sum(), full.sum(), total)),
                "first_order_estimate_pct": float(increase_pct(changes.sum() + static_nll.sum(), full.sum(), total)),
                "changed_fraction": float((plan[:, 1:] != static).any(-1).mean())}
    return figures


def need_autocorrelation(delta: np.ndarray, static: np.ndarray) -> float | None:
    """Correlation of the first-order changes of consecutive decision segments, over every sequence, unit and
    non-static choice (None where it is undefined: fewer than 3 segments, or constant changes)."""
    changed = np.ones(delta.shape[2:], bool)
    changed[np.arange(len(static)), static] = False
    now, before = delta[:, 2:][..., changed].ravel(), delta[:, 1:-1][..., changed].ravel()
    if now.size < 2 or now.std() == 0 or before.std() == 0:
        return None
    return float(np.corrcoef(now, before)[0, 1])


def optional(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| L | mode | seqs | full ppl | static % (cost) | oracle % (cost); first order | headroom pp | "
             "per-sequence headroom pp (min / max) | per-segment gain nats/token p10 / p50 / p90 | oracle changed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per, seg = r["per_sequence"]["headroom_pp"], r["segment_gain_nats_per_token"]
        lines.append(f"| {r['length']} | {r['attention']} | {r['sequences']} | {r['full_perplexity']:.3f} | "
                     f"{r['static_increase_pct']:+.2f} ({r['static_cost']:.3f}) | {r['oracle_increase_pct']:+.2f} "
                     f"({r['oracle_cost']:.3f}); {r['first_order_estimate_pct']:+.2f} | {r['headroom_pp']:.2f} | "
                     f"{min(per):.2f} / {max(per):.2f} | {seg['p10']:+.4f} / {seg['p50']:+.4f} / {seg['p90']:+.4f} | "
                     f"{100 * r['oracle_changed_fraction']:.0f}% |")
    lines += ["", "Policies that see only the past: each segment allocated from the previous segment's changes, "
              "from the mean of all decided segments', or from their best linear weighing fitted on the other "
              "sequences (run, at their own cost; share = (static - policy) / headroom).",
              "", "| L | mode | need autocorrelation | "
              + " | ".join(f"{rule} % (cost); first order | {rule} share" for rule in CAUSAL_RULES) + " |",
              "|---|---|---|" + "---|---|" * len(CAUSAL_RULES)]
    for r in rows:
        cells = [f"{f['increase_pct']:+.2f} ({f['cost']:.3f}); {f['first_order_estimate_pct']:+.2f} | "
                 f"{optional(f['share_of_headroom'], '.0%')}" if f else "n/a | n/a"
                 for f in (r["causal"].get(rule) for rule in CAUSAL_RULES)]
        lines.append(f"| {r['length']} | {r['attention']} | {optional(r['need_autocorrelation'], '+.2f')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--fit-corpus", default="shakespeare-plays")
    parser.add_argument("--eval-corpus", default="britannica-1911")
    parser.add_argument("--seq-lens", type=number_in(int, 2), nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--attention", nargs="+", choices=("lowrank_scores", "select"),
                        default=["lowrank_scores", "select"])
    parser.add_argument("--eval-tokens", type=number_in(int, 2), default=8192, help="held-out tokens at every L")
    parser.add_argument("--segment-len", type=number_in(int, 1), default=128)
    parser.add_argument("--groups", type=number_in(int, 1), default=5, help="decision units: groups of layers")
    parser.add_argument("--budgets-lowrank", type=number_in(float, 0, 1, high_inclusive=True), nargs="+",
                        default=list(BUDGETS["lowrank_scores"]))
    parser.add_argument("--budgets-select", type=number_in(float, 0, 1, high_inclusive=True), nargs="+",
                        default=list(BUDGETS["select"]))
    parser.add_argument("--max-rows", type=number_in(int, 1), default=64, help="most sequences per forward")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny-random-llama on the CPU at L=128: a check")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.seq_lens, args.eval_tokens, args.segment_len = \
            "tiny-random-llama", "cpu", [128], 256, 32
        args.budgets_select = [0.95]  # at L = 128 the forced sink and recent keys make every selection costly
    if any(length % args.segment_len or args.eval_tokens % length for length in args.seq_lens):
        parser.error("every --seq-lens value must be a multiple of --segment-len and divide --eval-tokens")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    backbone = load_backbone(args.model, device)
    fit = load_corpus(backbone.tokenizer, CorpusConfig(args.fit_corpus, seq_len=1024, calibration_sequences=8,
                                                       eval_sequences=1))
    basis = load_or_calibrate_basis(backbone, fit.calibration, fit.fingerprint).to(device)
    budgets = {"lowrank_scores": tuple(args.budgets_lowrank), "select": tuple(args.budgets_select)}
    meta = {
        "command": " ".join(sys.argv if argv is None else ["benchmarks/headroom.py", *argv]),
        "machine": describe_machine(device), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "model": args.model, "dtype": str(backbone.dtype),
        "protocol": {"fit_corpus": args.fit_corpus, "eval_corpus": args.eval_corpus, "eval_tokens": args.eval_tokens,
                     "segment_len": args.segment_len, "warm_up_segment": "segment 0 exact, the others decided",
                     "units": f"{min(args.groups, backbone.geometry.num_layers)} contiguous layer groups",
                     "static": "greedy by measured NLL per cost saved, fitted on the measured text (hindsight)",
                     "oracle": "first-order per-segment gains from the static plan, greedy per segment, then run",
                     "cost": "env flops_cost: scores FLOPs as a deployed kernel executes them, mean over layers "
                             "and decision segments",
                     "choices": {mode: choice_set(mode, backbone.geometry.head_dim).settings for mode in budgets},
                     "budgets": budgets},
        "rows": [],
    }
    header = (f"Measured by `{meta['command']}` on {meta['machine']}, {meta['date']}, {args.model} {meta['dtype']}; "
              f"basis fitted on {args.fit_corpus}, measured on {args.eval_corpus} ({args.eval_tokens} tokens at every "
              f"L), {meta['protocol']['units']}. Increases are perplexity over full attention; cost is the env's "
              "flops_cost.")
    args.out.mkdir(parents=True, exist_ok=True)
    for length in args.seq_lens:
        held_out = load_corpus(backbone.tokenizer, CorpusConfig(args.eval_corpus, seq_len=length,
                                                                calibration_sequences=1,
                                                                eval_sequences=args.eval_tokens // length)).eval
        for approximation in args.attention:
            meta["rows"] += measure_mode(backbone, basis, held_out, approximation, budgets[approximation], args)
            atomic_write_text(args.out / "results.json", json.dumps(meta, indent=1))
            atomic_write_text(args.out / "results.md", markdown(meta["rows"], header))
    print(markdown(meta["rows"], header))
    return meta["rows"]


if __name__ == "__main__":
    main()

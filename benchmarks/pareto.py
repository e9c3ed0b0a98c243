"""Pareto front of perplexity against attention FLOPs: learned rank policies against every baseline, at several
context lengths, on held-out text.

    python benchmarks/pareto.py --out docs/results/pareto_cpu --seq-lens 1024 --eval-sequences 2     # CPU smoke
    python benchmarks/pareto.py --learned runs/gpu/export --seq-lens 1024 4096 8192 --out docs/results/pareto_h100

Protocol (``drrl_gym.policy_metrics``): every method runs through the same dynamic-rank model, segment by segment with a KV
cache, segment 0 at full rank. What is fitted (the calibrated basis, the greedy static allocation, the learned
policies: train them with ``env.corpus=shakespeare-plays``) uses ``--fit-corpus``; what is measured is
``--eval-corpus``, by default the 1911 Britannica article, which the plays do not contain, so the held-out text is
the same at every length (a corpus' own splits are dealt per ``seq_len``). Methods (rule-based ones on a rank grid of
head_dim/8 steps, no mask; learned ones on their own choices, with the mask they were trained with):

* full rank (the reference); uniform r for every grid rank below head_dim;
* static per-layer allocation: the greedy marginal-gain search of ``drrl_gym.allocation`` on the fit corpus'
  calibration text, taken at several QK^T budgets;
* NER threshold tau; ALRT stable-rank controller with several safety factors; random ranks;
* each ``--learned`` export, and the same network with its mask switched off at inference (an ablation);
* the greedy path's allocations nearest in QK^T cost to each learned policy, one on each side (the path records
  every intermediate allocation, ``drrl_gym.allocation``), measured after the learned policies.

Writes ``results.json`` and ``results.csv`` (one row per length and method), ``results.md`` (tables, the best QK^T
saving within +1% perplexity per family, and each learned policy against the measured greedy static allocations
and uniform ranks nearest to its QK^T cost on each side: "dominated" when one saves at least as much at lower
perplexity; never a line interpolated between measured points, which flatters whatever lies under a convex
curve), ``pareto.png`` (perplexity increase against QK^T and whole-attention FLOPs) and ``ranks.png`` (mean rank per
segment and layer of the learned and static policies). "Choices changed between segments" is the share of decisions
(sequence, layer, KV head; after the first decision segment) whose rank differs from the previous segment's: 0% for
a static allocation, so it says how dynamic a policy really is.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from drrl_gym.allocation import AllocationPath, greedy_static_allocation
from drrl_gym.backbone import DEFAULT_MODEL, load_backbone, resolve_device
from drrl_gym.calibration import load_or_calibrate_basis
from drrl_gym.corpus import CorpusConfig, load_corpus
from drrl_gym.export import ControllerSpec, DynamicRankRuntime, load_exported_policy
from drrl_gym.perplexity import describe_machine
from drrl_gym.policies import (
    FullRank,
    NERThreshold,
    RandomRanks,
    RankPolicy,
    StableRankPolicy,
    StaticRanks,
    UniformRank,
)
from drrl_gym.policy_metrics import Measurement, measure_policies

STATIC_BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
NER_TAUS = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
ALRT_SAFETY = (1.5, 3.0, 6.0, 12.0)
TARGET_INCREASE_PCT = 1.0  # the target: >= 40% fewer QK^T FLOPs at <= 1% perplexity increase (L = 4096)


@dataclass
class Result:
    seq_len: int
    family: str
    method: str
    parameter: float | None
    perplexity: float
    increase_pct: float
    fidelity: float | None
    scores_saved_pct: float
    attention_saved_pct: float
    latency_ms: float
    rank_fraction: float
    switch_pct: float | None = None  # decisions that differ from the previous segment's (absent in older results)


# ------------------------------------------------------------------------------------------------ methods
def baseline_methods(spec: ControllerSpec, geometry, allocation: AllocationPath) -> dict[str, tuple[str, float | None, RankPolicy, ControllerSpec]]:
    """name -> (family, parameter, policy, spec) for every rule-based method on ``spec``'s grid."""
    controller = spec.controller(geometry)
    d = geometry.head_dim
    methods: dict[str, tuple[str, float | None, RankPolicy, ControllerSpec]] = {
        "full rank": ("full rank", d, FullRank(controller), spec)}
    for r in spec.rank_choices[:-1]:
        methods[f"uniform r={r}"] = ("uniform", r, UniformRank(controller, r), spec)
    for budget in STATIC_BUDGETS:
        try:
            step = allocation.at_budget(budget)
        except ValueError:  # the search stopped before this budget
            continue
        ranks = step.ranks_tensor()
        token_ranks = ranks[:, 0] if spec.granularity == "layer" else ranks.reshape(-1)
        methods[f"static greedy <= {budget:.0%}"] = ("static greedy", step.scores_fraction,
                                                    StaticRanks(controller, token_ranks.tolist()), spec)
    for tau in NER_TAUS:
        methods[f"NER tau={tau}"] = ("NER threshold", tau, NERThreshold(controller, tau), spec)
    for safety in ALRT_SAFETY:
        methods[f"ALRT safety={safety:g}"] = ("ALRT stable rank", safety, StableRankPolicy(controller, safety), spec)
    methods["random"] = ("random", None, RandomRanks(controller, seed=0), spec)
    return methods


def learned_methods(exports: list[Path], basis: torch.Tensor) -> dict[str, Any]:
    """Each export's policy (with its mask) and the same network with the mask off at inference."""
    methods = {}
    for path in exports:
        exported = load_exported_policy(path)  # the policy only; the benchmark's model runs it
        if exported.basis is not None and not torch.allclose(exported.basis.float().cpu(), basis.float().cpu(), atol=1e-5):
            raise ValueError(f"{path} was trained with another basis than the benchmark's. Fix: train it with "
                             "env.corpus set to --fit-corpus and the same calibration settings, and measure it on "
                             "the kind of device it was trained on (a basis calibrated in bf16 on a GPU differs "
                             "from one calibrated in fp32 on the CPU).")
        name = path.parent.name if path.name == "export" else path.name
        methods[f"learned {name}"] = ("learned", None, exported.policy, exported.spec)
        if exported.spec.epsilon is not None:
            methods[f"learned {name}, mask off"] = ("learned, mask off", None, exported.policy,
                                                    replace(exported.spec, epsilon=None))
    return methods


# -------------------------------------------------------------------------------------------------- output
def write_results(results: list[Result], meta: dict[str, Any], mean_ranks: dict[tuple[int, str], np.ndarray],
                  out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    markdown = report(results, meta)
    (out / "results.md").write_text(markdown)
    plot_front(results, out / "pareto.png")
    plot_ranks(mean_ranks, out / "ranks.png")
    return markdown


def _provenance(meta: dict[str, Any]) -> list[str]:
    return [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}, {meta['date']}, torch {meta['torch']}, "
            f"transformers {meta['transformers']}, {meta['dtype']}  ",
            f"Fit corpus: {meta['fit_corpus']}; held-out eval corpus: {meta['eval_corpus']}; segment_len "
            f"{meta['segment_len']}", ""]


def report(results: list[Result], meta: dict[str, Any]) -> str:
    lines = [line for source in meta.get("sources", [meta]) for line in _provenance(source)]
    eval_tokens = {k: v for source in meta.get("sources", [meta]) for k, v in source["eval_tokens"].items()}
    for length in sorted({r.seq_len for r in results}):
        at = [r for r in results if r.seq_len == length]
        tokens = eval_tokens[str(length)]
        lines += [f"### L = {length} ({tokens} held-out tokens)", "",
                  "| method | perplexity | increase | fidelity | QK^T saved | attention saved | mean r/d | "
                  "choices changed between segments | latency ms/segment |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in at:
            fidelity = "" if r.fidelity is None else f"{r.fidelity:.4f}"
            switched = "" if r.switch_pct is None else f"{r.switch_pct:.1f}%"
            lines.append(f"| {r.method} | {r.perplexity:.3f} | {r.increase_pct:+.2f}% | {fidelity} | "
                         f"{r.scores_saved_pct:+.1f}% | {r.attention_saved_pct:+.1f}% | {r.rank_fraction:.3f} | "
                         f"{switched} | {r.latency_ms:.1f} |")
        lines += ["", f"Best QK^T saving within +{TARGET_INCREASE_PCT:g}% perplexity, per family:", "",
                  "| family | method | QK^T saved | attention saved | increase |", "|---|---|---|---|---|"]
        for family in dict.fromkeys(r.family for r in at):
            within = [r for r in at if r.family == family and r.increase_pct <= TARGET_INCREASE_PCT]
            if within:
                best = max(within, key=lambda r: r.scores_saved_pct)
                lines.append(f"| {family} | {best.method} | {best.scores_saved_pct:+.1f}% | "
                             f"{best.attention_saved_pct:+.1f}% | {best.increase_pct:+.2f}% |")
            else:
                lines.append(f"| {family} | none within +{TARGET_INCREASE_PCT:g}% | | | |")
        lines += ["", "Learned policies against measured points only (nearest QK^T cost on each side, no interpolation):",
                  "", *versus_measured(at), ""]
    return "\n".join(lines) + "\n"


EQUAL_COST_PP = 1e-6  # QK^T savings (percentage points) this close count as equal cost


def neighbours(r: Result, points: list[Result]) -> tuple[Result | None, Result | None]:
    """The measured points nearest to ``r``'s QK^T saving on each side: (the one saving the most among those saving
    at most as much as ``r``, the one saving the least among those saving at least as much). A point at equal cost
    is both."""
    saved = r.scores_saved_pct
    less = [p for p in points if p.scores_saved_pct <= saved + EQUAL_COST_PP]
    more = [p for p in points if p.scores_saved_pct >= saved - EQUAL_COST_PP]
    return (max(less, key=lambda p: p.scores_saved_pct, default=None),
            min(more, key=lambda p: p.scores_saved_pct, default=None))


def measured_verdict(r: Result, points: list[Result]) -> str:
    """``r`` against the measured ``points`` of one family, without interpolation: the nearest measured cost on each
    side, and whether one of them dominates ``r`` (saves at least as much QK^T, lower perplexity) or ``r`` dominates
    it (saves at least as much, lower perplexity). Anything else gets no verdict: the curves are convex, so a line
    between two measured points flatters whatever lies between them."""
    below, above = neighbours(r, points)
    if below is None and above is None:
        return "no measured point"

    def point(p: Result) -> str:
        return f"{p.method} ({p.scores_saved_pct:+.2f}% saved, {p.increase_pct:+.2f}%)"

    if below is above:
        where = f"at equal cost {point(below)}"
    else:
        where = "; ".join(f"{side} {point(p)}" for side, p in (("saving less", below), ("saving more", above)) if p)
    verdicts = []
    if above is not None and above.increase_pct < r.increase_pct:
        verdicts.append(f"dominated by {above.method}")
    if below is not None and r.increase_pct < below.increase_pct:
        verdicts.append(f"dominates {below.method}")
    if not verdicts:
        verdicts.append("neither dominates (no verdict: no measured point at its cost)")
    return f"{where}: {' and '.join(verdicts)}"


def versus_measured(at: list[Result]) -> list[str]:
    """Each learned policy against the measured greedy static allocations (full rank is the path's first step) and
    the measured uniform ranks, nearest cost on each side; never interpolated."""
    static = [r for r in at if r.family in ("static greedy", "full rank")]
    uniform = [r for r in at if r.family in ("uniform", "full rank")]
    lines = []
    for r in (r for r in at if r.family.startswith("learned")):
        lines.append(f"- {r.method}: {r.increase_pct:+.2f}% perplexity at {r.scores_saved_pct:+.2f}% QK^T saved (counted). "
                     f"Static greedy, measured: {measured_verdict(r, static)}. "
                     f"Uniform, measured: {measured_verdict(r, uniform)}.")
    return lines


def bracketing_steps(allocation: AllocationPath, saved_pct: float, scale_pct: float) -> list[int]:
    """Indices of the greedy path's steps nearest in QK^T cost to a measured saving ``saved_pct``, one on each side
    (one index at equal cost). ``scale_pct`` converts a path fraction f to the saving the protocol measures,
    ``scale_pct * (1 - f)`` (below 100: segment 0 runs at full rank)."""
    fraction = 1 - saved_pct / scale_pct
    fractions = [step.scores_fraction for step in allocation.steps]  # strictly decreasing
    tol = EQUAL_COST_PP / scale_pct
    higher = [i for i, f in enumerate(fractions) if f >= fraction - tol]  # saves at most as much
    lower = [i for i, f in enumerate(fractions) if f <= fraction + tol]  # saves at least as much
    return sorted({*(higher[-1:]), *(lower[:1])})


def _saving_scale(at: dict[str, tuple[str, float | None]], measured: dict[str, Measurement], head_dim: int) -> float | None:
    """Measured QK^T saving (%) per unit of (1 - rank fraction), from the uniform ranks: the same for every static
    allocation at layer granularity, since every layer sees the same (query, key) pairs."""
    scales = [100 * (1 - measured[name].scores_flops_fraction) / (1 - parameter / head_dim)
              for name, (family, parameter) in at.items() if family == "uniform" and name in measured]
    return float(np.median(scales)) if scales else None


FAMILY_STYLE = {"full rank": ("k", "o"), "uniform": ("tab:blue", "o"), "static greedy": ("tab:green", "s"),
                "NER threshold": ("tab:purple", "^"), "ALRT stable rank": ("tab:orange", "v"), "random": ("tab:gray", "x"),
                "learned": ("tab:red", "*"), "learned, mask off": ("tab:pink", "*")}


def plot_front(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r.seq_len for r in results})
    figure, axes = plt.subplots(2, len(lengths), figsize=(5 * len(lengths), 8), squeeze=False)
    for column, length in enumerate(lengths):
        at = [r for r in results if r.seq_len == length]
        for row, (key, label) in enumerate((("scores_saved_pct", "QK^T FLOPs saved (%)"),
                                            ("attention_saved_pct", "whole-attention FLOPs saved (%)"))):
            axis = axes[row][column]
            for family, (colour, marker) in FAMILY_STYLE.items():
                points = sorted((getattr(r, key), r.increase_pct) for r in at if r.family == family)
                if points:
                    x, y = zip(*points)
                    axis.plot(x, y, marker=marker, color=colour, label=family, markersize=9 if marker == "*" else 6,
                              linestyle="-" if family in ("uniform", "static greedy", "NER threshold", "ALRT stable rank") else "none")
            if row == 0:
                axis.axhspan(-TARGET_INCREASE_PCT, TARGET_INCREASE_PCT, color="tab:green", alpha=0.08)
                axis.axvline(40, color="tab:green", linestyle=":", linewidth=1)
            axis.set_yscale("symlog", linthresh=1.0)
            axis.set_xlabel(label)
            axis.set_ylabel("perplexity increase over full rank (%)")
            axis.set_title(f"L = {length}")
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle("Held-out perplexity vs attention FLOPs (lower right is better; dotted: the 40% target)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_ranks(mean_ranks: dict[tuple[int, str], np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not mean_ranks:
        return
    figure, axes = plt.subplots(1, len(mean_ranks), figsize=(4 * len(mean_ranks), 4), squeeze=False)
    for axis, ((length, method), ranks) in zip(axes[0], mean_ranks.items()):
        image = axis.imshow(ranks.mean(-1).T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=ranks.max())
        axis.set_title(f"{method}\nL = {length}", fontsize=9)
        axis.set_xlabel("segment")
        axis.set_ylabel("layer")
        figure.colorbar(image, ax=axis, label="mean rank")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--fit-corpus", default="shakespeare-plays")
    parser.add_argument("--eval-corpus", default="britannica-1911")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024])
    parser.add_argument("--segment-len", type=int, default=128)
    parser.add_argument("--eval-sequences", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calibration-sequences", type=int, default=8, help="of the fit corpus, at 1024 tokens")
    parser.add_argument("--allocation-sequences", type=int, default=4, help="calibration sequences the greedy search uses")
    parser.add_argument("--allocation", type=Path, help="a saved greedy path (drrl_gym.allocation); searched if absent")
    parser.add_argument("--learned", type=Path, nargs="*", default=[], help="export directories of learned policies")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the attention-output cosine (saves memory)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--merge", type=Path, nargs="+", help="only merge the results.json of these output directories "
                        "(e.g. lengths run separately) into --out's tables and pareto.png; nothing is measured")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for directory in args.merge or []:
        if not (directory / "results.json").is_file():
            parser.error(f"--merge {directory}: no results.json there")
    for name in ("segment_len", "eval_sequences", "batch_size", "calibration_sequences", "allocation_sequences"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for length in args.seq_lens:
        if length < 2 * args.segment_len or length % args.segment_len:
            parser.error(f"--seq-lens {length}: each length must be a multiple of --segment-len {args.segment_len} "
                         "holding at least two segments")
    for path in [*args.learned, *([args.allocation] if args.allocation else [])]:
        if not path.exists():
            parser.error(f"{path} does not exist")
    return args


def merge(directories: list[Path], out: Path) -> list[Result]:
    """Concatenate the results of several runs (in the given order) and write the combined tables and plot."""
    sources = [json.loads((directory / "results.json").read_text()) for directory in directories]
    results = [Result(**row) for source in sources for row in source["rows"]]
    markdown = write_results(results, {"sources": [source["meta"] for source in sources]}, {}, out)
    print(markdown)
    return results


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    device = resolve_device(args.device)
    backbone = load_backbone(args.model, device)
    d = backbone.geometry.head_dim
    fit = load_corpus(backbone.tokenizer, CorpusConfig(args.fit_corpus, 1024, args.calibration_sequences, 1))
    basis = load_or_calibrate_basis(backbone, fit.calibration, fit.fingerprint)
    trained_with = load_exported_policy(args.learned[0]).basis if args.learned else None
    if trained_with is not None:  # the learned policies carry the basis they were trained with: all methods share it
        basis = trained_with
    grid = tuple(d * k // 8 for k in range(1, 9))
    if args.allocation:
        allocation = AllocationPath.load(args.allocation)
    else:
        allocation = greedy_static_allocation(backbone, basis.to(device), fit.calibration[: args.allocation_sequences],
                                              grid, min_scores_fraction=min(STATIC_BUDGETS))
        allocation.save(args.out / "allocation.json")
    results: list[Result] = []
    meta: dict[str, Any] = dict(
        command="python benchmarks/pareto.py " + " ".join(sys.argv[1:] if argv is None else argv), machine=describe_machine(device), date=date.today().isoformat(),
        torch=torch.__version__, transformers=transformers.__version__, dtype=str(backbone.dtype), model=args.model,
        fit_corpus=args.fit_corpus, eval_corpus=args.eval_corpus, segment_len=args.segment_len, eval_tokens={},
        rank_grid=list(grid), static_budgets=list(STATIC_BUDGETS))
    mean_ranks: dict[tuple[int, str], np.ndarray] = {}
    for length in args.seq_lens:
        spec = ControllerSpec(grid, "layer", args.segment_len, length, None, "calibrated")
        runtime = DynamicRankRuntime(backbone, FullRank(spec.controller(backbone.geometry)), basis, spec)
        model = runtime.install()
        methods = {**baseline_methods(spec, backbone.geometry, allocation),
                   **learned_methods(args.learned, basis)}
        sequences = _held_out(backbone, args.eval_corpus, length, args.eval_sequences)
        meta["eval_tokens"][str(length)] = int(sequences.numel())
        print(f"L={length}: {len(methods)} methods on {len(sequences)} x {length} held-out tokens", flush=True)
        measured = measure_policies(model, {n: (p, s) for n, (_, _, p, s) in methods.items()}, sequences,
                                    args.batch_size, fidelity=not args.no_fidelity)
        extra = bracketing_methods(allocation, spec, backbone.geometry, methods, measured)
        if extra:  # the greedy allocations nearest to each learned policy's measured cost, measured the same way
            print(f"L={length}: {len(extra)} greedy path steps next to the learned policies' costs", flush=True)
            again = {n: (p, s) for n, (_, _, p, s) in {"full rank": methods["full rank"], **extra}.items()}
            second = measure_policies(model, again, sequences, args.batch_size, fidelity=not args.no_fidelity)
            second.pop("full rank")  # rerun only as the fidelity reference; the first pass's stays in the table
            measured.update(second)
            methods = _with_extra_static(methods, extra)
        results += _results(length, methods, measured)
        for name, measurement in measured.items():
            if methods[name][0] == "learned" or name == "static greedy <= 60%":
                mean_ranks[(length, name)] = measurement.mean_ranks
        runtime.uninstall()  # the next length installs a fresh runtime on the same backbone
        markdown = write_results(results, meta, mean_ranks, args.out)  # after every length: nothing lost on a crash
    print(markdown)
    return results


def bracketing_methods(allocation: AllocationPath, spec: ControllerSpec, geometry, methods: dict[str, Any],
                       measured: dict[str, Measurement]) -> dict[str, tuple[str, float | None, RankPolicy, ControllerSpec]]:
    """The greedy path's steps nearest in cost to each measured learned policy (one on each side), as methods, less
    those already measured: the path records every intermediate allocation, so the learned policies can be compared
    with measured static allocations at (or next to) their own cost instead of a line between budgets."""
    scale = _saving_scale({n: m[:2] for n, m in methods.items()}, measured, geometry.head_dim)
    if scale is None:
        return {}
    already = {m[1] for m in methods.values() if m[0] == "static greedy"}
    controller = spec.controller(geometry)
    extra = {}
    for name, (family, *_rest) in methods.items():
        if not family.startswith("learned"):
            continue
        for index in bracketing_steps(allocation, 100 * (1 - measured[name].scores_flops_fraction), scale):
            step = allocation.steps[index]
            if index == 0 or step.scores_fraction in already:  # step 0 is full rank, measured anyway
                continue
            ranks = step.ranks_tensor()
            token_ranks = ranks[:, 0] if spec.granularity == "layer" else ranks.reshape(-1)
            extra[f"static greedy step {index}"] = ("static greedy", step.scores_fraction,
                                                   StaticRanks(controller, token_ranks.tolist()), spec)
    return extra


def _with_extra_static(methods: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``methods`` with ``extra`` inserted after its last static greedy method (so the tables stay grouped)."""
    names = list(methods)
    static = [i for i, n in enumerate(names) if methods[n][0] == "static greedy"]
    cut = static[-1] + 1 if static else len(names)
    merged = {n: methods[n] for n in names[:cut]}
    merged.update(sorted(extra.items(), key=lambda item: -item[1][1]))
    merged.update({n: methods[n] for n in names[cut:]})
    return merged


def _held_out(backbone, corpus: str, length: int, wanted: int) -> torch.Tensor:
    """Up to ``wanted`` sequences of ``length`` tokens of the eval corpus (all of it is held out)."""
    splits = load_corpus(backbone.tokenizer, CorpusConfig(corpus, length, 1, 1))
    everything = torch.cat([splits.calibration, splits.eval, splits.train])
    if len(everything) < wanted:
        print(f"note: {corpus!r} holds {len(everything)} sequences of {length} tokens; using them all", flush=True)
    return everything[:wanted]


def _results(length: int, methods: dict[str, Any], measured: dict[str, Measurement]) -> list[Result]:
    full = measured["full rank"].perplexity
    return [Result(length, methods[name][0], name, methods[name][1], m.perplexity, 100 * (m.perplexity / full - 1),
                   m.fidelity, 100 * (1 - m.scores_flops_fraction), 100 * (1 - m.attention_flops_fraction),
                   m.latency_ms, m.rank_fraction, None if m.switch_fraction is None else 100 * m.switch_fraction)
            for name, m in ((n, measured[n]) for n in methods if n in measured)]


if __name__ == "__main__":
    main()

"""Held-out evaluation of a learned rank policy against full rank and uniform static ranks.

    python agents/evaluate.py runs/X/export                  # an export directory (drrl_gym.export)
    python agents/evaluate.py runs/X/model.zip               # an SB3 model of train_ppo.py (reads runs/X/config.yaml)

On the eval split of the corpus the policy was trained on (disjoint from its train and calibration text), every
method runs the same protocol as the environment: sequences of ``seq_len`` tokens fed ``segment_len`` at a time
with a KV cache, segment 0 at full rank (the policy's warm-up), then

* full rank: the unmodified model (also the reference for fidelity);
* uniform r: every layer and KV head at rank r (calibrated basis), no statistics;
* learned policy: the exported dynamic-rank model, deciding every segment from the last one's statistics;
* uniform at equal FLOPs: the highest uniform rank, interpolated linearly between the neighbouring measured ranks,
  whose FLOPs fraction does not exceed the policy's (once for the QK^T scores, where that is equal FLOPs; once for
  the whole attention, statistics included, where it is full rank if the policy costs that much). This is the
  headline comparison; each row's note says which case applies.

Columns (measured by ``drrl_gym.policy_metrics``, which documents them): perplexity over every token; fidelity, the mean
cosine of attention outputs against the full-rank run over the decision segments; FLOPs reductions of the QK^T
scores and of the whole attention, each method charged for what it runs (the policy for its statistics, every
low-rank method for its projected-key cache); latency, the median wall time of one segment's forward pass. Writes results.csv, results.json, results.png and results.md; prints the table.
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

if __package__ in (None, ""):  # run as `python agents/evaluate.py`: make the `agents` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers
import yaml
from transformers import PreTrainedModel

from drrl_gym.backbone import load_backbone, resolve_device
from drrl_gym.bases import load_or_calibrate_basis
from drrl_gym.corpus import CorpusConfig, load_corpus
from drrl_gym.env import EnvConfig
from drrl_gym.perplexity import describe_machine
from drrl_gym.export import ControllerSpec, build_dynamic_rank_model, load_dynamic_rank_model
from drrl_gym.policy_metrics import measure_policies
from drrl_gym.policies import FullRank, RankPolicy, UniformRank

FIELDS = ("method", "rank", "perplexity", "fidelity", "scores_flops_fraction", "attention_flops_fraction",
          "scores_flops_reduction_pct", "attention_flops_reduction_pct", "latency_ms", "note")


@dataclass
class Row:
    method: str
    rank: float | None  # uniform rank (interpolated for the equal-FLOPs rows); None for the policy
    perplexity: float
    fidelity: float
    scores_flops_fraction: float
    attention_flops_fraction: float
    latency_ms: float | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scores_flops_reduction_pct": 100 * (1 - self.scores_flops_fraction),
                "attention_flops_reduction_pct": 100 * (1 - self.attention_flops_fraction)}


# ---------------------------------------------------------------------------------------------- measuring
def evaluate_model(model: PreTrainedModel, sequences: torch.Tensor, batch_size: int, progress: bool = True) -> list[Row]:
    """Full rank, every uniform rank choice and the model's own policy on ``sequences`` (n, seq_len), measured
    by ``drrl_gym.policy_metrics`` through the model's runtime (``model.drrl``)."""
    runtime = model.drrl
    spec, learned = runtime.spec, runtime.policy
    baseline_spec = replace(spec, epsilon=None)  # baselines run unmasked; the policy keeps its training mask
    controller = baseline_spec.controller(runtime.geometry)
    d = runtime.geometry.head_dim
    methods: dict[str, tuple[RankPolicy, ControllerSpec]] = {"full rank": (FullRank(controller), baseline_spec)}
    methods.update({f"uniform r={r}": (UniformRank(controller, r), baseline_spec) for r in spec.rank_choices if r < d})
    methods["learned policy"] = (learned, spec)
    results = measure_policies(model, methods, sequences, batch_size, fidelity=True, progress=progress)
    ranks = {"full rank": d, **{f"uniform r={r}": r for r in spec.rank_choices if r < d}}
    rows = [Row(name, ranks.get(name), m.perplexity, m.fidelity, m.scores_flops_fraction, m.attention_flops_fraction,
                m.latency_ms) for name, m in results.items()]
    return rows + _equal_flops_rows(rows)


def _equal_flops_rows(rows: list[Row]) -> list[Row]:
    """The strongest uniform rank within the policy's FLOPs budget, once for the QK^T scores, once for the whole
    attention: the highest rank, linearly interpolated between neighbouring measured ranks, whose FLOPs fraction
    does not exceed the policy's. The scores fraction grows with rank, so that is the rank at equal scores FLOPs.
    The whole-attention fraction need not (a low rank adds basis projections, full rank has none), so there the
    answer is full rank whenever the policy, statistics included, costs at least as much as full rank.
    """
    policy = rows[-1]
    by_rank = sorted(rows[:-1], key=lambda r: -r.rank)  # full rank first
    numeric = ("rank", "perplexity", "fidelity", "scores_flops_fraction", "attention_flops_fraction")
    out = []
    for key, name, label in (("scores_flops_fraction", "scores", "QK^T scores"),
                             ("attention_flops_fraction", "attention", "whole-attention")):
        budget = getattr(policy, key)
        within = next((i for i, r in enumerate(by_rank) if getattr(r, key) <= budget), None)
        if within is None:
            value, note = {k: getattr(by_rank[-1], k) for k in numeric}, \
                f"the policy's {label} FLOPs are below every uniform rank's: the lowest rank is shown"
        elif within == 0:
            value, note = {k: getattr(by_rank[0], k) for k in numeric}, \
                f"full rank fits the policy's {label} FLOPs budget (the policy costs at least as much)"
        else:
            above, below = by_rank[within - 1], by_rank[within]
            w = (budget - getattr(below, key)) / (getattr(above, key) - getattr(below, key))
            value = {k: getattr(below, k) + w * (getattr(above, k) - getattr(below, k)) for k in numeric}
            note = f"interpolated between uniform r={below.rank:.0f} and r={above.rank:.0f} to the policy's {label} FLOPs"
        out.append(Row(method=f"uniform @ policy {name} FLOPs", latency_ms=None, note=note, **value))
    return out


# ------------------------------------------------------------------------------------------------ output
def markdown_table(rows: list[Row]) -> str:
    lines = ["| method | rank | perplexity | fidelity | QK^T FLOPs saved | attention FLOPs saved | latency ms/segment |",
             "|---|---|---|---|---|---|---|"]
    for row in map(Row.as_dict, rows):
        rank = "" if row["rank"] is None else f"{row['rank']:.1f}" if row["rank"] % 1 else f"{row['rank']:.0f}"
        latency = "" if row["latency_ms"] is None else f"{row['latency_ms']:.1f}"
        lines.append(f"| {row['method']} | {rank} | {row['perplexity']:.3f} | {row['fidelity']:.4f} | "
                     f"{row['scores_flops_reduction_pct']:+.1f}% | {row['attention_flops_reduction_pct']:+.1f}% | {latency} |")
    return "\n".join(lines)


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.2))
    uniform = sorted((r for r in rows if r.method.startswith(("uniform r", "full"))), key=lambda r: r.scores_flops_fraction)
    axes.plot([r.scores_flops_fraction for r in uniform], [r.perplexity for r in uniform], "o-", color="tab:blue",
              label="uniform static rank (full rank at 1)")
    for r in uniform:
        axes.annotate(f"r={r.rank:.0f}", (r.scores_flops_fraction, r.perplexity), textcoords="offset points", xytext=(4, 4))
    policy = next(r for r in rows if r.method == "learned policy")
    axes.plot(policy.scores_flops_fraction, policy.perplexity, "*", color="tab:red", markersize=14, label="learned policy")
    matched = next(r for r in rows if r.method == "uniform @ policy scores FLOPs")
    axes.plot(matched.scores_flops_fraction, matched.perplexity, "s", mfc="none", color="tab:blue",
              label="uniform at the policy's QK^T FLOPs")
    axes.set_xlabel("QK^T scores FLOPs / full rank")
    axes.set_ylabel("perplexity (eval split)")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # plain numbers, not 8x10^1
    axes.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(rows: list[Row], meta: dict[str, Any], out_dir: Path) -> str:
    """results.csv / .json / .png / .md under ``out_dir``; returns the Markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dicts = [row.as_dict() for row in rows]
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(dicts)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": dicts}, indent=2))
    _plot(rows, out_dir / "results.png")
    table = markdown_table(rows)
    (out_dir / "results.md").write_text(f"{table}\n\n{json.dumps(meta, indent=2)}\n")
    return table



def _evaluate_and_write(model: PreTrainedModel, source: str, out_dir: Path, eval_sequences: int, batch_size: int) -> list[Row]:
    config = model.drrl.env_config
    splits = load_corpus(model.drrl.tokenizer, CorpusConfig(config.corpus, config.seq_len, config.calibration_sequences,
                                                            config.eval_sequences))
    if not 1 <= eval_sequences <= len(splits.eval):
        raise ValueError(f"eval_sequences={eval_sequences}: the eval split holds {len(splits.eval)} sequences. Fix: "
                         f"pass 1..{len(splits.eval)} (the split's size is the training config's env.eval_sequences).")
    sequences = splits.eval[:eval_sequences]
    rows = evaluate_model(model, sequences, batch_size)
    device = model.device
    meta = dict(command="python " + " ".join(sys.argv), source=source, machine=describe_machine(device), date=date.today().isoformat(),
                torch=torch.__version__, transformers=transformers.__version__, dtype=str(model.dtype),
                model=config.model, corpus=config.corpus, seq_len=config.seq_len, segment_len=config.segment_len,
                eval_sequences=eval_sequences, eval_tokens=int(sequences.numel()), rank_choices=list(config.rank_choices),
                epsilon=model.drrl.spec.epsilon, basis=config.basis)
    table = write_results(rows, meta, out_dir)
    print(f"\nHeld-out evaluation ({eval_sequences} x {config.seq_len} tokens of {config.corpus!r}, {meta['machine']}):\n"
          f"{table}\nwritten to {out_dir}/results.{{csv,json,png,md}}", flush=True)
    return rows


def evaluate_export(export_dir: Path, out_dir: Path, eval_sequences: int, batch_size: int = 4,
                    device: str = "auto") -> list[Row]:
    """Load an export directory and evaluate it (the artefact that ships is the one measured)."""
    model = load_dynamic_rank_model(export_dir, resolve_device(device))
    return _evaluate_and_write(model, str(export_dir), out_dir, eval_sequences, batch_size)


def evaluate_sb3(model_zip: Path, config_yaml: Path, out_dir: Path, eval_sequences: int, batch_size: int = 4,
                 device: str = "auto") -> list[Row]:
    """Evaluate an SB3 model of train_ppo.py without exporting it (rebuilt in memory as the export would be)."""
    from sb3_contrib import MaskablePPO
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
    from stable_baselines3 import PPO
    from stable_baselines3.common.save_util import load_from_zip_file

    from agents.extractor import policy_network_from_sb3

    env_block = {**yaml.safe_load(config_yaml.read_text())["env"], "device": device}
    if "rank_choices" in env_block:
        env_block["rank_choices"] = tuple(env_block["rank_choices"])
    config = EnvConfig(**env_block)
    data, _, _ = load_from_zip_file(model_zip, load_data=True, device="cpu")
    algorithm = MaskablePPO if issubclass(data["policy_class"], MaskableActorCriticPolicy) else PPO
    policy = policy_network_from_sb3(algorithm.load(model_zip, device="cpu").policy)
    backbone = load_backbone(config.model, resolve_device(device), config.torch_dtype)
    basis = None
    if config.basis == "calibrated":
        splits = load_corpus(backbone.tokenizer, CorpusConfig(config.corpus, config.seq_len, config.calibration_sequences,
                                                              config.eval_sequences))
        basis = load_or_calibrate_basis(backbone, splits.calibration, splits.fingerprint)
    model = build_dynamic_rank_model(backbone, policy, basis, ControllerSpec.from_env_config(config), config)
    return _evaluate_and_write(model, str(model_zip), out_dir, eval_sequences, batch_size)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policy", type=Path, help="an export directory, or an SB3 .zip written by train_ppo.py")
    parser.add_argument("--config", type=Path, help="for a .zip: the run's config.yaml (default: beside the run's model)")
    parser.add_argument("--out", type=Path, help="output directory (default: <run dir>/eval)")
    parser.add_argument("--eval-sequences", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
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

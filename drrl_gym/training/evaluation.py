"""Held-out evaluation of a learned rank policy against full rank and the measured uniform static ranks.

On the eval split of the corpus the policy was trained on (disjoint from its train and calibration text), every
method runs the same protocol as the environment: sequences of ``seq_len`` tokens fed ``segment_len`` at a time
with a KV cache, segment 0 at full rank (the policy's warm-up), then

* full rank: the unmodified model (also the reference for fidelity);
* uniform r: every layer and KV head at rank r (calibrated basis), no statistics;
* learned policy: the exported dynamic-rank model, deciding every segment from the last one's statistics;
* the policy's nearest measured neighbours: for its QK^T-scores FLOPs and again for its whole-attention FLOPs, the
  measured uniform rank (or full rank) that costs the least among those costing more ("saves less") and the one
  that costs the most among those costing at most as much ("saves more"), copied from the rows above. These are
  the headline comparison. They are never interpolated: perplexity is convex in the FLOPs fraction, so a straight
  line between two measured ranks lies above the curve, overstates the baseline's perplexity at the policy's
  budget and flatters the policy (and no rank between them was ever run).

Columns (measured by ``drrl_gym.measure``, which documents them): perplexity over every token; fidelity, the mean
cosine of attention outputs against the full-rank run over the decision segments; FLOPs reductions of the QK^T
scores and of the whole attention, each method charged for what it runs (the policy for its statistics, every
low-rank method for its projected-key cache); latency, the median wall time of one segment's forward pass.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from drrl_gym import EnvConfig
from drrl_gym.backbone import load_backbone, resolve_device
from drrl_gym.calibration import load_or_calibrate_basis
from drrl_gym.corpus import CorpusSplits, load_corpus
from drrl_gym.export import ControllerSpec, build_dynamic_rank_model, load_dynamic_rank_model
from drrl_gym.files import atomic_write, atomic_write_text
from drrl_gym.perplexity import describe_machine
from drrl_gym.policies import FullRank, RankPolicy, UniformRank
from drrl_gym.policy_metrics import measure_policies

FIELDS = ("method", "rank", "perplexity", "fidelity", "scores_flops_fraction", "attention_flops_fraction",
          "scores_flops_reduction_pct", "attention_flops_reduction_pct", "latency_ms", "note")


@dataclass
class Row:
    method: str
    rank: float | None  # uniform rank (head_dim for full rank); None for the policy
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
    by ``drrl_gym.measure`` through the model's runtime (``model.drrl``)."""
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
    return rows + _neighbour_rows(rows)


BUDGETS = (("scores_flops_fraction", "QK^T"), ("attention_flops_fraction", "attention"))
NEIGHBOUR = "(measured, saves"  # in the method name of every neighbour row


def _neighbour_rows(rows: list[Row]) -> list[Row]:
    """For the policy's QK^T-scores FLOPs and for its whole-attention FLOPs: copies of the measured uniform rows (full
    rank included) nearest on each side of the policy's fraction, "saves less" (the cheapest costing more) and
    "saves more" (the dearest costing at most as much). A side without a measured row is left out. The whole-
    attention fraction need not grow with rank (a low rank adds basis projections, full rank has none), so the
    neighbours are the nearest by fraction, not by rank.
    """
    policy, measured = rows[-1], rows[:-1]
    out = []
    for key, label in BUDGETS:
        budget = getattr(policy, key)
        dearer = [r for r in measured if getattr(r, key) > budget]
        cheaper = [r for r in measured if getattr(r, key) <= budget]
        sides = [(min(dearer, key=lambda r: getattr(r, key)), "less") if dearer else None,
                 (max(cheaper, key=lambda r: getattr(r, key)), "more") if cheaper else None]
        for source, saves in filter(None, sides):
            note = f"{source.method} as measured above; the policy's {label} FLOPs fraction is {budget:.3f}"
            out.append(replace(source, method=f"{source.method} {NEIGHBOUR} {saves} {label} FLOPs)", note=note))
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
    uniform = sorted((r for r in rows if r.rank is not None and NEIGHBOUR not in r.method),
                     key=lambda r: r.scores_flops_fraction)
    # Dotted: the segments join measured ranks for the eye; nothing between them was measured.
    axes.plot([r.scores_flops_fraction for r in uniform], [r.perplexity for r in uniform], "o:", color="tab:blue",
              label="uniform static rank (full rank at 1)")
    for r in uniform:
        axes.annotate(f"r={r.rank:.0f}", (r.scores_flops_fraction, r.perplexity), textcoords="offset points", xytext=(4, 4))
    policy = next(r for r in rows if r.method == "learned policy")
    axes.plot(policy.scores_flops_fraction, policy.perplexity, "*", color="tab:red", markersize=14, label="learned policy")
    axes.set_xlabel("QK^T scores FLOPs / full rank")
    axes.set_ylabel("perplexity (eval split)")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # plain numbers, not 8x10^1
    axes.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")  # path may be a temporary name
    plt.close(figure)


def write_results(rows: list[Row], meta: dict[str, Any], out_dir: Path) -> str:
    """results.csv / .json / .png / .md under ``out_dir``; returns the Markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dicts = [row.as_dict() for row in rows]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(dicts)
    atomic_write_text(out_dir / "results.csv", text.getvalue())
    atomic_write_text(out_dir / "results.json", json.dumps({"meta": meta, "rows": dicts}, indent=2))
    atomic_write(out_dir / "results.png", lambda tmp: _plot(rows, tmp))
    table = markdown_table(rows)
    atomic_write_text(out_dir / "results.md", f"{table}\n\n{json.dumps(meta, indent=2)}\n")
    return table


def corpus_splits(tokenizer: Any, config: EnvConfig) -> CorpusSplits:
    """The calibration/train/eval splits an env with ``config`` trains and is evaluated on."""
    return load_corpus(tokenizer, config.corpus_config())


def _evaluate_and_write(model: PreTrainedModel, source: str, out_dir: Path, eval_sequences: int, batch_size: int) -> list[Row]:
    config = model.drrl.env_config
    splits = corpus_splits(model.drrl.tokenizer, config)
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
    """Evaluate an SB3 model of train_ppo.py (``config_yaml``: its run's config.yaml) without exporting it: rebuilt
    in memory as the export would be."""
    from sb3_contrib import MaskablePPO
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
    from stable_baselines3 import PPO
    from stable_baselines3.common.save_util import load_from_zip_file

    from drrl_gym.training.config import load_config
    from drrl_gym.training.extractor import policy_network_from_sb3

    config = load_config(config_yaml).env_config(device)
    data, _, _ = load_from_zip_file(model_zip, load_data=True, device="cpu")
    algorithm = MaskablePPO if issubclass(data["policy_class"], MaskableActorCriticPolicy) else PPO
    policy = policy_network_from_sb3(algorithm.load(model_zip, device="cpu").policy)
    backbone = load_backbone(config.model, resolve_device(device), config.torch_dtype)
    basis = None
    if config.basis == "calibrated":
        splits = corpus_splits(backbone.tokenizer, config)
        basis = load_or_calibrate_basis(backbone, splits.calibration, splits.fingerprint)
    model = build_dynamic_rank_model(backbone, policy, basis, ControllerSpec.from_env_config(config), config)
    return _evaluate_and_write(model, str(model_zip), out_dir, eval_sequences, batch_size)



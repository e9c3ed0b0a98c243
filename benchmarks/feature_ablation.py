"""Which observation feature groups help a learned policy? Train once per feature set, compare the held-out results.

    python benchmarks/feature_ablation.py --out runs/ablation -- --config agents/configs/gpu.yaml --set env.reward=kl_budget
    python benchmarks/feature_ablation.py --variants default +attention --out /tmp/ablation -- --set ppo.total_timesteps=64

Every variant is one ``agents/train_ppo.py`` run (arguments after ``--`` go to each run unchanged; the variant
sets ``env.observation_features``) in ``OUT/<variant>``; train_ppo's own held-out evaluation (``eval/results.json``)
is then gathered into ``OUT/summary.json`` and ``OUT/summary.md``: the learned policy's perplexity and FLOPs
fractions, and the uniform rank nearest in cost that saves less and more (rows copied from the evaluation, never
interpolated). Variants (``drrl_gym.observation.FEATURE_GROUPS``):

* ``default``: spectra, bounds, context (the observation of earlier releases);
* ``+attention``, ``+attention_change``: the default plus the group, or ``+signals`` plus both;
* ``-spectra``, ``-bounds``: the default without the group.

One seed per variant: to tell a difference from noise, rerun with ``--seed`` passed after ``--``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from drrl_gym.files import atomic_write_text
from drrl_gym.observation import DEFAULT_FEATURE_GROUPS
from drrl_gym.training.evaluation import NEIGHBOUR

VARIANTS = {
    "default": DEFAULT_FEATURE_GROUPS,
    "+attention": (*DEFAULT_FEATURE_GROUPS, "attention"),
    "+attention_change": (*DEFAULT_FEATURE_GROUPS, "attention_change"),
    "+signals": (*DEFAULT_FEATURE_GROUPS, "attention", "attention_change"),
    "-spectra": ("bounds", "context"),
    "-bounds": ("spectra", "context"),
}
TRAIN = Path(__file__).resolve().parents[1] / "agents" / "train_ppo.py"


def summary_rows(out: Path, variants: list[str]) -> list[dict]:
    """The learned policy's row and its measured neighbours from every finished run's evaluation."""
    rows = []
    for name in variants:
        path = out / name / "eval" / "results.json"
        if not path.exists():
            rows.append({"variant": name, "method": "(no evaluation: the run failed or was skipped)"})
            continue
        for row in json.loads(path.read_text())["rows"]:
            if row["method"] == "learned policy" or NEIGHBOUR in row["method"]:
                rows.append({"variant": name, **row})
    return rows


def main() -> None:
    argv = sys.argv[1:]
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    for name in args.variants:
        groups = "[" + ",".join(VARIANTS[name]) + "]"
        command = [sys.executable, str(TRAIN), *passed, "--set", f"env.observation_features={groups}",
                   "--run-dir", str(args.out / name)]
        print("$ " + " ".join(command), flush=True)
        if subprocess.run(command, check=False).returncode:
            print(f"variant {name}: train_ppo failed; continuing with the next", flush=True)
    rows = summary_rows(args.out, args.variants)
    atomic_write_text(args.out / "summary.json", json.dumps({"passed_arguments": passed, "variants": {
        name: VARIANTS[name] for name in args.variants}, "rows": rows}, indent=1))
    lines = ["| variant | method | perplexity | scores FLOPs fraction | attention FLOPs fraction |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['method']} | {r.get('perplexity', float('nan')):.3f} | "
              f"{r.get('scores_flops_fraction', float('nan')):.3f} | {r.get('attention_flops_fraction', float('nan')):.3f} |"
              for r in rows]
    atomic_write_text(args.out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

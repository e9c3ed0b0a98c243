"""Learning curves of finished runs, SB3 and RLlib alike: mean episode return against env steps, seeds pooled.

    python benchmarks/learning_curves.py --run sb3=runs/sb3 --run rllib=runs/rllib --out docs/results/rllib_h200
    python benchmarks/learning_curves.py --run "L=4096=runs/s0,runs/s1,runs/s2" --out docs/results/ppo_4096

Each ``--run LABEL=DIR[,DIR...]`` is one curve; its directories are seeds of the same configuration. A directory is
read as it was written: ``agents/train_ppo.py``'s ``logs/train/progress.csv`` (``time/total_timesteps``,
``rollout/ep_rew_mean``: SB3's mean over the last 100 episodes) or ``agents/train_rllib.py``'s ``metrics.csv``
(``env_steps``, ``episode_return_mean``). With several seeds the curve is their mean at the env steps all of them
logged, the band the seed spread (lowest to highest seed), and the Markdown table the first and last logged mean
with a 95% confidence interval of the last one (Student t over seeds). Writes ``learning_curves.png`` and
``learning_curves.md``.
"""

from __future__ import annotations

import argparse
import csv
import shlex
from pathlib import Path

import numpy as np

# (file, env-steps column, return column) per trainer, looked up in this order
LOGS = (("logs/train/progress.csv", "time/total_timesteps", "rollout/ep_rew_mean"),
        ("metrics.csv", "env_steps", "episode_return_mean"))
# Two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1); from 10 on, the normal's 1.96 is within 15%.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def read_curve(run_dir: Path) -> dict[int, float]:
    """{env steps: mean episode return} of one run directory."""
    for name, steps_column, return_column in LOGS:
        path = run_dir / name
        if path.is_file():
            with path.open(newline="") as file:
                return {int(float(row[steps_column])): float(row[return_column]) for row in csv.DictReader(file)
                        if row.get(return_column) not in (None, "")}
    raise SystemExit(f"{run_dir}: neither {' nor '.join(name for name, *_ in LOGS)} found. Fix: pass the run "
                     "directory agents/train_ppo.py or agents/train_rllib.py wrote.")


def pooled(curves: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Env steps logged by every seed, and the returns there: (points,) and (seeds, points)."""
    steps = np.array(sorted(set.intersection(*(set(curve) for curve in curves))))
    if steps.size == 0:
        raise SystemExit("the seeds of a curve share no logged env-step count. Fix: pass runs of one configuration.")
    return steps, np.array([[curve[step] for step in steps] for curve in curves])


def confidence_interval(values: np.ndarray) -> str:
    """The mean of ``values`` (one per seed) with the half-width of its 95% confidence interval."""
    if values.size < 2:
        return f"{values.mean():.4f} (1 seed: no interval)"
    half_width = T_975.get(values.size - 1, 1.96) * float(values.std(ddof=1)) / np.sqrt(values.size)
    return f"{values.mean():.4f} +/- {half_width:.4f}"


def parse_run(text: str) -> tuple[str, list[Path]]:
    label, sep, dirs = text.rpartition("=")
    if not sep or not label or not dirs:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=DIR[,DIR...]")
    return label, [Path(d) for d in dirs.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=parse_run, action="append", required=True, metavar="LABEL=DIR[,DIR...]")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(7, 4))
    lines = ["| curve | seeds | env steps (first, last) | return, first | return, last (95% CI) |", "|---|---|---|---|---|"]
    for label, dirs in args.run:
        steps, values = pooled([read_curve(d) for d in dirs])
        mean = values.mean(0)
        axes.plot(steps, mean, marker=".", label=f"{label} ({len(dirs)} seed{'s' * (len(dirs) > 1)})")
        axes.fill_between(steps, values.min(0), values.max(0), alpha=0.25)
        lines.append(f"| {label} | {len(dirs)} | {steps[0]:,}, {steps[-1]:,} | {mean[0]:.4f} | "
                     f"{confidence_interval(values[:, -1])} |")
    axes.set_xlabel("env steps")
    axes.set_ylabel("mean episode return")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out / "learning_curves.png", dpi=120)
    command = shlex.join(["python", "benchmarks/learning_curves.py",
                          *(part for label, dirs in args.run for part in ("--run", f"{label}={','.join(map(str, dirs))}"))])
    (args.out / "learning_curves.md").write_text(f"Made by `{command} --out {args.out}`.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

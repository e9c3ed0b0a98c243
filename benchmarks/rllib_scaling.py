"""Scaling of agents/train_rllib.py over the GPUs of one host, from finished runs: env steps/s and efficiency.

    python benchmarks/rllib_scaling.py --run 1=runs/g1 --run 2=runs/g2 --out docs/results/rllib_x2

Each ``--run GPUS=DIR`` is a finished run of the same configuration on ``GPUS`` GPUs (``--gpus GPUS``). Read from it:
``metrics.csv`` (one row per iteration, sampling and learning together) and, if present, ``gpu_memory.csv``
(``nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu --format=csv -l 1`` logged during the run).

Throughput is the steady state: env steps sampled after the first ``--warmup-iterations`` iterations divided by
their wall time (the first iteration also captures CUDA graphs and fills the runners' caches). The scaling
efficiency at N GPUs is its throughput over N times the 1-GPU run's, so a 1-GPU run is required. Writes
``scaling.md`` and ``scaling.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
from pathlib import Path

IDLE_GIB = 0.5  # a GPU whose peak stays below this did not run the job (nvidia-smi reports a few MiB on idle GPUs)


def parse_run(text: str) -> tuple[int, Path]:
    gpus, sep, run_dir = text.partition("=")
    if not sep or not gpus.isdigit() or int(gpus) < 1 or not run_dir:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GPUS=DIR with GPUS a positive integer")
    return int(gpus), Path(run_dir)


def steady_throughput(run_dir: Path, warmup_iterations: int) -> tuple[float, int]:
    """(env steps/s after the warm-up iterations, iterations they span) of one run's metrics.csv."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"{path} not found. Fix: pass the run directory agents/train_rllib.py wrote.")
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    lifetime_steps = [0.0] + [float(row["env_steps"]) for row in rows]
    steady = [(lifetime_steps[i + 1] - lifetime_steps[i], float(row["iteration_time_s"]))
              for i, row in enumerate(rows) if i >= warmup_iterations]
    if not steady:
        raise SystemExit(f"{path}: {len(rows)} iterations, none after the {warmup_iterations} warm-up ones. Fix: "
                         "a longer run or fewer --warmup-iterations.")
    return sum(steps for steps, _ in steady) / sum(seconds for _, seconds in steady), len(steady)


def peak_memory_gib(run_dir: Path) -> dict[int, float] | None:
    """{GPU index: peak memory used, GiB} from the run's gpu_memory.csv, or None without one."""
    path = run_dir / "gpu_memory.csv"
    if not path.is_file():
        return None
    peaks: dict[int, float] = {}
    with path.open(newline="") as file:
        for row in csv.DictReader(file, skipinitialspace=True):
            index, used_mib = int(row["index"]), float(row["memory.used [MiB]"].split()[0])
            peaks[index] = max(peaks.get(index, 0.0), used_mib / 1024)
    return peaks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=parse_run, action="append", required=True, metavar="GPUS=DIR")
    parser.add_argument("--warmup-iterations", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = dict(args.run)
    if len(runs) != len(args.run):
        parser.error("one run per GPU count")
    if 1 not in runs:
        parser.error("the efficiency needs a 1-GPU run: add --run 1=DIR")

    rows = []
    for gpus, run_dir in sorted(runs.items()):
        rate, iterations = steady_throughput(run_dir, args.warmup_iterations)
        rows.append({"gpus": gpus, "run_dir": str(run_dir), "steady_iterations": iterations,
                     "env_steps_per_s": rate, "peak_memory_gib_per_gpu": peak_memory_gib(run_dir)})
    for row in rows:
        row["speedup"] = row["env_steps_per_s"] / rows[0]["env_steps_per_s"]
        row["efficiency"] = row["speedup"] / row["gpus"]

    command = shlex.join(["python", "benchmarks/rllib_scaling.py", *(f"--run={g}={d}" for g, d in sorted(runs.items())),
                          f"--warmup-iterations={args.warmup_iterations}", f"--out={args.out}"])
    lines = [f"Made by `{command}`.", "",
             "| GPUs | env steps/s (steady) | speed-up | efficiency | peak GPU memory, GiB per GPU | run |",
             "|---:|---:|---:|---:|---|---|"]
    for row in rows:
        memory = row["peak_memory_gib_per_gpu"]
        memory_text = ", ".join(f"{memory[i]:.1f}" for i in sorted(memory) if memory[i] >= IDLE_GIB) if memory else "not logged"
        lines.append(f"| {row['gpus']} | {row['env_steps_per_s']:.0f} | {row['speedup']:.2f}x | "
                     f"{row['efficiency']:.0%} | {memory_text} | {row['run_dir']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.md").write_text("\n".join(lines) + "\n")
    (args.out / "scaling.json").write_text(json.dumps({"command": command, "runs": rows}, indent=2) + "\n")
    print("\n".join(lines[2:]))


if __name__ == "__main__":
    main()

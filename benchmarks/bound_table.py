"""Time of the selection env's dropped-mass bound table for one layer (``drrl_gym.selection.dropped_mass_bound_table``).

    python benchmarks/bound_table.py --device cpu --threads 2 --out docs/results/bound_table_cpu
    python benchmarks/bound_table.py --device cuda --batch 64 --out OUT                 # the env's 64-env batch

The table is most of a selection-mode env step: per (row, KV head) and candidate (rank, keep), the mean over the
group's query rows of the bound (7) (docs/selection.md, section 5). This times it on random rotated queries and keys
of SmolLM2's shapes (9 query heads over 3 KV heads, d = 64; ``--queries`` new tokens over ``--keys`` keys, the env's
rank and keep choices), for each work dtype the installed code accepts and for the last ``m`` queries only
(``--bound-queries``, the env's ``bound_queries``). Median of ``--repeats`` timed calls after one warm-up. Writes
``results.json`` (command, machine, date, versions, git commit, every time) and ``results.md``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from drrl_gym.cli import number_in
from drrl_gym.files import atomic_write_text
from drrl_gym.perplexity import describe_machine
from drrl_gym.selection import dropped_mass_bound_table

RANKS, KEEPS = (16, 32, 48, 64), (0.0625, 0.125, 0.25, 1.0)  # the env's selection-mode defaults
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M


def timed(call, repeats: int, device: torch.device) -> float:
    """Median seconds of ``call()`` over ``repeats`` runs, after one untimed warm-up."""
    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run()
    return statistics.median(run() for _ in range(repeats))


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_record(device: torch.device) -> dict:
    """The fields every results file starts with: the command, the machine, the date, torch and the git commit."""
    return {"command": " ".join(["python", *sys.argv]), "machine": describe_machine(device),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__, "git_commit": git_commit()}


def parse_launches(parser: argparse.ArgumentParser, items: list[str], fields: str) -> list[tuple[int, ...]]:
    """``--launches`` items such as 16x64x4 as int tuples, one number per name in ``fields`` (e.g. "TxNxWARPS");
    anything else is a usage error."""
    try:
        launches = [tuple(int(n) for n in item.split("x")) for item in items]
        if any(len(launch) != len(fields.split("x")) or min(launch) < 1 for launch in launches):
            raise ValueError
    except ValueError:
        parser.error(f"--launches takes {fields} items of positive integers, got {items}")
    return launches


def write_results(out: Path, meta: dict, summary: str, table: str) -> None:
    """``out``/results.json (``meta``: command, machine, date, torch, git commit, numbers) and ``out``/results.md (who
    measured what and where, then ``summary`` and the Markdown ``table``)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(meta, indent=1))
    atomic_write_text(out / "results.md", f"Measured by `{meta['command']}` on {meta['machine']}, {meta['date']} "
                      f"(torch {meta['torch']}, commit {meta['git_commit']}); {summary}\n\n{table}\n")


def layer_parser(description: str, batch: int, repeats: int, device: str) -> argparse.ArgumentParser:
    """The options of the one-layer benchmarks: --batch, --queries, --keys, --repeats, --device, --out (checked by
    :func:`parse_layer_args`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=number_in(int, 1), default=batch, help=f"env rows (default {batch})")
    parser.add_argument("--queries", type=number_in(int, 1), default=128, help="a segment's new tokens")
    parser.add_argument("--keys", type=number_in(int, 1), default=1024, help="keys visible to the last query")
    parser.add_argument("--repeats", type=number_in(int, 1), default=repeats)
    parser.add_argument("--device", default=device)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def parse_layer_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.queries > args.keys:
        parser.error("--queries must be at most --keys: the queries are the last of the keys' positions")
    return args


def main(argv: list[str] | None = None) -> None:
    parser = layer_parser(__doc__, batch=4, repeats=3, device="cpu")
    parser.add_argument("--bound-queries", type=number_in(int, 1), nargs="*", default=[32],
                        help="also time the table over only the last m queries, for each m")
    parser.add_argument("--threads", type=number_in(int, 1), default=None, help="CPU threads (default: torch's)")
    args = parse_layer_args(parser, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    query = (2 * torch.randn(args.batch, HEADS, args.queries, HEAD_DIM, generator=generator)).to(device)
    keys = (2 * torch.randn(args.batch, KV_HEADS, args.keys, HEAD_DIM, generator=generator)).to(device)
    # Code from before the ``dtype`` argument worked in float64 only: time what the installed code offers.
    dtypes = [torch.float64, torch.float32] if "dtype" in inspect.signature(dropped_mass_bound_table).parameters \
        else [None]
    rows = []
    for dtype in dtypes:
        for m in (None, *args.bound_queries):
            rotated_query = query if m is None else query[:, :, -m:]
            kwargs = {} if dtype is None else {"dtype": dtype}
            call = functools.partial(dropped_mass_bound_table, rotated_query, keys, RANKS, KEEPS, **kwargs)
            seconds = timed(call, args.repeats, device)
            rows.append({"dtype": "float64" if dtype is None else str(dtype).removeprefix("torch."),
                         "queries": rotated_query.shape[2], "ms": 1e3 * seconds})
            print(rows[-1], flush=True)
    meta = {**run_record(device), "threads": torch.get_num_threads(), "shape": {
                "batch": args.batch, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "queries":
                args.queries, "keys": args.keys}, "ranks": RANKS, "keeps": KEEPS, "rows": rows}
    table = "\n".join(f"| {r['dtype']} | {r['queries']} | {r['ms']:.1f} |" for r in rows)
    write_results(args.out, meta, f"one layer, B={args.batch}, {HEADS} query heads over "
                  f"{KV_HEADS} KV heads, d={HEAD_DIM}, {args.keys} keys, ranks {RANKS}, keeps {KEEPS}.",
                  f"| work dtype | queries bounded | ms |\n|---|---:|---:|\n{table}")


if __name__ == "__main__":
    main()

"""Time of the operator that picks selection's kept keys (``drrl_gym.row_threshold.row_thresholds``), env shapes.

    python benchmarks/row_threshold.py --device cuda --out OUT           # the Triton kernel, its launches, the sort
    python benchmarks/row_threshold.py --device cpu --batch 2 --out OUT  # the CPU's topk path

The rows are the priorities (3) of one selection layer at the env's batch (SmolLM2: 3 KV heads with 3 query heads
each, ``--queries`` new tokens over ``--keys`` keys, the default sink and recent windows): rank-r scores of random
rotated queries and keys, -inf at invisible keys and +inf at forced ones. The counts are k_i of (4) for one keep (a
forward's call) and for the env's three dropping keeps (one call of the bound table). Per method, the median of
``--repeats`` timed calls after one warm-up; on CUDA also every launch in ``--launches`` (rows per program x warps)
of the Triton kernel, whose results must equal the sort's. Writes ``results.json`` (command, machine, date,
versions, git commit, every time) and ``results.md``.
"""

from __future__ import annotations

import functools

import torch
from bound_table import layer_parser, parse_launches, parse_layer_args, run_record, timed, write_results

from drrl_gym.row_threshold import _kernel_thresholds, row_thresholds, sorted_thresholds
from drrl_gym.selection import (
    DEFAULT_RECENT_TOKENS,
    DEFAULT_SINK_TOKENS,
    forced_mask,
    grid_counts,
    priorities,
    visible_mask,
)

KV_HEADS, GROUP, HEAD_DIM, RANK = 3, 3, 64, 16  # SmolLM2-135M, the env's smallest rank choice
FORWARD_KEEPS, TABLE_KEEPS = (0.125,), (0.0625, 0.125, 0.25)  # the env's dropping keep choices


def priority_rows(batch: int, queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """(batch * KV_HEADS * queries, keys) float32 group priorities (3) of random rank-RANK scores."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, KV_HEADS, GROUP, queries, RANK, generator=generator).to(device)
    k = torch.randn(batch, KV_HEADS, keys, RANK, generator=generator).to(device)
    approx = 2 * HEAD_DIM**-0.5 * q @ k[:, :, None].transpose(-1, -2)
    visible = visible_mask(queries, keys, device)
    forced = forced_mask(queries, keys, DEFAULT_SINK_TOKENS, DEFAULT_RECENT_TOKENS, device)
    return priorities(approx, visible, forced, "group").reshape(-1, keys).contiguous()


def main(argv: list[str] | None = None) -> None:
    parser = layer_parser(__doc__, batch=64, repeats=20, device="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--launches", nargs="*", default=["1x1", "1x2", "1x4", "2x2", "4x4", "8x8"],
                        help="Triton launches to sweep, rows per program x warps (CUDA only)")
    args = parse_layer_args(parser, argv)
    launches = parse_launches(parser, args.launches, "ROWSxWARPS")
    device = torch.device(args.device)
    values = priority_rows(args.batch, args.queries, args.keys, device)
    rows = []
    for name, keeps in (("forward", FORWARD_KEEPS), ("bound table", TABLE_KEEPS)):
        counts = grid_counts(keeps, args.queries, args.keys, DEFAULT_SINK_TOKENS, DEFAULT_RECENT_TOKENS, device)
        counts = counts.T.repeat(args.batch * KV_HEADS, 1).int().contiguous()  # (rows, C): row b, h, t has k_t
        expected = sorted_thresholds(values, counts)
        methods = {"row_thresholds": functools.partial(row_thresholds, values, counts),
                   "stable sort": functools.partial(sorted_thresholds, values, counts)}
        if device.type == "cuda":
            for per_program, warps in launches:
                got = _kernel_thresholds(values, counts, per_program, warps)
                if not (torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])):
                    raise RuntimeError(f"the kernel at launch {per_program}x{warps} disagrees with the sort")
                methods[f"kernel {per_program}x{warps}"] = functools.partial(_kernel_thresholds, values, counts,
                                                                             per_program, warps)
        for method, call in methods.items():
            rows.append({"call": name, "counts": counts.shape[1], "method": method,
                         "ms": 1e3 * timed(call, args.repeats, device)})
            print(rows[-1], flush=True)
    meta = {**run_record(device), "shape": {"rows": values.shape[0], "keys": args.keys, "batch": args.batch,
                                            "kv_heads": KV_HEADS, "queries": args.queries}, "rows": rows}
    table = "\n".join(f"| {r['call']} | {r['counts']} | {r['method']} | {r['ms']:.3f} |" for r in rows)
    write_results(args.out, meta, f"{values.shape[0]} rows of {args.keys} priorities (B={args.batch} x {KV_HEADS} KV "
                  f"heads x {args.queries} queries).", f"| call | counts | method | ms |\n|---|---:|---|---:|\n{table}")


if __name__ == "__main__":
    main()

"""Time of one layer's selection attention forward (``drrl_gym.selection.selection_attention``) at the env's shapes.

    python benchmarks/selection_forward.py --out OUT                             # CUDA, bf16
    python benchmarks/selection_forward.py --device cpu --batch 2 --out OUT      # CPU, float32

SmolLM2's shapes (9 query heads over 3 KV heads, d = 64) at ``--batch`` rows of ``--queries`` new tokens over
``--keys`` keys, in bf16 on CUDA, with a rank and keep per (row, KV head) drawn from the env's choices and keys
rotated in a cache (the env's path). Median of ``--repeats`` timed calls after a warm-up. The forward's choosing
(rank-r scores over every key, priorities, thresholds) is the largest part of a selection-mode env step: this times
it with the exact attention that follows, both ways: ``selection_attention(fused=True)``, one Triton launch on CUDA
(``drrl_gym.selection_prefill_triton``), and ``fused=False``, the composed path (priorities, kept masks, SDPA).
``--launches`` also times other launches of the fused kernel (queries per program x keys per tile x warps). Every
row reports its largest output difference from the fused call's. Writes ``results.json`` (command, machine, date,
versions, git commit, the times) and ``results.md``.
"""

from __future__ import annotations

import functools

import torch
from bound_table import layer_parser, parse_launches, parse_layer_args, run_record, timed, write_results

from drrl_gym.selection import (
    DEFAULT_RECENT_TOKENS,
    DEFAULT_SINK_TOKENS,
    kept_counts,
    rotate,
    selection_attention,
    visible_key_counts,
)

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
RANKS, KEEPS = (16, 32, 48, 64), (0.0625, 0.125, 0.25)  # the env's choices that drop keys


def main(argv: list[str] | None = None) -> None:
    parser = layer_parser(__doc__, batch=64, repeats=20, device="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--launches", nargs="*", default=[], help="fused kernel launches to sweep, query block x key "
                        "block x warps, e.g. 16x64x8 (CUDA only)")
    args = parse_layer_args(parser, argv)
    launches = parse_launches(parser, args.launches, "TxNxWARPS")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    query = (2 * torch.randn(args.batch, HEADS, args.queries, HEAD_DIM, generator=g)).to(device, dtype)
    key, value = ((2 * torch.randn(args.batch, KV_HEADS, args.keys, HEAD_DIM, generator=g)).to(device, dtype)
                  for _ in range(2))
    basis = torch.linalg.qr(torch.randn(KV_HEADS, HEAD_DIM, HEAD_DIM, generator=g))[0].to(device, dtype)
    rank = torch.tensor(RANKS)[torch.randint(len(RANKS), (args.batch, KV_HEADS), generator=g)].to(device)
    keep = torch.tensor(KEEPS, dtype=torch.float64)[torch.randint(len(KEEPS), (args.batch, KV_HEADS), generator=g)]
    rotated = rotate(key, basis)

    def forward(fused: bool) -> torch.Tensor:
        return selection_attention(query, key, value, basis, rank, keep.to(device), rotated_keys=rotated,
                                   fused=fused)[0]

    default = forward(True).float()
    rows = []
    for name, fused in (("fused=True", True), ("fused=False", False)):
        rows.append({"call": name, "ms": 1e3 * timed(functools.partial(forward, fused), args.repeats, device),
                     "max_difference": float((forward(fused).float() - default).abs().max())})
        print(rows[-1], flush=True)
    if launches and device.type == "cuda":
        from drrl_gym.selection_prefill_triton import launch

        counts = kept_counts(keep, visible_key_counts(args.queries, args.keys), DEFAULT_SINK_TOKENS,
                             DEFAULT_RECENT_TOKENS).to(device)
        inputs = (query, key, value, basis.float(), rotated, rank, counts, HEAD_DIM**-0.5, DEFAULT_SINK_TOKENS,
                  DEFAULT_RECENT_TOKENS)
        for block_t, block_n, warps in launches:
            call = functools.partial(launch, *inputs, max_block_t=block_t, block_n=block_n, num_warps=warps)
            rows.append({"call": f"launch {block_t}x{block_n}x{warps}", "ms": 1e3 * timed(call, args.repeats, device),
                         "max_difference": float((call().float() - default).abs().max())})
            print(rows[-1], flush=True)
    meta = {**run_record(device), "dtype": str(dtype).removeprefix("torch."), "shape": {
                "batch": args.batch, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "queries":
                args.queries, "keys": args.keys}, "ms": rows[0]["ms"], "rows": rows}
    table = "\n".join(f"| {r['call']} | {r['ms']:.3f} | {r['max_difference']:.2g} |" for r in rows)
    write_results(args.out, meta, f"one layer, B={args.batch}, {HEADS} query heads over {KV_HEADS} KV heads, "
                  f"d={HEAD_DIM}, {args.queries} queries over {args.keys} keys, {meta['dtype']}, ranks {RANKS} and "
                  f"keeps {KEEPS} drawn per (row, KV head).",
                  f"| call | ms per call | largest output difference from fused=True |\n|---|---:|---:|\n{table}")


if __name__ == "__main__":
    main()

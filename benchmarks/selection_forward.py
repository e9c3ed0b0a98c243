"""Time of one layer's selection attention forward (``drrl_gym.selection.selection_attention``) at the env's shapes.

    python benchmarks/selection_forward.py --out OUT                             # CUDA, bf16
    python benchmarks/selection_forward.py --device cpu --batch 2 --out OUT      # CPU, float32

SmolLM2's shapes (9 query heads over 3 KV heads, d = 64) at ``--batch`` rows of ``--queries`` new tokens over
``--keys`` keys, in bf16 on CUDA, with a rank and keep per (row, KV head) drawn from the env's choices and keys
rotated in a cache (the env's path). Median of ``--repeats`` timed calls after three warm-ups. The forward's choosing
(rank-r scores over every key, priorities, thresholds, kept mask) is the largest part of a selection-mode env step
with the default ``bound_queries``: this times it with the exact attention that follows. Writes ``results.json``
(command, machine, date, versions, git commit, the time) and ``results.md``.
"""

from __future__ import annotations

import torch
from bound_table import layer_parser, parse_layer_args, run_record, timed, write_results

from drrl_gym.selection import rotate, selection_attention

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
RANKS, KEEPS = (16, 32, 48, 64), (0.0625, 0.125, 0.25)  # the env's choices that drop keys


def main(argv: list[str] | None = None) -> None:
    args = parse_layer_args(layer_parser(__doc__, batch=64, repeats=20, device="cuda" if torch.cuda.is_available()
                                         else "cpu"), argv)
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

    def forward() -> torch.Tensor:
        return selection_attention(query, key, value, basis, rank, keep.to(device), rotated_keys=rotated)[0]

    for _ in range(2):
        forward()
    ms = 1e3 * timed(forward, args.repeats, device)
    print(f"{ms:.3f} ms per call", flush=True)
    meta = {**run_record(device), "dtype": str(dtype).removeprefix("torch."), "shape": {
                "batch": args.batch, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "queries":
                args.queries, "keys": args.keys}, "ms": ms}
    write_results(args.out, meta, f"one layer, B={args.batch}, {HEADS} query heads over {KV_HEADS} KV heads, "
                  f"d={HEAD_DIM}, {args.queries} queries over {args.keys} keys, {meta['dtype']}, ranks {RANKS} and "
                  f"keeps {KEEPS} drawn per (row, KV head).", f"| ms per call |\n|---:|\n| {ms:.3f} |")


if __name__ == "__main__":
    main()

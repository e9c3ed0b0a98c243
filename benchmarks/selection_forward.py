"""Time of one layer's selection attention forward (``drrl_gym.selection.selection_attention``) at the env's shapes.

    python benchmarks/selection_forward.py --out OUT                             # CUDA, bf16
    python benchmarks/selection_forward.py --device cpu --batch 2 --out OUT      # CPU, float32
    python benchmarks/selection_forward.py --profile --out OUT                   # also where the time goes

SmolLM2's shapes (9 query heads over 3 KV heads, d = 64) at ``--batch`` rows of ``--queries`` new tokens over
``--keys`` keys, in bf16 on CUDA, with a rank and keep per (row, KV head) drawn from the env's choices and keys
rotated in a cache (the env's path). Median of ``--repeats`` timed calls after three warm-ups. The forward's choosing
(rank-r scores over every key, priorities, thresholds, kept mask) is the largest part of a selection-mode env step
with the default ``bound_queries``: this times it with the exact attention that follows. Writes ``results.json``
(command, machine, date, versions, git commit, the time) and ``results.md``; ``--profile`` also writes
``profile.txt``, torch.profiler's table of ``--repeats`` more calls by kernel (device time on CUDA, CPU time
elsewhere), once by name and once by name and input shapes.
"""

from __future__ import annotations

import torch
from bound_table import layer_parser, parse_layer_args, run_record, timed, write_results
from torch.profiler import ProfilerActivity, profile

from drrl_gym.files import atomic_write_text
from drrl_gym.selection import rotate, selection_attention

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
RANKS, KEEPS = (16, 32, 48, 64), (0.0625, 0.125, 0.25)  # the env's choices that drop keys


def main(argv: list[str] | None = None) -> None:
    parser = layer_parser(__doc__, batch=64, repeats=20, device="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="also write profile.txt (torch.profiler's tables)")
    args = parse_layer_args(parser, argv)
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
    if args.profile:
        atomic_write_text(args.out / "profile.txt", profile_tables(forward, args.repeats, device))


def profile_tables(call, repeats: int, device: torch.device) -> str:
    """torch.profiler's tables of ``repeats`` calls: by kernel, then by kernel and input shapes (the shapes tell
    which of several calls of one operator a row is)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with profile(activities=activities, record_shapes=True) as profiler:
        for _ in range(repeats):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    by_name = profiler.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=120)
    by_shape = profiler.key_averages(group_by_input_shape=True).table(
        sort_by=sort, row_limit=25, max_name_column_width=60, max_shapes_column_width=120)
    return f"{repeats} calls, by kernel\n\n{by_name}\n{repeats} calls, by kernel and input shapes\n\n{by_shape}\n"


if __name__ == "__main__":
    main()

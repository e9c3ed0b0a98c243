"""Time of selection's priorities (3) of every key (``drrl_gym.key_priorities``) at the env's shapes, and its launches.

    python benchmarks/key_priorities.py --out OUT                          # CUDA: the kernel, its launches, torch
    python benchmarks/key_priorities.py --device cpu --batch 2 --out OUT   # the CPU's torch expression

One selection layer of SmolLM2 (3 KV heads with 3 query heads each, d = 64): ``--queries`` rotated float32 queries
over ``--keys`` rotated bf16 keys (float32 on the CPU), a rank per (row, KV head) drawn from the env's choices, the
default sink and recent windows, selection by group (the env's). Per method, the median of ``--repeats`` timed calls
after one warm-up: the operator, the torch expression it replaces, and on CUDA every launch in ``--launches`` (query
block x key block x warps) of the Triton kernel, whose infinities must equal the torch expression's and whose finite
priorities must agree with it to 0.05. Writes ``results.json`` (command, machine, date, versions, git commit,
every time) and ``results.md``.
"""

from __future__ import annotations

import functools

import torch
from bound_table import layer_parser, parse_launches, parse_layer_args, run_record, timed, write_results

from drrl_gym.key_priorities import _kernel_priorities, key_priorities, torch_priorities
from drrl_gym.selection import DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS

KV_HEADS, GROUP, HEAD_DIM = 3, 3, 64  # SmolLM2-135M
RANKS = (16, 32, 48, 64)  # the env's rank choices


def main(argv: list[str] | None = None) -> None:
    parser = layer_parser(__doc__, batch=64, repeats=20, device="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--launches", nargs="*", default=["4x64x4", "8x64x4", "16x64x4", "16x128x4", "32x64x4",
                                                          "32x64x8", "64x64x8"],
                        help="Triton launches to sweep, query block x key block x warps (CUDA only)")
    args = parse_layer_args(parser, argv)
    launches = parse_launches(parser, args.launches, "TxNxWARPS")
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    query = (2 * torch.randn(args.batch, KV_HEADS, GROUP, args.queries, HEAD_DIM, generator=g)).to(device)
    keys = (2 * torch.randn(args.batch, KV_HEADS, args.keys, HEAD_DIM, generator=g)).to(
        device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    rank = torch.tensor(RANKS)[torch.randint(len(RANKS), (args.batch, KV_HEADS), generator=g)].to(device)
    settings = (HEAD_DIM**-0.5, DEFAULT_SINK_TOKENS, DEFAULT_RECENT_TOKENS)

    methods = {"key_priorities": functools.partial(key_priorities, query, keys, rank, *settings, "group"),
               "torch expression": functools.partial(torch_priorities, query, keys, rank, *settings, False)}
    if device.type == "cuda":
        priorities = torch_priorities(query, keys, rank, *settings, False)
        finite = ~priorities.isinf()
        for block_queries, block_keys, warps in launches:
            launch = f"{block_queries}x{block_keys}x{warps}"
            call = functools.partial(_kernel_priorities, query, keys, rank, *settings, False, block_queries,
                                     block_keys, warps)
            got = call()
            if not torch.equal(got.isinf(), priorities.isinf()) or (got - priorities)[finite].abs().max() > 0.05:
                raise RuntimeError(f"the kernel at launch {launch} disagrees with torch")
            methods[f"kernel {launch}"] = call
    rows = []
    for method, call in methods.items():
        rows.append({"method": method, "ms": 1e3 * timed(call, args.repeats, device)})
        print(rows[-1], flush=True)
    meta = {**run_record(device), "shape": {"batch": args.batch, "kv_heads": KV_HEADS, "group": GROUP,
                                            "head_dim": HEAD_DIM, "queries": args.queries, "keys": args.keys},
            "rows": rows}
    table = "\n".join(f"| {r['method']} | {r['ms']:.3f} |" for r in rows)
    write_results(args.out, meta, f"priorities of B={args.batch} x {KV_HEADS} KV groups x {args.queries} queries over "
                  f"{args.keys} keys, ranks {RANKS} drawn per (row, KV head).", f"| method | ms |\n|---|---:|\n{table}")


if __name__ == "__main__":
    main()

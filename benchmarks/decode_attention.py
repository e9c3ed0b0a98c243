"""The attention operation of one decode step alone: plain SDPA against the selection kernel, as CUDA-graph replays.

    python benchmarks/decode_attention.py --out docs/results/decode_attention_h200

Shapes are SmolLM2-135M's per layer (9 query heads over 3 KV heads, head_dim 64, bf16); every row sees all L keys.
The baseline is the fastest of torch's SDPA backends (``scaled_dot_product_attention(enable_gqa=True)`` on
(B, 9, 1, 64) against (B, 3, L, 64)) and, if installed, flash-attn's ``flash_attn_with_kvcache``. The selection
kernel (``drrl_gym.selection_decode``, backend "triton") reads a dim-blocked rotated key cache, at the settings
(r, keep) of ``SETTINGS`` and a mixed one (a different setting per (row, KV head)).

Timing: one CUDA graph holds ``calls`` consecutive calls, each on its own copy of the cache, with enough copies that
their bytes exceed ``FLUSH_BYTES`` (several times the L2 cache), so no call finds its keys in L2 from the call
before; us per call = replay time / calls, the median of ``--repeats`` replays. "model bytes" are the bytes the
cost model charges (``drrl_gym.selection_cost.decode_traffic`` times the 2 L d bf16 values of full attention per
KV head), "GB/s" those bytes over the measured time; "workspace" is the peak memory one eager call allocates
beyond its inputs. A torch.profiler table of eager calls (per-kernel GPU time) is written for one configuration.
``--quick`` measures only L = 8192, B = 16 and 64 at r=16 keep=1/8 (for iterating on the kernel). ``--smoke`` runs
tiny sizes on the CPU (reference backend, or Triton's interpreter with TRITON_INTERPRET=1) to check the script.
Writes ``results.json``, ``results.md`` and ``profile.txt`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from drrl_gym.files import atomic_write_text
from drrl_gym.perplexity import describe_machine
from drrl_gym.selection_cost import decode_traffic
from drrl_gym.selection_decode import dim_blocked_layout, selection_decode

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
SETTINGS = [(16, 1 / 8), (16, 1 / 4), (32, 1 / 8), (32, 1 / 4), (64, 1 / 16)]
MIXED = [(8, 1 / 16), (16, 1 / 8), (32, 1 / 4), (16, 1 / 16), (64, 1 / 8), (32, 1 / 16)]  # cycled over (b, g)
FLUSH_BYTES = 256 * 2**20
PROFILED = (16, 8192, "r=16 keep=1/8")  # (B, L, setting) of the profiler table
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")  # MATH is never the fastest


def timed_calls(calls: list[Callable[[], object]], repeats: int, device: torch.device) -> float:
    """Median seconds per call: on CUDA, replays of one graph of all ``calls``; on the CPU, plain loops."""
    if device.type != "cuda":
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            for call in calls:
                call()
            seconds.append((time.perf_counter() - start) / len(calls))
        return statistics.median(seconds)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: compilation, workspaces, library handles
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    seconds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(seconds)


def baselines(query: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, list[Callable]]:
    """Full decode attention per available backend: name -> one call per cache copy."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q4 = query[:, :, None]  # (B, H, 1, d)
    out: dict[str, list[Callable]] = {}
    backends = [("sdpa " + name.lower(), getattr(SDPBackend, name)) for name in SDPA_BACKENDS]
    if query.device.type != "cuda":
        backends = [("sdpa math", SDPBackend.MATH)]
    for name, backend in backends:
        def call(k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
        try:
            call(*caches[0])
        except RuntimeError:
            continue  # this backend does not take these shapes here
        out[name] = [lambda k=k, v=v, call=call: call(k, v) for k, v in caches]
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return out
    q_bshd = query[:, None]  # (B, 1, H, d)
    layouts = [(k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()) for k, v in caches]
    out["flash_attn_with_kvcache"] = [lambda k=k, v=v: flash_attn_with_kvcache(q_bshd, k, v) for k, v in layouts]
    return out


def setting_name(rank: int, keep: float) -> str:
    return f"r={rank} keep=1/{round(1 / keep)}"


def settings_tensor(setting: str, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank (B, H_kv) long, keep (B, H_kv) float64) on the device for a setting name of ``SETTINGS`` or "mixed"."""
    if setting == "mixed":
        pairs = [MIXED[i % len(MIXED)] for i in range(batch * KV_HEADS)]
    else:
        pairs = [next(p for p in SETTINGS if setting_name(*p) == setting)] * (batch * KV_HEADS)
    rank = torch.tensor([p[0] for p in pairs], device=device).reshape(batch, KV_HEADS)
    keep = torch.tensor([p[1] for p in pairs], dtype=torch.float64, device=device).reshape(batch, KV_HEADS)
    return rank, keep


def measure(batch: int, length: int, setting_names: list[str], args, device: torch.device, dtype) -> list[dict]:
    full_bytes = batch * KV_HEADS * 2 * length * HEAD_DIM * torch.finfo(dtype).bits // 8
    copies = max(1, min(args.max_copies, math.ceil(FLUSH_BYTES / (2 * full_bytes)))) if device.type == "cuda" else 1
    g = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(batch, HEADS, HEAD_DIM, generator=g, device=device, dtype=dtype)
    caches = [(torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=g, device=device, dtype=dtype),
               torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=g, device=device, dtype=dtype))
              for _ in range(copies)]
    rotated = [dim_blocked_layout(k) for k, _ in caches]  # random data: any K serves as its own K~
    lengths = torch.full((batch,), length, device=device, dtype=torch.int32)
    rows = []
    base = {"batch": batch, "length": length, "copies": copies}
    fastest, baseline = math.inf, None
    for name, calls in baselines(query, caches).items():
        seconds = timed_calls(calls, args.repeats, device)
        rows.append({**base, "method": name, "us": seconds * 1e6, "model_bytes": full_bytes,
                     "gb_per_s": full_bytes / seconds / 1e9})
        fastest, baseline = min((fastest, baseline), (seconds, name))
    for setting in setting_names:
        rank, keep = settings_tensor(setting, batch, device)
        calls = [lambda k=k, v=v, r=rank, s=keep: selection_decode(query, k, v, lengths, r, s, backend=args.backend)
                 for k, (_, v) in zip(rotated, caches)]
        seconds = timed_calls(calls, args.repeats, device)
        traffic = decode_traffic(rank.cpu(), keep.cpu(), keys=length, head_dim=HEAD_DIM)  # (B, H_kv)
        model_bytes = float(traffic.mean()) * full_bytes
        workspace = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            calls[0]()
            torch.cuda.synchronize()
            workspace = torch.cuda.max_memory_allocated() - before
        rows.append({**base, "method": f"selection {setting}", "us": seconds * 1e6, "model_bytes": model_bytes,
                     "traffic": float(traffic.mean()), "gb_per_s": model_bytes / seconds / 1e9,
                     "speedup": fastest / seconds if baseline else None, "baseline": baseline,
                     "workspace_bytes": workspace})
    for row in rows:
        print(f"B={batch} L={length} {row['method']}: {row['us']:.1f} us, {row['gb_per_s']:.0f} GB/s"
              + (f", x{row['speedup']:.2f}" if row.get("speedup") else ""), flush=True)
    if (batch, length) == args.profiled[:2]:
        rank, keep = settings_tensor(args.profiled[2], batch, device)
        k, v = rotated[0], caches[0][1]
        args.profile = profile(lambda: selection_decode(query, k, v, lengths, rank, keep, backend=args.backend), device)
    return rows


def profile(call: Callable[[], object], device: torch.device) -> str:
    """torch.profiler table of 20 eager calls: where the GPU time goes, kernel by kernel."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    call()
    with torch_profile(activities=activities) as prof:
        for _ in range(20):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=15)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| B | L | method | us / call | speedup | model MB | GB/s | workspace MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        workspace = f"{r['workspace_bytes'] / 2**20:.1f}" if r.get("workspace_bytes") is not None else ""
        lines.append(f"| {r['batch']} | {r['length']} | {r['method']} | {r['us']:.1f} | {speedup} | "
                     f"{r['model_bytes'] / 1e6:.1f} | {r['gb_per_s']:.0f} | {workspace} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=20, help="graph replays timed per measurement")
    parser.add_argument("--max-copies", type=int, default=64, help="most cache copies per graph (L2 flushing)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, to check the script")
    parser.add_argument("--quick", action="store_true", help=f"only L = 8192, B in (16, 64) and {PROFILED[2]}, "
                        "for iterating on the kernel")
    args = parser.parse_args()
    args.profile, args.profiled = None, PROFILED
    names = [setting_name(*p) for p in SETTINGS] + ["mixed"]
    if args.quick:
        args.lengths, args.batches, names = [PROFILED[1]], [PROFILED[0], 64], [PROFILED[2]]
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.lengths, args.batches, args.repeats = [64], [1, 2], 2
        args.backend = "auto"  # the reference on CPU tensors (or the interpreter under TRITON_INTERPRET=1)
        args.profiled = (2, 64, names[0])
    elif not torch.cuda.is_available():
        parser.error("needs CUDA (or --smoke for a CPU check of the script)")
    else:
        device, dtype, args.backend = torch.device("cuda"), torch.bfloat16, "triton"
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda if device.type == "cuda" else None}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    meta = {"command": " ".join(sys.argv), "machine": describe_machine(device),
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "versions": versions, "dtype": str(dtype),
            "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "layout": "dim-blocked"},
            "settings": names, "mixed": MIXED, "rows": []}
    header = (f"Measured by `{meta['command']}` on {meta['machine']}, {meta['date']}, {dtype}, torch "
              f"{versions['torch']}, triton {versions['triton']}. One attention call per layer: B rows, 9 query heads "
              f"over 3 KV heads, d = 64, every row at length L; CUDA-graph replays, cache copies beyond L2.")
    args.out.mkdir(parents=True, exist_ok=True)
    for length in args.lengths:
        for batch in args.batches:
            meta["rows"] += measure(batch, length, names, args, device, dtype)
            atomic_write_text(args.out / "results.json", json.dumps(meta, indent=1))
            atomic_write_text(args.out / "results.md", markdown(meta["rows"], header))
    if args.profile is not None:
        batch, length, setting = args.profiled
        atomic_write_text(args.out / "profile.txt", f"{header}\n\nB={batch} L={length} selection {setting}, 20 eager "
                                                    f"calls:\n\n{args.profile}\n")
    print(markdown(meta["rows"], header))


if __name__ == "__main__":
    main()

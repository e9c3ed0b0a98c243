"""End-to-end decode speed of the selection press against the plain model, every speed paired with its perplexity.

    python benchmarks/decode_speed.py --out docs/results/decode_h200      # the H200 run (~5 min)
    python benchmarks/decode_speed.py --smoke --out /tmp/decode           # tiny, on the CPU, in seconds

For each context length L (``--lengths``) and batch B (``--batches``): B sequences of L tokens of real text (the
train blocks of ``--prompt-corpus``) fill the cache (prefill in chunks of ``--prefill-chunk``, LM head on the last
token only), then a greedy generation loop decodes: each step is one forward of one token per row plus the argmax
fed back as the next input. ``--warmup`` steps, then ``--steps`` timed steps; tokens/s = B * steps / seconds. The
cache is put back to L before each method, so every method decodes the same positions.

Methods:

* ``plain``: the unmodified model (its SDPA attention) with transformers' ``StaticCache`` sized L + the steps, at
  its fastest HF setting: the decode step (forward + argmax) captured as a CUDA graph (``how = cuda graph``), and the
  forward under ``torch.compile(mode="reduce-overhead")`` (``how = torch.compile``; compilation counts against
  ``--compile-budget`` seconds, after which the remaining shapes skip it). The faster of the two is the reference.
* ``press r=R keep=K``: ``drrl_gym.press.selection_press`` with the rotated cache at a uniform (rank, keep) in every
  layer and KV head (``--settings``), the decode step captured as a CUDA graph the same way. Prefill is exact; each
  decoded token runs ``selection_decode`` (the GPU kernel where it applies).

Memory: the cache's bytes, and the peak GPU memory allocated while decoding (after the prefill: weights, cache,
graph pools) and during the prefill. Quality: held-out perplexity of the same settings, measured as
``benchmarks/selection_front.py`` does (basis fit on ``shakespeare-plays``, ``--eval-tokens`` tokens of
``britannica-1911`` at each L, segments of ``--segment-len``), except that the first segment runs at full attention
and selection applies to every token after it, as in the press (prefill exact, decode selected); token by token
that is what the press decodes (``envs_tests/test_press.py``). On the CPU (``--smoke``) nothing is captured:
eager steps, the tiny random Llama and the reference backend, to check the script end to end.
Writes ``results.json`` (command, machine, date, versions, every number) and ``results.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers
from transformers import StaticCache

from drrl_gym.backbone import DEFAULT_MODEL, Backbone, load_backbone, resolve_device
from drrl_gym.calibration import corpus_basis
from drrl_gym.corpus import CorpusConfig, load_corpus
from drrl_gym.cuda_graphs import capture_cuda_graph
from drrl_gym.files import atomic_write_text
from drrl_gym.hf_compat import cache_argument
from drrl_gym.lowrank import DynamicRankAttention
from drrl_gym.perplexity import describe_machine, segmented_perplexity
from drrl_gym.press import selection_press
from drrl_gym.rotated_cache import RotatedCache

GIB = 2**30


@dataclass
class Row:
    length: int
    batch: int
    method: str
    how: str  # "cuda graph", "torch.compile", "eager" (CPU), or "" when it failed
    tokens_per_s: float | None = None
    step_ms: float | None = None
    cache_gib: float | None = None
    peak_decode_gib: float | None = None
    peak_prefill_gib: float | None = None
    perplexity: float | None = None
    perplexity_increase_pct: float | None = None
    speedup: float | None = None  # tokens/s over the fastest plain row of the same (L, B)
    # what the speedup is against: "fastest" (every plain setting measured) or "cuda graph only" (torch.compile
    # skipped or failed at this (L, B): the plain model may be faster than its row says)
    baseline: str = ""
    note: str = ""


def parse_settings(text: str) -> list[tuple[int, float]]:
    """'16:0.125,32:0.25' -> [(16, 0.125), (32, 0.25)]."""
    settings = []
    for part in text.split(","):
        rank, keep = part.split(":")
        settings.append((int(rank), float(keep)))
    return settings


def setting_name(rank: int, keep: float) -> str:
    return f"press r={rank} keep=1/{round(1 / keep)}" if 1 / keep == round(1 / keep) else f"press r={rank} keep={keep}"


# --------------------------------------------------------------------------------------------------- memory
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- decode
def prefill(model: torch.nn.Module, cache, prompt: torch.Tensor, chunk: int) -> torch.Tensor:
    """Fill ``cache`` with ``prompt`` (B, L) chunk by chunk; the greedy next token (B, 1)."""
    for start in range(0, prompt.shape[1], chunk):
        logits = model(prompt[:, start : start + chunk], **cache_argument(cache), use_cache=True, logits_to_keep=1).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def decode_loop(forward: Callable, cache, first: torch.Tensor, length: int, warmup: int, steps: int, graph: bool,
                device: torch.device) -> tuple[float, float]:
    """Greedy decode from position ``length``: (tokens/s, ms per step) over ``steps`` steps after ``warmup``."""
    token = first.clone()

    def step() -> torch.Tensor:
        logits = forward(token, **cache_argument(cache), use_cache=True).logits
        token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        return token

    def rewind() -> None:
        for layer in cache.layers:
            layer.cumulative_length.fill_(length)
        token.copy_(first)

    run = step
    if graph:
        captured, _ = capture_cuda_graph(step, rewind=rewind)
        run = captured.replay
    for _ in range(warmup):
        run()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    synchronize(device)
    seconds = time.perf_counter() - start
    rewind()
    return first.shape[0] * steps / seconds, 1e3 * seconds / steps


def measure(row: Row, device: torch.device, run: Callable[[], tuple[float, float]]) -> Row:
    """Fill ``row`` from ``run()`` with the decode peak memory; a failure is recorded, not raised."""
    reset_peak(device)
    try:
        row.tokens_per_s, row.step_ms = run()
        row.peak_decode_gib = peak_gib(device)
    except Exception as error:  # noqa: BLE001 - a method that cannot run is a result to report, not a crash
        row.how, row.note = "", f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    print(f"L={row.length} B={row.batch} {row.method} [{row.how or 'failed'}]: "
          f"{row.tokens_per_s or 0:.0f} tok/s {row.note}", flush=True)
    return row


def plain_rows(backbone: Backbone, prompt: torch.Tensor, capacity: int, args, compile_spent: list[float]) -> list[Row]:
    """The unmodified model with a StaticCache: its decode step as a CUDA graph, then under torch.compile."""
    model, device = backbone.model, backbone.device
    batch, length = prompt.shape
    graph = device.type == "cuda"
    reset_peak(device)
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    first = prefill(model, cache, prompt, args.prefill_chunk)
    memory = dict(cache_gib=sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) / GIB,
                  peak_prefill_gib=peak_gib(device))
    rows = [measure(Row(length, batch, "plain", "cuda graph" if graph else "eager", **memory), device,
                    lambda: decode_loop(model, cache, first, length, args.warmup, args.steps, graph, device))]
    if not graph or args.compile_budget <= 0:
        return rows
    row = Row(length, batch, "plain", "torch.compile", **memory)
    if compile_spent[0] >= args.compile_budget:
        row.how, row.note = "", f"skipped: the {args.compile_budget:g} s compile budget is spent"
        return [*rows, row]
    compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    started = time.perf_counter()

    def compiled_loop() -> tuple[float, float]:
        for _ in range(3):  # compile, then the cudagraph trees' warm-up and recording
            compiled(first, **cache_argument(cache), use_cache=True)
        synchronize(device)
        for layer in cache.layers:
            layer.cumulative_length.fill_(length)
        return decode_loop(compiled, cache, first, length, args.warmup, args.steps, False, device)

    row = measure(row, device, compiled_loop)
    compile_spent[0] += time.perf_counter() - started
    row.note = (row.note + f" compile, warm-up and steps {time.perf_counter() - started:.0f} s").strip()
    return [*rows, row]


def press_rows(backbone: Backbone, basis: torch.Tensor, prompt: torch.Tensor, capacity: int, args) -> list[Row]:
    """The press at each setting over one rotated cache (prefill is exact whatever the setting: one for all)."""
    model, device = backbone.model, backbone.device
    batch, length = prompt.shape
    graph = device.type == "cuda"
    reset_peak(device)
    cache = RotatedCache(basis, batch, capacity, backbone.dtype, device)
    with selection_press(model, basis, backbone.geometry.head_dim, 1.0, backend=args.backend):
        first = prefill(model, cache, prompt, args.prefill_chunk)
    memory = dict(cache_gib=cache.nbytes / GIB, peak_prefill_gib=peak_gib(device))
    rows = []
    for rank, keep in args.settings:
        with selection_press(model, basis, rank, keep, backend=args.backend):
            rows.append(measure(Row(length, batch, setting_name(rank, keep), "cuda graph" if graph else "eager",
                                    **memory), device,
                                lambda: decode_loop(model, cache, first, length, args.warmup, args.steps, graph, device)))
        release(device)  # the graph's memory pool goes with it
    return rows


def speed_rows(backbone: Backbone, basis: torch.Tensor, prompt: torch.Tensor, args, compile_spent: list[float]
               ) -> list[Row]:
    """Every method at one (L, B): the plain model first, its cache freed before the press allocates its own."""
    capacity = prompt.shape[1] + args.warmup + args.steps + 1
    rows = plain_rows(backbone, prompt, capacity, args, compile_spent)
    release(backbone.device)
    rows += press_rows(backbone, basis, prompt, capacity, args)
    release(backbone.device)
    return rows


# --------------------------------------------------------------------------------------------------- quality
def full_first_segment(attention: DynamicRankAttention, rank: int, keep: float, start: int) -> None:
    """Full attention in the segment at position 0 (the prompt), (rank, keep) selection in every later one."""
    full = start == 0
    attention.set_ranks(attention.geometry.head_dim if full else rank)
    attention.set_keep(1.0 if full else keep)


@torch.no_grad()
def perplexities(backbone: Backbone, basis: torch.Tensor, length: int, args) -> dict[str, float]:
    """Held-out perplexity of the plain model and of each setting, first segment at full attention."""
    g = backbone.geometry
    held_out = load_corpus(backbone.tokenizer, CorpusConfig(args.eval_corpus, seq_len=length, calibration_sequences=1,
                                                            eval_sequences=args.eval_tokens // length)).eval
    results = {"plain": segmented_perplexity(backbone, held_out, args.segment_len, args.eval_batch, progress=False)}
    for rank, keep in args.settings:
        attention = DynamicRankAttention(g, basis, approximation="select")
        before_segment = functools.partial(full_first_segment, attention, rank, keep)
        with attention.attached(backbone.model):
            results[setting_name(rank, keep)] = segmented_perplexity(backbone, held_out, args.segment_len,
                                                                     args.eval_batch, progress=False,
                                                                     before_segment=before_segment)
        print(f"L={length} perplexity {setting_name(rank, keep)}: {results[setting_name(rank, keep)]:.3f} "
              f"(plain {results['plain']:.3f})", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------- output
def fill_comparisons(rows: list[Row], quality: dict[int, dict[str, float]]) -> None:
    for row in rows:
        ppl = quality.get(row.length, {})
        row.perplexity = ppl.get(row.method)
        if row.perplexity is not None and "plain" in ppl:
            row.perplexity_increase_pct = 100 * (row.perplexity / ppl["plain"] - 1)
        plain = [r for r in rows if r.method == "plain" and (r.length, r.batch) == (row.length, row.batch)]
        speeds = [r.tokens_per_s for r in plain if r.tokens_per_s]
        if row.tokens_per_s and speeds:
            row.speedup = row.tokens_per_s / max(speeds)
            row.baseline = "fastest" if len(speeds) == len(plain) else "cuda graph only"


def markdown(rows: list[Row], header: str) -> str:
    def number(value: float | None, form: str) -> str:
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, form)

    lines = [header, "", "Speed is against the fastest plain row of the same (L, B); where torch.compile of the plain model was "
             "not measured there, the baseline column says `cuda graph only` and the plain model may be faster.", "",
             "| L | B | method | how | decode tok/s | ms/step | vs plain | baseline | peak GiB (decode) | "
             "peak GiB (prefill) | cache GiB | perplexity | increase | note |", "|" + "---|" * 14]
    for r in rows:
        increase = "" if r.perplexity_increase_pct is None else f"{r.perplexity_increase_pct:+.2f}%"
        lines.append(f"| {r.length} | {r.batch} | {r.method} | {r.how} | {number(r.tokens_per_s, '.0f')} | "
                     f"{number(r.step_ms, '.3f')} | {number(r.speedup, '.2f')} | {r.baseline} | {number(r.peak_decode_gib, '.2f')} | "
                     f"{number(r.peak_prefill_gib, '.2f')} | {number(r.cache_gib, '.3f')} | "
                     f"{number(r.perplexity, '.3f')} | {increase} | {r.note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--settings", type=parse_settings, default=parse_settings("16:0.125,16:0.25,32:0.25"),
                        help="uniform press settings rank:keep, comma-separated")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--compile-budget", type=float, default=150.0,
                        help="seconds of torch.compile for the plain model over the whole run (0: never compile)")
    parser.add_argument("--prompt-corpus", default="shakespeare-plays")
    parser.add_argument("--eval-corpus", default="britannica-1911")
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--segment-len", type=int, default=128)
    parser.add_argument("--backend", default="auto", help="selection_decode backend of the press")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny run on the CPU: tiny-random-llama, L 64 128, B 1 2, 3 steps, ranks 4 and 8")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.smoke:
        args.model, args.device, args.lengths, args.batches = "tiny-random-llama", "cpu", [64, 128], [1, 2]
        args.settings, args.warmup, args.steps = parse_settings("4:0.125,4:0.25,8:0.25"), 1, 3
        args.eval_tokens, args.segment_len, args.prefill_chunk, args.compile_budget = 512, 32, 48, 0.0
    if any(args.eval_tokens % length or length % args.segment_len for length in args.lengths):
        parser.error("every --lengths value must divide --eval-tokens and be a multiple of --segment-len")

    started = time.perf_counter()
    device = resolve_device(args.device)
    backbone = load_backbone(args.model, device)
    basis = corpus_basis(backbone).to(device)
    meta = {
        "command": " ".join(sys.argv),
        "machine": describe_machine(device),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "triton": getattr(sys.modules.get("triton"), "__version__", None)},
        "model": args.model,
        "dtype": str(backbone.dtype),
        "protocol": {"lengths": args.lengths, "batches": args.batches, "settings": args.settings,
                     "warmup": args.warmup, "steps": args.steps, "prefill_chunk": args.prefill_chunk,
                     "prompt_corpus": args.prompt_corpus, "eval_corpus": args.eval_corpus,
                     "eval_tokens": args.eval_tokens, "segment_len": args.segment_len,
                     "perplexity": "first segment full attention, selection on every later token",
                     "backend": args.backend, "compile_budget_s": args.compile_budget},
        "rows": [],
    }
    header = (f"Measured by `{meta['command']}` on {meta['machine']}, {meta['date']}, {meta['dtype']}, torch "
              f"{torch.__version__}, transformers {transformers.__version__}. Decode tokens/s of a greedy loop with the "
              f"cache at L (then L + {args.warmup + args.steps}); perplexity on {args.eval_corpus} "
              f"({args.eval_tokens} tokens at every L).")
    rows: list[Row] = []
    quality: dict[int, dict[str, float]] = {}
    compile_spent = [0.0]
    with torch.no_grad():
        for length in args.lengths:
            quality[length] = perplexities(backbone, basis, length, args)
            blocks = load_corpus(backbone.tokenizer, CorpusConfig(args.prompt_corpus, seq_len=length,
                                                                  calibration_sequences=1, eval_sequences=1)).train
            for batch in args.batches:
                if batch > len(blocks):
                    parser.error(f"{args.prompt_corpus} has {len(blocks)} train blocks of {length} tokens, fewer than "
                                 f"batch {batch}")
                rows += speed_rows(backbone, basis, blocks[:batch].to(device), args, compile_spent)
                fill_comparisons(rows, quality)
                # Written after every (L, B), so a run stopped part-way keeps what it measured.
                meta["rows"], meta["seconds"] = [asdict(r) for r in rows], time.perf_counter() - started
                atomic_write_text(args.out / "results.json", json.dumps(meta, indent=1))
                atomic_write_text(args.out / "results.md", markdown(rows, header))
    print(markdown(rows, header))
    print(f"{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()

"""Env throughput against the frozen model's own fastest forward pass, both attention modes, in one run.

    python benchmarks/env_throughput.py --profile --out docs/results/env_throughput_h200        # the GPU run (~5 min)
    python benchmarks/env_throughput.py --smoke --out /tmp/throughput                             # a CPU smoke run

Per attention mode (``--attention``; SmolLM2-135M, 64 sequences of 1024 tokens in segments of 128 by default):

1. the fastest plain forward of the same tokens: the unmodified model without LM head (the env does not run it)
   per segment with its KV cache, as a replayed CUDA graph (DynamicCache) and as ``torch.compile`` over a
   StaticCache (also replayed as a graph when it can be); the faster of the two is the baseline, named in the JSON.
   The eager ``model(...)`` and ``model.base_model`` are measured beside it, and so is the compiled forward with
   the grouped-query attention the env uses (``drrl_gym.grouped_attention``; ``ratio_step_to_grouped_attention_forward``).
2. the batched env (``DRRLAttentionVecEnv``, one forward per step for all N episodes; on CUDA its step replayed as
   CUDA graphs, and in low-rank mode with ``--env-compile`` compiled): the step; the time of the first episode's
   steps (compilation and graph capture); the reset cold
   (warm-up segment + full-rank reference forward; the median after the process's first reset, which also does
   one-time work such as compilation and is recorded on its own) and warm (every sequence in the reference cache,
   which the run fills first with every train sequence: the steady state of training with a budget that holds the
   corpus; with ``--prefill`` below the corpus most timed resets miss it, and ``env_reset_warm_cache_hit_fraction``
   says how many rows it held); the step with the warm reset amortised over the episode's steps; end to end through
   the gymnasium API (same-step autoreset included) and, for the first mode, the SB3 ``VecEnv`` adapter and a
   ``DummyVecEnv`` of single envs.
3. ``--n-envs-curve``: env steps/s through the gymnasium API, the step's time, the graphed plain forward and the
   peak GPU memory for each number of envs.

Ratios are env time / fastest forward time of the same tokens. ``--profile`` writes torch.profiler tables of one
episode per mode (steps by GPU time and CPU time, one warm reset) and of the compiled plain forward's kernels, to
set side by side. Writes ``env_throughput.json`` (command, machine, versions, date, every number; top level: the
first mode's headline numbers) and ``env_throughput.md``; while it runs, ``env_throughput.partial.json`` holds the
modes measured so far.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import DynamicCache, StaticCache

from drrl_gym.backbone import DEFAULT_MODEL
from drrl_gym.cli import number_in
from drrl_gym.config import DTYPES
from drrl_gym.cuda_graphs import capture_cuda_graph
from drrl_gym.env import DRRLAttentionEnv
from drrl_gym.files import atomic_write_text
from drrl_gym.grouped_attention import GROUPED_SDPA
from drrl_gym.hf_compat import cache_argument
from drrl_gym.kv_cache import kv_tensors, point_cache
from drrl_gym.perplexity import describe_machine
from drrl_gym.reference_cache import GIB
from drrl_gym.resources import shared_backbone
from drrl_gym.vector import DRRLAttentionVecEnv

NAME_WIDTH = 110  # profiler tables: enough of a fused kernel's name to tell which ops it fused
SMOKE = dict(model="tiny-random-llama", seq_len=128, segment_len=32, num_envs=4, n_envs_curve=(2, 4), episodes=1,
             dummy_envs=2, reference_cache_gib=1.0, compile=False, prefill=8)
SMOKE_ENV = dict(rank_choices=(4, 8, 12, 16), calibration_sequences=2, eval_sequences=2)  # the tiny model's


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds), the GPU's queued work included."""
    synchronize()
    start = time.perf_counter()
    result = call()
    synchronize()
    return result, time.perf_counter() - start


def random_actions(rng: np.random.Generator, masks: np.ndarray, n_units: int) -> np.ndarray:
    """A uniformly random *allowed* choice per unit (as a masked policy acts), for (N, n_units * n_choices) masks."""
    allowed = masks.reshape(len(masks), n_units, -1)
    scores = rng.random(allowed.shape) * allowed  # disallowed choices score 0, allowed ones > 0 almost surely
    return scores.argmax(-1)


# ------------------------------------------------------------------------------------------------ plain model
def plain_forward(model: torch.nn.Module, tokens: torch.Tensor, segment_len: int, lm_head: bool) -> list[float]:
    """Seconds per segment of one episode of the unmodified model, eagerly: segments 0 .. n-1 with a KV cache."""
    cache, seconds = DynamicCache(config=model.config), []
    run = model if lm_head else model.base_model
    with torch.inference_mode():
        for start in range(0, tokens.shape[1], segment_len):
            segment = tokens[:, start : start + segment_len]
            seconds.append(timed(lambda: run(segment, **cache_argument(cache), use_cache=True))[1])
    return seconds


def replay_seconds(graph: torch.cuda.CUDAGraph, replays: int = 10) -> float:
    graph.replay()
    return float(np.median([timed(graph.replay)[1] for _ in range(replays)]))


def graphed_forward(model: torch.nn.Module, tokens: torch.Tensor, segment_len: int) -> float | None:
    """Seconds per segment (mean over segments 1 .. n-1) of ``model.base_model`` over a DynamicCache replayed as a
    CUDA graph: its GPU time without launch overhead."""
    if not torch.cuda.is_available():
        return None
    seconds = []
    with torch.inference_mode():
        for t in range(1, tokens.shape[1] // segment_len):
            cache = DynamicCache(config=model.config)
            model.base_model(tokens[:, : t * segment_len], **cache_argument(cache), use_cache=True)
            inputs, segment = kv_tensors(cache), tokens[:, t * segment_len : (t + 1) * segment_len]

            def run() -> None:
                point_cache(cache, inputs)  # (the segment's forward grows the cache; each run starts from the prefix)
                model.base_model(segment, **cache_argument(cache), use_cache=True)

            seconds.append(replay_seconds(capture_cuda_graph(run)[0]))
    return float(np.mean(seconds))


def compiled_forward(model: torch.nn.Module, tokens: torch.Tensor, segment_len: int,
                     profile_path: Path | None = None, attention: str | None = None) -> dict[str, Any]:
    """Seconds per segment (mean over 1 .. n-1) of ``torch.compile(model.base_model)`` over a StaticCache (static
    shapes: one compilation serves every segment), replayed as a CUDA graph when capture works, else called.
    ``profile_path``: also write the GPU kernels of one replay of every segment's graph (beside the env's profile).
    ``attention``: run the model with this attention implementation (e.g. ``GROUPED_SDPA``), restored after.

    A StaticCache layer writes at its device-side ``cumulative_length``, which every forward advances: each run
    rewinds it to the segment's start, so runs (and replays) repeat the same writes and stay within the cache."""
    start, previous = time.perf_counter(), model.config._attn_implementation
    try:
        if attention is not None:
            model.set_attn_implementation(attention)
        compiled = torch.compile(model.base_model, dynamic=False)
        cache = StaticCache(config=model.config, max_cache_len=tokens.shape[1])
        seconds, graphed, graphs = [], torch.cuda.is_available(), []
        with torch.inference_mode():
            for t in range(tokens.shape[1] // segment_len):
                segment = tokens[:, t * segment_len : (t + 1) * segment_len]

                def run() -> None:  # writes the same keys at the same places: repeatable
                    for layer in cache.layers:
                        if layer.is_initialized:
                            layer.cumulative_length.fill_(t * segment_len)
                    compiled(segment, **cache_argument(cache), use_cache=True)

                if t == 0:  # eagerly: the cache's lazy initialisation would cost the compiled code a recompilation
                    model.base_model(segment, **cache_argument(cache), use_cache=True)
                    continue
                run()
                if graphed:
                    try:
                        graphs.append(capture_cuda_graph(run)[0])
                        seconds.append(replay_seconds(graphs[-1]))
                        continue
                    except RuntimeError:
                        graphed = False
                run()
                seconds.append(float(np.median([timed(run)[1] for _ in range(5)])))
        if profile_path is not None and graphed:
            profile_replays(graphs, profile_path)
        return dict(seconds=float(np.mean(seconds)), cuda_graph=graphed, error=None,
                    wall_s=time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 - any failure of the compiler is a result to report, not a crash
        return dict(seconds=None, cuda_graph=False, error=f"{type(error).__name__}: {error}"[:400],
                    wall_s=time.perf_counter() - start)
    finally:
        model.set_attn_implementation(previous)


def profile_replays(graphs: list[torch.cuda.CUDAGraph], path: Path) -> None:
    """torch.profiler table of one replay of each graph in order, by GPU kernel time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as replays:
        for graph in graphs:
            graph.replay()
        synchronize()
    atomic_write_text(path, f"# one replay of each of the {len(graphs)} segments' graphs, by self_cuda_time_total\n"
                      + replays.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=NAME_WIDTH))


def fastest_forward(model: torch.nn.Module, tokens: torch.Tensor, segment_len: int, compile_: bool,
                    profile_path: Path | None = None) -> dict[str, Any]:
    """The plain model's fastest forward without LM head per segment: min(CUDA graph, torch.compile), and which,
    with transformers' attention. Beside it, torch.compile with the grouped-query attention the env's forward uses
    (``drrl_gym.grouped_attention``), which the plain model can use too: the env's ratio to it says how much of the
    env's speed comes from that attention rather than from the env's own work."""
    graph = graphed_forward(model, tokens, segment_len)
    compiled = (compiled_forward(model, tokens, segment_len, profile_path) if compile_
                else dict(seconds=None, error="not run"))
    grouped = (compiled_forward(model, tokens, segment_len, attention=GROUPED_SDPA) if compile_
               else dict(seconds=None, error="not run"))
    candidates = {"cuda_graph": graph, "torch_compile": compiled["seconds"]}
    if all(v is None for v in candidates.values()):  # no CUDA, no compiler: the eager forward is the fastest
        candidates["eager"] = float(np.median(plain_forward(model, tokens, segment_len, False)[1:]))
    name = min((k for k, v in candidates.items() if v is not None), key=candidates.get)
    return dict(fastest=name, fastest_ms=candidates[name] * 1e3, cuda_graph_ms=None if graph is None else graph * 1e3,
                torch_compile_ms=None if compiled["seconds"] is None else compiled["seconds"] * 1e3,
                torch_compile=compiled, torch_compile_grouped_attention=grouped,
                torch_compile_grouped_attention_ms=None if grouped["seconds"] is None else grouped["seconds"] * 1e3)


# -------------------------------------------------------------------------------------------------- the env
def prefill(venv: DRRLAttentionVecEnv, limit: int | None) -> list[float]:
    """Reset over every train sequence (up to ``limit``), N at a time, filling the reference cache: returns each
    reset's seconds (cold: each computes its rows' warm-up and reference)."""
    size = len(venv.corpus.train) if limit is None else min(limit, len(venv.corpus.train))
    n = venv.num_envs
    order = np.resize(np.arange(size), -(-size // n) * n)  # whole batches, repeating from the start (also past size)
    return [timed(lambda: venv.batch.reset(order[i : i + n]))[1] for i in range(0, len(order), n)]


def core_episode(venv: DRRLAttentionVecEnv, rng: np.random.Generator) -> tuple[float, list[float]]:
    """Seconds of one reset and of each step of the batched core (``venv.batch``), random allowed actions."""
    batch = venv.batch
    indices = rng.integers(len(venv.corpus.train), size=venv.num_envs)
    _, reset = timed(lambda: batch.reset(indices))
    steps = []
    for _ in range(venv.config.n_segments - 1):
        actions = random_actions(rng, venv.action_masks(), venv.n_units)
        steps.append(timed(lambda: batch.step(actions))[1])
    return reset, steps


def gymnasium_api(venv: DRRLAttentionVecEnv, episodes: int, seed: int) -> float:
    """Seconds per step through the public API: flattening, info arrays and the same-step autoreset included."""
    rng, total = np.random.default_rng(seed), episodes * (venv.config.n_segments - 1)
    venv.reset(seed=seed)
    synchronize()
    start = time.perf_counter()
    for _ in range(total):
        venv.step(random_actions(rng, venv.action_masks(), venv.n_units))
    synchronize()
    return (time.perf_counter() - start) / total


def sb3_adapter(venv: DRRLAttentionVecEnv, episodes: int, seed: int) -> float:
    """Seconds per step through the SB3 VecEnv adapter (per-env info dicts, autoreset included), after one
    untimed episode."""
    from drrl_gym.training.sb3_vec_env import DRRLAttentionSB3VecEnv

    env, rng, n_steps = DRRLAttentionSB3VecEnv(venv), np.random.default_rng(seed), venv.config.n_segments - 1
    env.seed(seed)
    env.reset()
    for _ in range(n_steps):
        env.step(random_actions(rng, np.stack(env.env_method("action_masks")), venv.n_units))
    synchronize()
    start = time.perf_counter()
    for _ in range(episodes * n_steps):
        env.step(random_actions(rng, np.stack(env.env_method("action_masks")), venv.n_units))
    synchronize()
    return (time.perf_counter() - start) / (episodes * n_steps)


def dummy_vec_env(kwargs: dict[str, Any], num_envs: int, seed: int) -> dict[str, float]:
    """SB3 DummyVecEnv over ``num_envs`` single envs (one shared model): one episode (reset and steps, the last
    one's autoreset apart), timed after an untimed episode that captures each env's CUDA graphs."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    env = DummyVecEnv([lambda: DRRLAttentionEnv(**kwargs) for _ in range(num_envs)])
    rng, n_units = np.random.default_rng(seed), env.get_attr("n_units", 0)[0]
    n_steps = kwargs["seq_len"] // kwargs["segment_len"] - 1
    env.seed(seed)
    env.reset()
    for _ in range(n_steps):
        env.step(random_actions(rng, np.stack(env.env_method("action_masks")), n_units))
    _, reset = timed(env.reset)
    step_s = []
    for _ in range(n_steps - 1):
        actions = random_actions(rng, np.stack(env.env_method("action_masks")), n_units)
        step_s.append(timed(lambda: env.step(actions))[1])
    env.close()
    return dict(reset_s=reset, step_s=float(np.mean(step_s)), steps=n_steps)


def graphs_against_eager(graphed: DRRLAttentionVecEnv, eager: DRRLAttentionVecEnv, seed: int) -> dict[str, Any]:
    """One episode of both on the same sequences and actions: largest differences (the env as measured, with CUDA
    graphs and compilation where on, against the eager uncompiled forward), by observation feature too, and how many
    safety-mask entries differ (the actions are drawn from the choices both allow)."""
    rng, names = np.random.default_rng(seed), graphed.batch.feature_names
    worst = dict(observation=0.0, reward=0.0, fidelity=0.0, masks_equal=True, mask_flips=0, mask_entries=0)
    by_feature = np.zeros(len(names))
    graphed.reset(seed=seed)
    eager.reset(seed=seed)
    for _ in range(graphed.config.n_segments - 1):
        masks, eager_masks = graphed.action_masks(), eager.action_masks()
        flips = int((masks != eager_masks).sum())
        worst["masks_equal"] &= flips == 0
        worst["mask_flips"] += flips
        worst["mask_entries"] += masks.size
        # Actions allowed under both masks: a bound within rounding of epsilon may flip one choice's mask entry, and
        # the projection would then apply different ranks, so the rows would no longer run the same step.
        actions = random_actions(rng, masks & eager_masks, graphed.n_units)
        results = [env.step(actions) for env in (graphed, eager)]
        ends = [(np.stack(i["final_obs"]), r, i["final_info"]["fidelity"]) if d[0] else (o, r, i["fidelity"])
                for o, r, d, _, i in results]
        for key, a, b in zip(("reward", "fidelity"), ends[0][1:], ends[1][1:], strict=True):
            worst[key] = max(worst[key], float(np.abs(a - b).max()))
        difference = np.abs(ends[0][0] - ends[1][0]).reshape(graphed.num_envs, graphed.n_units, len(names))
        by_feature = np.maximum(by_feature, difference.max(axis=(0, 1)))
    worst["observation"] = float(by_feature.max())
    # which features differ most: a rounding difference spreads over many, a flaw shows in one
    worst["observation_by_feature"] = {names[i]: float(by_feature[i]) for i in np.argsort(by_feature)[::-1][:5]}
    return worst


def profile(venv: DRRLAttentionVecEnv, path: Path, seed: int) -> None:
    """torch.profiler tables: the n-1 steps of one episode by GPU kernel time and by CPU time, one warm reset."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rng, batch, cuda = np.random.default_rng(seed), venv.batch, torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    device_time = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    indices = rng.integers(len(venv.corpus.train), size=venv.num_envs)
    batch.reset(indices)
    with torch_profile(activities=activities) as steps:
        for _ in range(venv.config.n_segments - 1):
            batch.step(random_actions(rng, venv.action_masks(), venv.n_units))
        synchronize()
    with torch_profile(activities=activities) as reset:
        batch.reset(indices)
        synchronize()
    n, config = venv.config.n_segments - 1, venv.config
    text = [f"# {n} steps of EpisodeBatch ({config.attention}, num_envs={venv.num_envs}, no reset), by {device_time}",
            steps.key_averages().table(sort_by=device_time, row_limit=30, max_name_column_width=NAME_WIDTH),
            f"# the same {n} steps by CPU time (total, children included)",
            steps.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=NAME_WIDTH),
            "# one reset of sequences in the reference cache",
            reset.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=15,
                                        max_name_column_width=NAME_WIDTH)]
    atomic_write_text(path, "\n".join(text))


def free(*envs: DRRLAttentionVecEnv) -> None:
    for env in envs:
        env.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------------ measurements
def measure_mode(args: argparse.Namespace, kwargs: dict[str, Any], first: bool
                 ) -> tuple[dict[str, Any], torch.Tensor, Any]:
    """Every number of one attention mode at ``--num-envs`` but the ratios (:func:`add_ratios`); returns (result, the
    last episode's tokens, the mode's reference cache)."""
    n, attention = args.num_envs, kwargs["attention"]
    episodes = args.episodes if attention == "lowrank_scores" else args.select_episodes
    venv = DRRLAttentionVecEnv(num_envs=n, **kwargs)
    n_steps, model = venv.config.n_segments - 1, venv.backbone.model
    cold = prefill(venv, args.prefill)
    print(f"[{attention}] reference cache filled: {len(venv.batch.references)} sequences, "
          f"{venv.batch.references.allocated_bytes / GIB:.2f} GiB, first reset {cold[0] * 1e3:.1f} ms", flush=True)
    graphs = venv.batch._graphs is not None
    # The eager baseline runs neither graphs nor compiled code: the comparison below is then also the compiled
    # step's agreement with the uncompiled one, in the model's own dtype.
    eager = (DRRLAttentionVecEnv(num_envs=n, **dict(kwargs, cuda_graphs=False, compile=False))
             if (graphs or venv.batch._compiled) and args.eager else None)
    if eager is not None:
        eager.batch.references = venv.batch.references  # (the same sequences: one cache serves both)
    envs = [("env", venv)] + ([("eager", eager)] if eager else [])
    times: dict[str, list[float]] = {k: [] for k in ("env", "eager", "env_reset", "eager_reset", "model", "base_model")}
    rng, cache = np.random.default_rng(args.seed), venv.batch.references
    # A "warm" reset is only as warm as the cache is full: the rows of the timed resets that the cache held
    # (every row once the cache holds every train sequence; few after a small --prefill).
    reset_rows = reset_hits = 0
    # Warm up every path once (kernels, allocator, graph capture), then measure in interleaved rounds, so that drift
    # of the machine hits the baseline and the env alike; medians below.
    for round_ in range(episodes + 1):
        for name, env in envs:
            hits_before = cache.hits
            reset, steps = core_episode(env, rng)
            if round_:
                times[name] += steps
                times[f"{name}_reset"].append(reset)
                if name == "env":
                    reset_rows, reset_hits = reset_rows + n, reset_hits + cache.hits - hits_before
            elif name == "env":  # one-time work: the step's compilation and graph captures
                first_episode_steps = sum(steps)
        tokens = venv.corpus.train[torch.from_numpy(venv.batch.episode.sequence_index)].to(venv.backbone.device)
        for name, lm_head in (("model", True), ("base_model", False)):
            segments = plain_forward(model, tokens, args.segment_len, lm_head)
            if round_:
                times[name] += segments[1:]  # segments 1 .. n-1: the ones a step runs
    agreement = graphs_against_eager(venv, eager, args.seed + 5) if eager is not None else None
    if eager is not None:
        free(eager)
    gym_step = gymnasium_api(venv, episodes, args.seed + 6)
    sb3_step = sb3_adapter(venv, episodes, args.seed + 2) if first and args.sb3 else None
    if args.profile:
        profile(venv, args.out / f"env_throughput_{attention}.profile.txt", args.seed + 3)
    peak = peak_memory_gb()
    dummy = dummy_vec_env(dict(kwargs, reference_cache_gib=args.reference_cache_gib), args.dummy_envs,
                          args.seed + 4) if first and args.dummy_envs else None
    median = {key: float(np.median(value)) if value else None for key, value in times.items()}
    # The first reset of a process also does one-time work (torch.compile in selection mode, memory pools):
    # recorded on its own, and left out of the cold-reset median when there are others.
    step, warm, cold_reset = median["env"], median["env_reset"], float(np.median(cold[1:] or cold))
    result = dict(
        attention=attention, num_envs=n, dtype=str(venv.backbone.dtype), episodes=episodes, cuda_graphs=graphs,
        compiled=venv.batch._compiled, first_episode_steps_s=first_episode_steps, rank_choices=list(venv.rank_choices),
        keep_choices=list(venv.config.keep_choices) if attention == "select" else None,
        bound_queries=venv.config.bound_queries, bound_source=venv.config.bound_source,
        plain_forward_ms=median["model"] * 1e3, plain_forward_no_lm_head_ms=median["base_model"] * 1e3,
        env_step_ms=step * 1e3, env_step_p90_ms=float(np.percentile(times["env"], 90)) * 1e3,
        env_step_eager_ms=None if eager is None else median["eager"] * 1e3,
        graphs_vs_eager_max_abs_diff=agreement,
        env_reset_first_ms=cold[0] * 1e3, env_reset_cold_ms=cold_reset * 1e3, env_reset_warm_ms=warm * 1e3,
        env_reset_warm_cache_hit_fraction=reset_hits / reset_rows,
        steps_per_episode=n_steps,
        env_step_amortised_ms=(step + warm / n_steps) * 1e3,
        env_step_amortised_cold_ms=(step + cold_reset / n_steps) * 1e3,
        env_step_gymnasium_api_ms=gym_step * 1e3,
        env_steps_per_s=n / step, env_steps_per_s_amortised=n / (step + warm / n_steps),
        env_steps_per_s_gymnasium_api=n / gym_step,
        env_steps_per_s_sb3_adapter=None if sb3_step is None else n / sb3_step,
        dummy_vec_env=None if dummy is None else dict(dummy, envs=args.dummy_envs,
                                                      steps_per_s=args.dummy_envs / dummy["step_s"]),
        reference_cache=dict(sequences=len(cache), gib=cache.allocated_bytes / GIB, budget_gib=args.reference_cache_gib,
                             entry_mb=None if cache.entry_bytes is None else cache.entry_bytes / 2**20,
                             hits=cache.hits, misses=cache.misses),
        peak_gpu_memory_gb=peak,
        raw=dict(times=times, cold_resets=cold),
    )
    print(f"[{attention}] step {step * 1e3:.2f} ms, warm reset {warm * 1e3:.2f} ms, gymnasium API "
          f"{n / gym_step:,.0f} env steps/s", flush=True)
    free(venv)
    return result, tokens.cpu(), cache


def warm_reset_hits(mode: dict[str, Any]) -> str:
    """The share of the timed resets' rows the reference cache held, as a percentage ("?" in older results)."""
    fraction = mode.get("env_reset_warm_cache_hit_fraction")
    return "?" if fraction is None else f"{100 * fraction:.0f}%"


def add_ratios(mode: dict[str, Any], fastest_ms: float, grouped_ms: float | None) -> None:
    """The mode's times over the fastest plain forward of the same tokens (and the step's over the plain forward
    with the grouped attention)."""
    mode.update(ratio_step_to_fastest_forward=mode["env_step_ms"] / fastest_ms,
                ratio_step_to_grouped_attention_forward=None if grouped_ms is None else mode["env_step_ms"] / grouped_ms,
                ratio_with_reset=mode["env_step_amortised_ms"] / fastest_ms,
                ratio_with_cold_reset=mode["env_step_amortised_cold_ms"] / fastest_ms,
                ratio_gymnasium_api_to_fastest_forward=mode["env_step_gymnasium_api_ms"] / fastest_ms)


def curve(args: argparse.Namespace, kwargs: dict[str, Any], cache: Any, forwards: dict[int, float | None]
          ) -> list[dict[str, Any]]:
    """Per number of envs: gymnasium-API env steps/s (after one untimed episode that compiles the step and captures
    the CUDA graphs, if the env uses them), the step, the graphed plain forward of the same tokens and the peak GPU
    memory (the mode's reference cache, shared, included)."""
    points = []
    episodes = args.curve_episodes
    for n in args.n_envs_curve:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        venv = DRRLAttentionVecEnv(num_envs=n, **kwargs)
        venv.batch.references = cache  # sequences seen by the main measurement or earlier points stay cached
        try:
            start = time.perf_counter()
            if venv.batch._graphs is not None or venv.batch._compiled:  # an untimed episode compiles and captures
                gymnasium_api(venv, 1, args.seed + n)
            first_episode_s = time.perf_counter() - start
            gym_step = gymnasium_api(venv, episodes, args.seed + 2 * n)
            _, steps = core_episode(venv, np.random.default_rng(args.seed + 3 * n))
            if n not in forwards:
                tokens = venv.corpus.train[torch.from_numpy(venv.batch.episode.sequence_index)].to(venv.backbone.device)
                forwards[n] = graphed_forward(venv.backbone.model, tokens, args.segment_len)
        except torch.cuda.OutOfMemoryError as error:  # a point that does not fit is a result; the others still run
            points.append(dict(num_envs=n, error=f"out of GPU memory: {str(error)[:200]}",
                               reference_cache_gib=cache.allocated_bytes / GIB))
            print(f"[{kwargs['attention']}] {n} envs: out of GPU memory", flush=True)
            free(venv)
            continue
        step, forward = float(np.median(steps)), forwards[n]
        points.append(dict(num_envs=n, compiled=venv.batch._compiled, env_steps_per_s_gymnasium_api=n / gym_step,
                           env_step_ms=step * 1e3, first_episode_s=first_episode_s,
                           plain_forward_cuda_graph_ms=None if forward is None else forward * 1e3,
                           ratio_step_to_graphed_forward=None if forward is None else step / forward,
                           peak_gpu_memory_gb=peak_memory_gb(), reference_cache_gib=cache.allocated_bytes / GIB))
        print(f"[{kwargs['attention']}] {n} envs: {n / gym_step:,.0f} env steps/s, step {step * 1e3:.2f} ms, peak "
              f"{points[-1]['peak_gpu_memory_gb']} GB", flush=True)
        free(venv)
    return points


# -------------------------------------------------------------------------------------------------- report
def markdown(result: dict[str, Any]) -> str:
    """Per mode: each line's time per step of all envs, its ratio to the fastest forward, env steps/s; the curve."""
    forward, config = result["fastest_forward"], result["config"]
    lines = [f"Measured by `{result['command']}` on {result['machine']}, {result['date']} (torch {result['torch']}, "
             f"transformers {result['transformers']}); {config['model']} ({config['dtype']}), sequences of "
             f"{config['seq_len']} tokens in segments of {config['segment_len']}. Fastest plain forward without LM "
             f"head: **{forward['fastest']}**, {forward['fastest_ms']:.2f} ms per segment of {config['num_envs']} "
             f"sequences (CUDA graph: {forward['cuda_graph_ms']}, torch.compile: {forward['torch_compile_ms']}, "
             f"compile error: {forward['torch_compile'].get('error')}).", ""]
    fastest = forward["fastest_ms"]
    for mode in result["modes"].values():
        n = mode["num_envs"]
        rows = [
            ("plain HF forward `model(...)` (eager)", mode["plain_forward_ms"], False),
            ("plain HF forward without LM head (eager)", mode["plain_forward_no_lm_head_ms"], False),
            (f"fastest plain forward without LM head ({forward['fastest']})", fastest, False),
            *([("plain forward without LM head, torch.compile, grouped-query attention",
                forward["torch_compile_grouped_attention_ms"], False)]
              if forward.get("torch_compile_grouped_attention_ms") else []),
            (f"batched env, step ({step_kind(mode)})", mode["env_step_ms"], True),
            *([("batched env, step (eager)", mode["env_step_eager_ms"], True)]
              if mode["env_step_eager_ms"] is not None else []),
            ("batched env, step + cold reset amortised (warm-up + reference forward)",
             mode["env_step_amortised_cold_ms"], True),
            (f"batched env, step + warm reset amortised ({warm_reset_hits(mode)} of its rows from the reference "
             "cache)", mode["env_step_amortised_ms"], True),
            ("batched env, gymnasium API end to end (autoreset incl.)", mode["env_step_gymnasium_api_ms"], True),
            *([("batched env, SB3 VecEnv adapter end to end", n / mode["env_steps_per_s_sb3_adapter"] * 1e3, True)]
              if mode["env_steps_per_s_sb3_adapter"] else []),
            *([(f"SB3 DummyVecEnv of {mode['dummy_vec_env']['envs']} single envs, step scaled to {n} envs",
                mode["dummy_vec_env"]["step_s"] * 1e3 * n / mode["dummy_vec_env"]["envs"], True)]
              if mode["dummy_vec_env"] else []),
        ]
        lines += [f"### {mode['attention']}, {n} envs", "", f"| what (per step of {n} envs) | ms | x fastest forward | "
                  "env steps/s |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {ms:.2f} | {ms / fastest:.2f} | {f'{n / ms * 1e3:,.0f}' if env else ''} |"
                  for name, ms, env in rows]
        cache = mode["reference_cache"]
        lines += ["", f"Reference cache: {cache['sequences']} sequences, {cache['gib']:.2f} GiB of a "
                  f"{cache['budget_gib']} GiB budget ({cache['entry_mb']} MB each), {cache['hits']} hits / "
                  f"{cache['misses']} misses; peak GPU memory {mode['peak_gpu_memory_gb']} GB. The first episode's "
                  f"steps (compilation, graph capture) took {mode['first_episode_steps_s']:.1f} s.", ""]
    for attention, points in result["curve"].items():
        lines += [f"### {attention}: env steps/s against the number of envs", "",
                  "| envs | step compiled | env steps/s (gymnasium API) | step ms | graphed plain forward ms | x forward "
                  "| peak GPU GB |", "|---:|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['num_envs']} | {p['error']} | | | | | |" if "error" in p else
                  f"| {p['num_envs']} | {'yes' if p.get('compiled') else 'no'} | "
                  f"{p['env_steps_per_s_gymnasium_api']:,.0f} | {p['env_step_ms']:.2f} | "
                  f"{_num(p['plain_forward_cuda_graph_ms'])} | {_num(p['ratio_step_to_graphed_forward'])} | "
                  f"{_num(p['peak_gpu_memory_gb'])} |" for p in points]
        lines.append("")
    return "\n".join(lines)


def step_kind(mode: dict[str, Any]) -> str:
    """How a mode's step ran: CUDA graphs and/or torch.compile, else eager kernels."""
    kinds = [name for name, used in (("CUDA graphs", mode["cuda_graphs"]), ("torch.compile", mode.get("compiled")))
             if used]
    return " + ".join(kinds) or "eager"


PARTIAL = "env_throughput.partial.json"


def save_partial(out: Path, modes: dict[str, Any], curves: dict[str, Any] | None = None) -> None:
    """The numbers measured so far (no ratios yet: the fastest forward is measured last), removed by a finished run."""
    partial = dict(command=" ".join(["python", *sys.argv]), machine=describe_machine(), date=date.today().isoformat(),
                   modes=modes, curve=curves or {})
    atomic_write_text(out / PARTIAL, json.dumps(partial, indent=1))


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"default {DEFAULT_MODEL} (smoke: tiny-random-llama)")
    parser.add_argument("--num-envs", type=number_in(int, 1), default=None, help="default 64 (smoke: 4)")
    parser.add_argument("--seq-len", type=number_in(int, 2), default=None, help="default 1024")
    parser.add_argument("--segment-len", type=number_in(int, 1), default=None, help="default 128")
    parser.add_argument("--rank-choices", type=int, nargs="+", default=None)
    parser.add_argument("--attention", nargs="+", choices=["lowrank_scores", "select"],
                        default=["lowrank_scores", "select"], help="modes, in order; the first is the headline")
    parser.add_argument("--episodes", type=number_in(int, 1), default=None, help="timed episodes, low-rank mode (5)")
    parser.add_argument("--select-episodes", type=number_in(int, 1), default=2, help="timed episodes, select mode")
    parser.add_argument("--n-envs-curve", type=int, nargs="*", default=None, help="default 16 32 64 128 256")
    parser.add_argument("--curve-episodes", type=number_in(int, 1), default=1)
    parser.add_argument("--bound-queries", type=number_in(int, 1), default=None,
                        help="selection mode: the mask's bound over each segment's last m queries (default: the "
                        "env's, 32; the segment length for every query)")
    parser.add_argument("--bound-source", choices=["agent", "reference"], default="agent",
                        help="selection mode: whose bound table the mask reads (the env's bound_source)")
    parser.add_argument("--reference-cache-gib", type=number_in(float, 0), default=None,
                        help="the env's reference cache budget; default 64 (holds SmolLM2's whole train split)")
    parser.add_argument("--prefill", type=number_in(int, 1), default=None,
                        help="fill the cache with the first this many train sequences (default: all)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time torch.compile of the plain forward (default: on, off with --smoke)")
    parser.add_argument("--env-compile", action=argparse.BooleanOptionalAction, default=False,
                        help="compile the env's step (EnvConfig.compile): once per batch size, the curve's "
                        "points included")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the env without CUDA graphs and compilation, and compare the two")
    parser.add_argument("--sb3", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dummy-envs", type=number_in(int, 0), default=None, help="single envs under DummyVecEnv "
                        "for the first mode (16; 0 skips)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also write env_throughput_<mode>.profile.txt")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes: checks the script on a CPU")
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON, markdown and profiles")
    args = parser.parse_args()
    defaults = dict(model=DEFAULT_MODEL, num_envs=64, seq_len=1024, segment_len=128, episodes=5,
                    n_envs_curve=(16, 32, 64, 128, 256), reference_cache_gib=64.0, dummy_envs=16, compile=True)
    if args.smoke:
        defaults.update(SMOKE)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = dict(model=args.model, seq_len=args.seq_len, segment_len=args.segment_len,
                                  device=args.device, dtype=args.dtype, reference_cache_gib=args.reference_cache_gib,
                                  compile=args.env_compile)
    if args.smoke:
        kwargs.update(SMOKE_ENV)
    if args.rank_choices:
        kwargs["rank_choices"] = tuple(args.rank_choices)
    start = time.perf_counter()
    modes, curves, forwards, tokens = {}, {}, {}, None
    for index, attention in enumerate(args.attention):
        mode_kwargs = dict(kwargs, attention=attention)
        if attention == "select":
            mode_kwargs["bound_source"] = args.bound_source
            if args.bound_queries is not None:
                mode_kwargs["bound_queries"] = args.bound_queries
        modes[attention], mode_tokens, cache = measure_mode(args, mode_kwargs, index == 0)
        tokens = mode_tokens if tokens is None else tokens
        save_partial(args.out, modes)  # a run stopped later (time limit, crash) keeps the finished modes
        curves[attention] = curve(args, mode_kwargs, cache, forwards)
        save_partial(args.out, modes, curves)
        del cache
        free()
        print(f"{time.perf_counter() - start:.0f} s so far", flush=True)
    # Last, so that a compiler failure cannot cost the env's numbers: the fastest forward of the first mode's tokens.
    backbone = shared_backbone(args.model, args.device, DTYPES.get(args.dtype) if args.dtype else None)
    forward = fastest_forward(backbone.model, tokens.to(backbone.device), args.segment_len, args.compile,
                              args.out / "plain_forward_compiled.profile.txt" if args.profile else None)
    print(f"fastest plain forward: {forward['fastest']} {forward['fastest_ms']:.2f} ms (graph "
          f"{forward['cuda_graph_ms']}, compile {forward['torch_compile_ms']}, compile with grouped attention "
          f"{forward['torch_compile_grouped_attention_ms']}; compile "
          f"{forward['torch_compile'].get('error') or 'ok'}, {forward['torch_compile'].get('wall_s', 0):.0f} s)",
          flush=True)
    for mode in modes.values():
        add_ratios(mode, forward["fastest_ms"], forward["torch_compile_grouped_attention_ms"])
    first = modes[args.attention[0]]
    result = dict(
        command=" ".join(["python", *sys.argv]), machine=describe_machine(), torch=torch.__version__,
        transformers=transformers.__version__, date=date.today().isoformat(), wall_s=time.perf_counter() - start,
        config=dict(model=args.model, dtype=first["dtype"], num_envs=args.num_envs, seq_len=args.seq_len, segment_len=args.segment_len,
                    attention=args.attention, reference_cache_gib=args.reference_cache_gib),
        env_steps_per_s_gymnasium_api=first["env_steps_per_s_gymnasium_api"],
        ratio_step_to_fastest_forward=first["ratio_step_to_fastest_forward"],
        ratio_with_reset=first["ratio_with_reset"],
        ratio_step_to_grouped_attention_forward=first["ratio_step_to_grouped_attention_forward"],
        fastest_forward=forward, modes=modes, curve=curves,
        timing="medians over interleaved rounds (raw: every timed step and reset, seconds)",
    )
    atomic_write_text(args.out / "env_throughput.json", json.dumps(result, indent=1))
    (args.out / PARTIAL).unlink(missing_ok=True)
    text = markdown(result)
    atomic_write_text(args.out / "env_throughput.md", text)
    print(text)
    print(f"wrote {args.out}/env_throughput.json and .md in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

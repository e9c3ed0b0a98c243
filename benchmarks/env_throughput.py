"""Env throughput against the frozen model's own forward pass, in one run.

    python benchmarks/env_throughput.py --out docs/results/env_throughput_h100.json

Measures, on the same train sequences (SmolLM2-135M, 64 sequences of 1024 tokens in segments of 128 by default):

1. plain HF forward: the unmodified model (its own attention, e.g. SDPA) running each segment with a DynamicCache,
   as ``model(tokens, cache=cache)`` (with the LM head) and as ``model.base_model`` (without it); the
   time per segment of segments 1 .. n-1, i.e. per env step.
2. the batched env (``DRRLAttentionVecEnv``, one forward per step for all N episodes): the step alone, the reset
   (warm-up segment + the full-rank reference of every remaining segment), and the step with the reset amortised
   over the episode's n-1 steps; then end to end through the gymnasium API (same-step autoreset included) and the
   SB3 ``VecEnv`` adapter.
3. SB3 ``DummyVecEnv`` over N single envs (N forwards of one sequence per step), for one episode.

Ratios are env time / plain forward time of the same tokens. With ``--profile`` a torch.profiler table of one
episode of the batched env (reset included) is written beside the JSON. Prints a Markdown table for docs/.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import DynamicCache

from drrl_gym.backbone import DEFAULT_MODEL
from drrl_gym.cuda_graphs import capture_cuda_graph
from drrl_gym.env import DRRLAttentionEnv
from drrl_gym.hf_compat import cache_argument
from drrl_gym.kv_cache import kv_tensors, point_cache
from drrl_gym.perplexity import describe_machine
from drrl_gym.training.sb3_vec_env import DRRLAttentionSB3VecEnv
from drrl_gym.vector import DRRLAttentionVecEnv


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


def plain_forward(model: torch.nn.Module, tokens: torch.Tensor, segment_len: int, lm_head: bool) -> list[float]:
    """Seconds per segment of one episode of the unmodified model: segments 0 .. n-1 with a KV cache."""
    cache, seconds = DynamicCache(config=model.config), []
    run = model if lm_head else model.base_model
    with torch.inference_mode():
        for start in range(0, tokens.shape[1], segment_len):
            segment = tokens[:, start : start + segment_len]
            _, elapsed = timed(lambda: run(segment, **cache_argument(cache), use_cache=True))
            seconds.append(elapsed)
    return seconds


def random_actions(rng: np.random.Generator, masks: np.ndarray, n_units: int) -> np.ndarray:
    """A uniformly random *allowed* choice per token (as a masked policy acts), for (N, n_units * n_choices) masks."""
    allowed = masks.reshape(len(masks), n_units, -1)
    scores = rng.random(allowed.shape) * allowed  # disallowed choices score 0, allowed ones > 0 almost surely
    return scores.argmax(-1)


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


def sb3_adapter(env: DRRLAttentionSB3VecEnv, episodes: int, seed: int) -> float:
    """Seconds per step through the SB3 VecEnv adapter (per-env info dicts, autoreset included)."""
    rng, n_steps = np.random.default_rng(seed), env.venv.config.n_segments - 1
    env.seed(seed)
    env.reset()
    synchronize()
    start = time.perf_counter()
    for _ in range(episodes * n_steps):
        env.step(random_actions(rng, np.stack(env.env_method("action_masks")), env.venv.n_units))
    synchronize()
    return (time.perf_counter() - start) / (episodes * n_steps)


def dummy_vec_env(kwargs: dict[str, Any], num_envs: int, seed: int) -> dict[str, float]:
    """SB3 DummyVecEnv over ``num_envs`` single envs (one shared model): one reset and one episode, timed after
    an untimed episode (which captures each env's CUDA graphs)."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    env = DummyVecEnv([lambda: DRRLAttentionEnv(**kwargs) for _ in range(num_envs)])
    rng, n_units = np.random.default_rng(seed), env.get_attr("n_units", 0)[0]
    n_steps = kwargs["seq_len"] // kwargs["segment_len"] - 1
    env.seed(seed)
    env.reset()
    for _ in range(n_steps):  # warm-up episode; its last step autoresets
        env.step(random_actions(rng, np.stack(env.env_method("action_masks")), n_units))
    _, reset = timed(env.reset)
    step_s = []
    for _ in range(n_steps - 1):  # the last step autoresets (a reset inside the step): timed apart below
        actions = random_actions(rng, np.stack(env.env_method("action_masks")), n_units)
        _, elapsed = timed(lambda: env.step(actions))
        step_s.append(elapsed)
    actions = random_actions(rng, np.stack(env.env_method("action_masks")), n_units)
    _, last = timed(lambda: env.step(actions))
    env.close()
    return dict(reset_s=reset, step_s=float(np.mean(step_s)), last_step_with_autoreset_s=last,
                episode_s=reset + sum(step_s) + last, steps=n_steps)


def graphs_against_eager(graphed: DRRLAttentionVecEnv, eager: DRRLAttentionVecEnv, seed: int) -> dict[str, Any]:
    """One episode of both on the same sequences and actions: largest differences (graphs vs eager forward)."""
    rng, worst = np.random.default_rng(seed), dict(observation=0.0, reward=0.0, fidelity=0.0, masks_equal=True)
    graphed.reset(seed=seed)
    eager.reset(seed=seed)
    for _ in range(graphed.config.n_segments - 1):
        masks = graphed.action_masks()
        worst["masks_equal"] &= bool(np.array_equal(masks, eager.action_masks()))
        actions = random_actions(rng, masks, graphed.n_units)
        results = [env.step(actions) for env in (graphed, eager)]
        # (observation of the step, reward, fidelity); at the episode's end the step's observation is final_obs.
        ends = [(np.stack(i["final_obs"]), r, i["final_info"]["fidelity"]) if d[0] else (o, r, i["fidelity"])
                for o, r, d, _, i in results]
        for key, a, b in zip(("observation", "reward", "fidelity"), *ends, strict=True):
            worst[key] = max(worst[key], float(np.abs(a - b).max()))
    return worst


def profile(venv: DRRLAttentionVecEnv, path: Path, seed: int) -> None:
    """torch.profiler tables of the batched core: the n-1 steps of one episode (by GPU kernel time and by CPU
    time), and one reset."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rng, batch = np.random.default_rng(seed), venv.batch
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    gpu = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    indices = rng.integers(len(venv.corpus.train), size=venv.num_envs)
    batch.reset(indices)
    with torch_profile(activities=activities) as steps:
        for _ in range(venv.config.n_segments - 1):
            batch.step(random_actions(rng, venv.action_masks(), venv.n_units))
        synchronize()
    with torch_profile(activities=activities) as reset:
        batch.reset(indices)
        synchronize()
    n = venv.config.n_segments - 1
    text = [f"# {n} steps of EpisodeBatch (num_envs={venv.num_envs}, no reset), by {gpu}",
            steps.key_averages().table(sort_by=gpu, row_limit=30),
            f"# the same {n} steps by CPU time (total, children included)",
            steps.key_averages().table(sort_by="cpu_time_total", row_limit=25),
            "# one reset (warm-up segment + full-rank reference of the rest), by CUDA time (total)",
            reset.key_averages().table(sort_by="cuda_time_total" if torch.cuda.is_available() else "cpu_time_total",
                                       row_limit=20)]
    path.write_text("\n".join(text))


def plain_forward_graphed(model: torch.nn.Module, tokens: torch.Tensor, segment_len: int) -> float | None:
    """Seconds per segment (mean over segments 1 .. n-1) of the unmodified model's ``base_model`` replayed as a
    CUDA graph: its GPU time without launch overhead, the floor any eager or graphed env step is compared with."""
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

            graph, _ = capture_cuda_graph(run)
            graph.replay()
            replays = [timed(graph.replay)[1] for _ in range(10)]
            seconds.append(float(np.median(replays)))
    return float(np.mean(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--segment-len", type=int, default=128)
    parser.add_argument("--rank-choices", type=int, nargs="+", default=None)
    parser.add_argument("--attention", choices=["lowrank_scores", "select"], default="lowrank_scores")
    parser.add_argument("--episodes", type=int, default=5, help="timed episodes of the batched env (after warm-up)")
    parser.add_argument("--dummy-envs", type=int, default=16, help="single envs under DummyVecEnv (per-env cost is "
                        "linear in their number, so a few stand for N)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also write <out>.profile.txt")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    kwargs: dict[str, Any] = dict(model=args.model, seq_len=args.seq_len, segment_len=args.segment_len,
                                  device=args.device, dtype=args.dtype, attention=args.attention)
    if args.rank_choices:
        kwargs["rank_choices"] = tuple(args.rank_choices)
    n, n_steps = args.num_envs, args.seq_len // args.segment_len - 1
    venv = DRRLAttentionVecEnv(num_envs=n, **kwargs)
    backbone = venv.backbone
    print(f"{describe_machine()}: {args.model} ({backbone.dtype}), {n} envs x {args.seq_len} tokens in segments of "
          f"{args.segment_len}, {venv.n_units} tokens x {len(venv.feature_names)} features", flush=True)

    # Warm up every path once (kernels, allocator, CUDA graph capture), then measure in interleaved rounds, so
    # that drift of the machine (its CPU is shared and slow) hits the baseline and the env alike; medians below.
    rng, model = np.random.default_rng(args.seed), backbone.model
    graphs = venv.batch._graphs is not None
    eager = DRRLAttentionVecEnv(num_envs=n, cuda_graphs=False, **kwargs) if graphs else None
    envs = [("graphs" if graphs else "eager", venv)] + ([("eager", eager)] if eager else [])
    times: dict[str, list[float]] = {k: [] for k in ("model", "base_model", "graphs", "eager", "graphs_reset",
                                                     "eager_reset")}
    tokens = None
    for round_ in range(args.episodes + 1):
        for name, env in envs:
            reset, steps = core_episode(env, rng)
            if round_:  # round 0 warms up
                times[name] += steps
                times[f"{name}_reset"].append(reset)
        tokens = venv.corpus.train[torch.from_numpy(venv.batch.episode.sequence_index)].to(backbone.device)
        for name, lm_head in (("model", True), ("base_model", False)):
            segments = plain_forward(model, tokens, args.segment_len, lm_head)
            if round_:
                times[name] += segments[1:]  # segments 1 .. n-1: the ones a step runs
    name = envs[0][0]
    print(f"batched env: step {np.median(times[name]) * 1e3:.2f} ms (CUDA graphs: {graphs}), reset "
          f"{np.median(times[name + '_reset']) * 1e3:.2f} ms; plain forward {np.median(times['model']) * 1e3:.2f} ms",
          flush=True)
    agreement = None
    if eager is not None:
        agreement = graphs_against_eager(venv, eager, args.seed + 5)
        eager.close()
        print(f"graphs vs eager, largest differences: {agreement}", flush=True)
    graphed_forward = plain_forward_graphed(backbone.model, tokens, args.segment_len)
    sb3 = DRRLAttentionSB3VecEnv(venv)
    sb3_adapter(sb3, 1, args.seed)
    sb3_step = sb3_adapter(sb3, args.episodes, args.seed + 2)
    gym_step = gymnasium_api(venv, args.episodes, args.seed + 6)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile(venv, args.out.with_suffix(".profile.txt"), args.seed + 3)
    dummy_envs = args.dummy_envs
    dummy = dummy_vec_env(kwargs, dummy_envs, args.seed + 4)

    median = {key: float(np.median(value)) if value else None for key, value in times.items()}
    step, reset = median[name], median[name + "_reset"]
    amortised = step + reset / n_steps
    forward, body, eager_step = median["model"], median["base_model"], median["eager"] if graphs else None
    dummy_amortised = dummy["episode_s"] / dummy["steps"]
    result = dict(
        config=dict(model=args.model, dtype=str(backbone.dtype), num_envs=n, seq_len=args.seq_len,
                    segment_len=args.segment_len, steps_per_episode=n_steps, rank_choices=list(venv.rank_choices),
                    fidelity=venv.config.fidelity, attention=args.attention, episodes=args.episodes,
                    dummy_envs=dummy_envs,
                    cuda_graphs=graphs),
        plain_forward_ms=forward * 1e3,
        plain_forward_no_lm_head_ms=body * 1e3,
        plain_forward_no_lm_head_cuda_graph_ms=None if graphed_forward is None else graphed_forward * 1e3,
        env_step_ms=step * 1e3,
        env_step_eager_ms=None if eager_step is None else eager_step * 1e3,
        graphs_vs_eager_max_abs_diff=agreement,
        env_step_p90_ms=float(np.percentile(times[name], 90)) * 1e3,
        env_reset_ms=reset * 1e3,
        env_step_amortised_ms=amortised * 1e3,
        ratio_step_to_forward=step / forward,
        ratio_step_to_forward_no_lm_head=step / body,
        ratio_amortised_to_forward=amortised / forward,
        ratio_amortised_to_forward_no_lm_head=amortised / body,
        env_steps_per_s=n / step,
        env_steps_per_s_amortised=n / amortised,
        env_steps_per_s_gymnasium_api=n / gym_step,
        env_steps_per_s_sb3_adapter=n / sb3_step,
        dummy_vec_env_step_ms=dummy["step_s"] * 1e3,
        dummy_vec_env_reset_ms=dummy["reset_s"] * 1e3,
        dummy_vec_env_steps_per_s=dummy_envs / dummy["step_s"],
        dummy_vec_env_steps_per_s_amortised=dummy_envs / dummy_amortised,
        peak_gpu_memory_gb=peak_gb,
        timing="medians over interleaved rounds (raw: every timed step and reset, seconds)",
        raw=dict(times=times, dummy=dummy),
        machine=describe_machine(), torch=torch.__version__, transformers=transformers.__version__,
        date=date.today().isoformat(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2))
    print(table(result))


def table(r: dict[str, Any]) -> str:
    """Markdown: each line's time per step of all envs, its ratio to the plain eager forward, env steps/s."""
    c, forward, n = r["config"], r["plain_forward_ms"], r["config"]["num_envs"]
    floor, eager = r["plain_forward_no_lm_head_cuda_graph_ms"], r["env_step_eager_ms"]
    rows = [
        ("plain HF forward `model(...)` (eager), one segment of every sequence", forward, False),
        ("plain HF forward without LM head (`model.base_model`, eager)", r["plain_forward_no_lm_head_ms"], False),
        *([("plain HF forward without LM head, replayed as a CUDA graph (its GPU time)", floor, False)]
          if floor is not None else []),
        (f"batched env, step{' (CUDA graphs)' if c['cuda_graphs'] else ''}", r["env_step_ms"], True),
        *([("batched env, step without CUDA graphs (eager)", eager, True)] if eager is not None else []),
        (f"batched env, step + reset amortised over {c['steps_per_episode']} steps", r["env_step_amortised_ms"], True),
        ("batched env, gymnasium API end to end (autoreset incl.)", n / r["env_steps_per_s_gymnasium_api"] * 1e3,
         True),
        ("batched env, SB3 VecEnv adapter end to end", n / r["env_steps_per_s_sb3_adapter"] * 1e3, True),
        (f"SB3 DummyVecEnv over {c['dummy_envs']} single envs, step (x {n}/{c['dummy_envs']} for {n} envs)",
         r["dummy_vec_env_step_ms"] * n / c["dummy_envs"], True),
        ("SB3 DummyVecEnv, step + reset amortised (same scaling)",
         c["dummy_envs"] / r["dummy_vec_env_steps_per_s_amortised"] * 1e3 * n / c["dummy_envs"], True),
    ]
    lines = [f"| what (per step of {n} envs) | ms | x plain forward | env steps/s |", "|---|---:|---:|---:|"]
    for name, ms, env in rows:
        lines.append(f"| {name} | {ms:.2f} | {ms / forward:.2f} | {f'{n / ms * 1e3:,.0f}' if env else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

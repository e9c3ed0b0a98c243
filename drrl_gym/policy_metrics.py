"""Measure rank policies on held-out text: perplexity, fidelity, FLOPs and wall-clock time, one protocol for all.

Every policy (``drrl_gym.policies``: full rank, uniform, static allocation, NER rule, ALRT controller, random, a
learned network) runs through the same dynamic-rank model (``drrl_gym.export.DynamicRankRuntime``), with the same
protocol as the environment: sequences fed ``segment_len`` tokens at a time with a KV cache, segment 0 at full rank,
then one decision per segment. Per method:

* perplexity over every token (``drrl_gym.perplexity.next_token_nll``);
* fidelity (optional): mean cosine of attention outputs (per layer, token and head) against the full-rank run over
  the tokens after the method's own warm-up segment, errors compounding through each method's own cache (methods
  with different segment lengths are compared on the tokens each of them decides);
* FLOPs fractions of the QK^T scores and of the whole attention against the unmodified model
  (``drrl_gym.flops.layer_flops``, summed over segments, layers and sequences), charging each method for what it
  runs: statistics when it records them, the projected-key cache when it uses the basis;
* latency: the median wall time of one segment's forward (decision included; CUDA synchronised), after an untimed
  pass of every method over the first batch so that kernel selection and plan building stay out of it;
* the mean rank per (segment, layer, KV head), for heatmaps.

The batches are the outer loop and the methods the inner one, so the full-rank reference of a batch (needed for
fidelity) is held for one batch at a time.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from drrl_gym.backbone import AttentionGeometry
from drrl_gym.flops import AttentionFlops, layer_flops
from drrl_gym.hf_compat import cache_argument
from drrl_gym.perplexity import next_token_nll
from drrl_gym.policies import FullRank, RankPolicy
from drrl_gym.runtime import ControllerSpec


@dataclass
class Measurement:
    """One method's results over all sequences."""

    perplexity: float
    fidelity: float | None  # None when not measured; 1.0 for the reference itself
    scores_flops_fraction: float
    attention_flops_fraction: float
    latency_ms: float
    mean_ranks: np.ndarray  # (n_segments, num_layers, num_kv_heads): rank per segment, averaged over sequences
    # Of the decisions after the first, the fraction whose rank differs from the same (sequence, layer, KV head)'s
    # in the previous segment: 0 for a static allocation; None with fewer than two decision segments.
    switch_fraction: float | None = None

    @property
    def rank_fraction(self) -> float:
        """Mean rank / head_dim over the decision segments (segment 0 is the full-rank warm-up)."""
        return float(self.mean_ranks[1:].mean() / self.mean_ranks[0].max())


@dataclass
class _Tally:
    nll: float = 0.0
    tokens: int = 0
    cosine: float = 0.0
    vectors: int = 0
    flops: np.ndarray = field(default_factory=lambda: np.zeros(2))  # (scores, total)
    baseline: np.ndarray = field(default_factory=lambda: np.zeros(2))
    latencies: list[float] = field(default_factory=list)
    ranks: list[np.ndarray] = field(default_factory=list)  # per batch: (n_segments, B, layers, kv_heads)


@cache
def _flops(geometry: AttentionGeometry, new_tokens: int, keys: int, ranks: tuple[int, ...] | None, statistics: bool,
           basis_mode: str, key_cache: bool) -> AttentionFlops:
    return layer_flops(geometry, new_tokens, keys, None if ranks is None else list(ranks), statistics, basis_mode,
                       key_cache)


@torch.inference_mode()
def _run(model: PreTrainedModel, tokens: torch.Tensor, tally: _Tally, reference: torch.Tensor | None,
         keep_outputs: bool) -> torch.Tensor | None:
    """The runtime's current policy on one batch. ``reference``: the full-rank run's attention outputs, (layers, B,
    L, H, d); returns this run's, in that layout, if ``keep_outputs``."""
    runtime = model.drrl
    length = runtime.spec.segment_len
    wanted = keep_outputs or reference is not None
    cache, outputs = DynamicCache(config=model.config), []
    cuda = tokens.device.type == "cuda"
    with runtime.recording_outputs() if wanted else nullcontext([]) as pieces:
        for s in range(tokens.shape[1] // length):
            _run_segment(model, tokens, s, length, cache, tally, cuda)
            if not wanted:
                continue
            layers = torch.stack(pieces[-1])  # (layers, B, T, H, d): a segment-aligned call is one piece
            if keep_outputs:
                outputs.append(layers)
            if reference is not None and s > 0:
                expected = reference[:, :, s * length : (s + 1) * length]
                cosine = F.cosine_similarity(layers.float(), expected.float(), dim=-1)
                tally.cosine += cosine.sum().item()
                tally.vectors += cosine.numel()
            pieces.clear()
    _count_flops(runtime, tally)
    return torch.cat(outputs, dim=2) if keep_outputs else None


def _run_segment(model: PreTrainedModel, tokens: torch.Tensor, s: int, length: int, cache: DynamicCache,
                 tally: _Tally, cuda: bool) -> None:
    """Segment ``s`` through the model, timed, its next-token NLL added to ``tally``."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    logits = model(tokens[:, s * length : (s + 1) * length], **cache_argument(cache), use_cache=True).logits
    if cuda:
        torch.cuda.synchronize()
    tally.latencies.append(time.perf_counter() - start)
    nll, count = next_token_nll(logits, tokens, s * length)
    tally.nll, tally.tokens = tally.nll + nll, tally.tokens + count


def _count_flops(runtime, tally: _Tally) -> None:
    spec, geometry = runtime.spec, runtime.geometry
    key_cache = runtime.attention.cache_projected_keys
    history = torch.stack(runtime.rank_history).numpy()  # (n_segments, B, layers, kv_heads)
    tally.ranks.append(history)
    for s, ranks in enumerate(history):
        args = (geometry, spec.segment_len, (s + 1) * spec.segment_len)
        full = _flops(*args, None, False, spec.basis_mode, False)
        for row in ranks:
            for layer in row:
                chosen = full if runtime.unmodified else _flops(
                    *args, tuple(int(r) for r in layer), runtime.recording_statistics, spec.basis_mode, key_cache)
                tally.flops += (chosen.scores, chosen.total)
                tally.baseline += (full.scores, full.total)


def measure_policies(model: PreTrainedModel, methods: dict[str, tuple[RankPolicy, ControllerSpec]],
                     sequences: torch.Tensor, batch_size: int = 4, fidelity: bool = True,
                     progress: bool = True) -> dict[str, Measurement]:
    """Every method (name -> (policy, spec)) on ``sequences`` (n, L) through ``model``'s runtime (``model.drrl``).

    With ``fidelity``, the first method must be a :class:`~drrl_gym.policies.FullRank` policy: it is the reference.
    ``L`` must be a multiple of every spec's ``segment_len``. The runtime is left using the last method.
    """
    if not methods:
        raise ValueError("no methods to measure. Fix: pass at least one name -> (policy, spec).")
    first = next(iter(methods.values()))[0]
    if fidelity and not isinstance(first, FullRank):
        raise ValueError("fidelity is measured against the first method, which must be FullRank. Fix: put a FullRank "
                         "policy first, or pass fidelity=False.")
    for name, (_, spec) in methods.items():
        if sequences.shape[1] % spec.segment_len:
            raise ValueError(f"{name}: sequences of {sequences.shape[1]} tokens are not a multiple of segment_len="
                             f"{spec.segment_len}. Fix: cut sequences to a multiple of it.")
    runtime, device = model.drrl, model.device
    batches = list(sequences.split(batch_size))
    tallies = {name: _Tally() for name in methods}
    for policy, spec in methods.values():  # untimed warm-up pass: kernel choice and cuDNN plans
        runtime.use(policy, spec)
        _run(model, batches[0].to(device), _Tally(), None, False)
    with tqdm(total=len(batches) * len(methods), desc="measuring", disable=not progress) as bar:
        for batch in batches:
            batch, reference = batch.to(device), None
            for index, (name, (policy, spec)) in enumerate(methods.items()):
                runtime.use(policy, spec)
                keep = fidelity and index == 0
                outputs = _run(model, batch, tallies[name], reference, keep)
                reference = outputs if keep else reference
                bar.update()
    return {name: _summarize(tally, fidelity, index == 0) for index, (name, tally) in enumerate(tallies.items())}


def _summarize(tally: _Tally, fidelity: bool, is_reference: bool) -> Measurement:
    cosine = (1.0 if is_reference else tally.cosine / tally.vectors) if fidelity and (is_reference or tally.vectors) else None
    fractions = tally.flops / tally.baseline
    history = np.concatenate(tally.ranks, axis=1)  # (n_segments, sequences, layers, kv_heads)
    decisions = history[1:]  # segment 0 is the full-rank warm-up
    switch = float((decisions[1:] != decisions[:-1]).mean()) if len(decisions) > 1 else None
    return Measurement(math.exp(tally.nll / tally.tokens), cosine, float(fractions[0]), float(fractions[1]),
                       1000 * float(np.median(tally.latencies)), history.mean(axis=1), switch)

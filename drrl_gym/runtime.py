"""The runtime of a dynamic-rank model: the HF model's forward cut into segments, and the policy deciding per segment.

:func:`build_dynamic_rank_model` turns a loaded model into one (``drrl_gym.export`` saves and loads them); the
runtime sits at ``model.drrl``. What a forward pass does:

* The input is cut at segment boundaries (absolute positions that are multiples of ``segment_len``, counted from
  the start of the sequence, i.e. from the KV cache's length) and run piece by piece through one ``DynamicCache``,
  so the result is the segment-by-segment run the environment trains on.
* Segment 0 runs at full rank (the warm-up of the environment). At the first token of segment s >= 1 the runtime
  builds the observation from segment s-1's statistics (``DecisionSpace.observe``, the environment's own code),
  computes the mask (bound from full rank <= epsilon), takes the policy's deterministic choice (argmax of the logits
  over allowed choices, as MaskablePPO's deterministic action), projects it with the environment's rule (a no-op
  for an allowed argmax; kept so the mask is enforced by the same code) and sets the ranks for the whole segment.
* ``generate``: the prompt is one call (cut as above); then each new token is one call. Statistics accumulate over
  the calls of a segment (query second moments add up; the key second moment of the segment's last call already
  covers every visible key), and the ranks change when the cache length reaches a multiple of ``segment_len``.
  So the ranks for a token depend only on earlier tokens, and a sequence decided in one call or token by token
  gets the same ranks (statistics equal up to float summation order).
* Beyond ``seq_len`` the controller keeps deciding every segment; the position feature saturates at 1 (the
  observation is clipped to [0, 1]), which is outside what the policy saw in training.

When the policy reads statistics (or a mask is set) they are recorded on every call: the queries at full width
and their Gram; keys are projected once, when they enter, into a cache of projected keys with a running Gram
(``DynamicRankAttention(cache_projected_keys=True)``), so a call costs work proportional to its new tokens, not to
the keys visible (``drrl_gym.flops``, ``key_cache=True``). In selection mode a decoded token (one new token, on CUDA) attends through
``drrl_gym.selection_decode.selection_decode`` over that projected (rotated) key cache instead of the dense
reference. Unsupported (clear error): padding (an ``attention_mask`` with zeros: segment boundaries
would differ per row), a cache that does not continue the runtime's sequence (e.g. beam search reordering rows or
a cropped cache), compilable (static) caches.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from drrl_gym.backbone import AttentionGeometry, Backbone
from drrl_gym.config import EnvConfig
from drrl_gym.hf_compat import cache_argument, pop_cache
from drrl_gym.lowrank import DynamicRankAttention, SegmentStats
from drrl_gym.observation import DEFAULT_FEATURE_GROUPS, DecisionSpace, check_feature_groups
from drrl_gym.policies import FullRank, NetworkPolicy, RankPolicy, RankPolicyNetwork


@dataclass(frozen=True)
class ControllerSpec:
    """How the runtime decides ranks; ``epsilon=None`` means no mask (every choice allowed)."""

    rank_choices: tuple[int, ...]
    granularity: str
    segment_len: int
    seq_len: int
    epsilon: float | None
    basis_mode: str
    attention: str = "lowrank_scores"
    keep_choices: tuple[float, ...] | None = None  # selection mode's kept fractions
    feature_groups: tuple[str, ...] = DEFAULT_FEATURE_GROUPS  # the observation's columns (EnvConfig.observation_features)
    bound_queries: int | None = None  # selection mode: last queries of a segment the mask's bound is taken over

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank_choices", tuple(self.rank_choices))
        object.__setattr__(self, "feature_groups", check_feature_groups(self.feature_groups))
        if self.keep_choices is not None:
            object.__setattr__(self, "keep_choices", tuple(self.keep_choices))

    @classmethod
    def from_env_config(cls, config: EnvConfig) -> ControllerSpec:
        # A deployed policy runs at the end of the epsilon schedule, where training finished.
        epsilon = None if math.isinf(config.epsilon_end) else float(config.epsilon_end)
        keeps = tuple(config.keep_choices) if config.attention == "select" else None
        return cls(tuple(config.rank_choices), config.granularity, config.segment_len, config.seq_len, epsilon,
                   config.basis, config.attention, keeps, tuple(config.observation_features), config.bound_queries)

    @property
    def n_segments(self) -> int:
        return self.seq_len // self.segment_len

    def controller(self, geometry: AttentionGeometry) -> DecisionSpace:
        """The rank controller this spec describes, for ``geometry`` (build policies with it)."""
        return DecisionSpace(geometry, self.rank_choices, self.granularity, self.segment_len, self.n_segments,
                             self.keep_choices, self.feature_groups, self.bound_queries)


class DynamicRankRuntime:
    """The state of a dynamic-rank model: attention, controller, policy, and the current sequence's statistics.

    ``policy`` is any :class:`~drrl_gym.policies.RankPolicy` built on this runtime's ``controller`` (a learned
    actor, or a baseline: full rank, uniform, static allocation, NER rule, ALRT controller, random), so baselines
    and the learned policy run through the very same code path; :meth:`use` swaps it (and the spec) between
    sequences. Statistics are recorded only when the policy reads them or the mask needs them
    (``recording_statistics``); a :class:`~drrl_gym.policies.FullRank` policy without a mask runs the unmodified
    attention (no basis work at all). Otherwise the calibrated basis runs with the projected-key cache
    (``DynamicRankAttention(cache_projected_keys=True)``): each segment projects only its new keys.
    ``rank_history`` holds the (B, num_layers, num_kv_heads) ranks of every segment of the current sequence, and
    ``keep_history`` the kept fractions (all 1 for low-rank scores).
    ``env_config``, when known, is the environment configuration the policy was trained with (its corpus and
    splits say which text is held out).
    """

    def __init__(self, backbone: Backbone, policy: RankPolicy, basis: torch.Tensor | None, spec: ControllerSpec,
                 env_config: EnvConfig | None = None):
        self.model, self.tokenizer, self.geometry = backbone.model, backbone.tokenizer, backbone.geometry
        self.env_config = env_config
        self.basis = None if basis is None else basis.to(backbone.device)
        self.rank_history: list[torch.Tensor] = []
        self.keep_history: list[torch.Tensor] = []
        self._position, self._batch = 0, 0
        self._outputs: list[list[torch.Tensor]] | None = None
        self.attention: DynamicRankAttention | None = None
        self.use(policy, spec)

    def use(self, policy: RankPolicy, spec: ControllerSpec | None = None) -> None:
        """Decide with ``policy`` (and ``spec``, default: the current one) from the next sequence on."""
        spec = spec or self.spec
        if spec.basis_mode == "calibrated" and self.basis is None:
            raise ValueError("basis_mode='calibrated' needs the calibrated basis. Fix: pass the basis the policy was "
                             "trained with.")
        controller = spec.controller(self.geometry)
        if not isinstance(policy, RankPolicy):
            raise TypeError(f"{type(policy).__name__} is not a RankPolicy. Fix: wrap a RankPolicyNetwork as "
                            "NetworkPolicy(controller, network), or use a policy of drrl_gym.policies.")
        theirs = policy.controller
        if (theirs.rank_choices, theirs.granularity, theirs.n_units) != (spec.rank_choices, spec.granularity, controller.n_units):
            raise ValueError(f"the policy was built for rank_choices={theirs.rank_choices}, granularity={theirs.granularity!r} "
                             f"but the spec says {spec.rank_choices}, {spec.granularity!r}. Fix: build the policy with "
                             "spec.controller(geometry).")
        self.spec, self.controller, self.policy = spec, controller, policy
        self.recording_statistics = policy.needs_statistics or spec.epsilon is not None
        self.unmodified = isinstance(policy, FullRank) and not self.recording_statistics
        self._position = self._batch = 0  # a call continuing the old sequence now fails clearly (_sync)
        self.attention = DynamicRankAttention(self.geometry, self.basis, spec.basis_mode,
                                              cache_projected_keys=spec.basis_mode == "calibrated" and not self.unmodified,
                                              approximation=spec.attention)
        if hasattr(self.model, "drrl"):  # installed: route the model to the new attention object
            self.attention.attach(self.model)

    @contextmanager
    def recording_outputs(self) -> Iterator[list[list[torch.Tensor]]]:
        """Inside the context, each piece a forward runs appends its attention outputs per layer (before o_proj,
        (B, T, H, d) each) to the yielded list: for fidelity measurements (``drrl_gym.policy_metrics``)."""
        self._outputs = []
        try:
            yield self._outputs
        finally:
            self._outputs = None

    # --------------------------------------------------------------------------------------- installation
    def install(self) -> PreTrainedModel:
        """Route the model's attention through the dynamic-rank attention and its forward through the segmenter.

        The forward is wrapped on this instance (as accelerate's hooks do), not patched on the class: other
        instances of the same architecture are untouched. ``functools.wraps`` keeps the original signature visible
        to ``generate``'s introspection (e.g. ``logits_to_keep``).
        """
        if hasattr(self.model, "drrl"):
            raise RuntimeError("this model already has a dynamic-rank runtime. Fix: load a fresh backbone for each.")
        self.attention.attach(self.model)
        original = self.model.forward
        self._signature = inspect.signature(original)

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> CausalLMOutputWithPast:
            return self._segmented_forward(original, *args, **kwargs)

        self.model.forward = forward
        self.model.drrl = self
        return self.model

    def uninstall(self) -> PreTrainedModel:
        """Undo :meth:`install`: the model's own attention and forward again (e.g. to install another runtime)."""
        if getattr(self.model, "drrl", None) is not self:
            raise RuntimeError("this runtime is not installed on its model. Fix: call install() first.")
        self.attention.detach(self.model)
        del self.model.forward, self.model.drrl  # the instance attributes install() set; the class's forward is back
        return self.model

    # -------------------------------------------------------------------------------------------- forward
    def _segmented_forward(self, original: Any, *args: Any, **kwargs: Any) -> CausalLMOutputWithPast:
        arguments = self._signature.bind(*args, **kwargs).arguments
        arguments.update(arguments.pop("kwargs", {}))
        key = "input_ids" if arguments.get("input_ids") is not None else "inputs_embeds"
        inputs = arguments.pop(key)
        arguments.pop("input_ids", None)
        arguments.pop("inputs_embeds", None)
        cache = pop_cache(arguments)
        use_cache = arguments.pop("use_cache", None)
        labels = arguments.pop("labels", None)
        keep = arguments.pop("logits_to_keep", 0)
        mask = arguments.pop("attention_mask", None)
        per_token = {name: arguments.pop(name) for name in ("position_ids", "token_type_ids")
                     if arguments.get(name) is not None}
        if arguments.get("output_attentions"):
            raise NotImplementedError("output_attentions is not supported: the dynamic-rank attention returns no weights.")
        if cache is None:
            cache = DynamicCache(config=self.model.config)
        elif not isinstance(cache, DynamicCache):
            raise NotImplementedError(f"{type(cache).__name__} is not supported. Fix: use a DynamicCache (the default).")
        batch, length = inputs.shape[:2]
        start = cache.get_seq_length()
        if mask is not None and (mask.dim() != 2 or not bool(mask.all())):
            raise NotImplementedError("padding is not supported: segment boundaries would differ per row. Fix: run "
                                      "sequences of equal length without padding (or one at a time).")
        self._sync(start, batch)

        # Logits are computed only for the last `last` tokens (0: all); an index tensor and the loss need them all.
        index = keep if isinstance(keep, torch.Tensor) else None
        last = 0 if index is not None or labels is not None else keep
        outputs, logits = [], []
        cuts = [0, *range(-start % self.spec.segment_len or self.spec.segment_len, length, self.spec.segment_len), length]
        for a, b in zip(cuts, cuts[1:], strict=False):
            if a == b:
                continue
            self._begin_piece(start + a)
            piece = dict(arguments, **cache_argument(cache), use_cache=True, **{key: inputs[:, a:b]})
            piece.update({name: value[..., a:b] for name, value in per_token.items()})
            if mask is not None:
                piece["attention_mask"] = mask[:, : start + b]
            needed = b - a if last == 0 else min(b - a, max(0, b - (length - last)))
            outputs_wanted = self._outputs is not None
            options = self.controller.recording_options(self.recording_statistics)
            with self.attention.recording(self.recording_statistics, outputs_wanted, **options) as recorded:
                if needed == 0:  # no logit of this piece is wanted: skip the LM head
                    out = self.model.base_model(**piece)
                elif "logits_to_keep" in self._signature.parameters:
                    out = original(**piece, logits_to_keep=needed)
                    logits.append(out.logits)
                else:
                    out = original(**piece)
                    logits.append(out.logits[:, -needed:])
            outputs.append(out)
            if outputs_wanted:
                self._outputs.append(list(recorded.attention_outputs))
            if self.recording_statistics:
                self._add_statistics(recorded.stats())
        self._position = start + length

        logits_all = torch.cat(logits, dim=1)
        if index is not None:
            logits_all = logits_all[:, index]
        loss = None
        if labels is not None:
            loss = self.model.loss_function(logits=logits_all, labels=labels, vocab_size=self.model.config.vocab_size)
        hidden = None
        if arguments.get("output_hidden_states"):
            hidden = tuple(torch.cat(parts, dim=1) for parts in zip(*(o.hidden_states for o in outputs)))
        want_cache = self.model.config.use_cache if use_cache is None else use_cache
        return CausalLMOutputWithPast(loss=loss, logits=logits_all, **cache_argument(cache if want_cache else None),
                                      hidden_states=hidden)

    def _sync(self, start: int, batch: int) -> None:
        """Start a new sequence at position 0; otherwise the cache must continue the runtime's sequence."""
        if start == 0:
            self._batch, self._position, self.rank_history, self.keep_history = batch, 0, [], []
            self._prev_index = np.full((batch, self.controller.n_units), self.controller.n_choices - 1)
            self._stats: SegmentStats | None = None
            self._signals: np.ndarray | None = None  # the last observation's attention signals (their change)
            self.policy.reset(batch)
            self.attention.start_sequence()
        elif start != self._position or batch != self._batch:
            raise RuntimeError(
                f"the KV cache holds {start} tokens of {batch} sequence(s), but the dynamic-rank runtime is at position "
                f"{self._position} of {self._batch}: its per-segment state no longer matches the cache (a cropped or "
                "reordered cache, or another sequence's cache). Fix: continue from the cache the last call returned, or "
                "start a new sequence without a cache. Beam search and assisted decoding are not supported."
            )

    def _begin_piece(self, position: int) -> None:
        segment, offset = divmod(position, self.spec.segment_len)
        if offset == 0:
            if segment == 0:
                self.attention.set_ranks(self.geometry.head_dim)  # warm-up segment at full rank, every key
                self.attention.set_keep(1.0)
            else:
                chosen = self._decide(segment)
                self.attention.set_ranks(self.controller.layer_ranks(chosen))
                self.attention.set_keep(self.controller.layer_keeps(chosen))
            self._stats = None
            ranks = self.attention.ranks
            self.rank_history.append(ranks.expand(self._batch, -1, -1).clone())
            self.keep_history.append(self.attention.keep.expand(self._batch, -1, -1).clone())

    def _add_statistics(self, new: SegmentStats) -> None:
        if self._stats is None:
            self._stats = new
        else:  # query moments add over the segment's pieces; the newest key moment already covers every key
            old = self._stats
            bound = None
            if new.selection_bound is not None:  # means over query rows: weight each piece by its rows
                total = old.num_queries + new.num_queries
                bound = (old.selection_bound * old.num_queries + new.selection_bound * new.num_queries) / total
            # the attention signals are the segment's last queries': the newest piece's
            self._stats = SegmentStats(old.query_gram + new.query_gram, new.key_gram, old.num_queries + new.num_queries,
                                       new.num_keys, bound, new.entropy, new.signal_mass, new.signal_margin)

    def _decide(self, segment: int) -> np.ndarray:
        """(B, n_units) choice indices for ``segment`` from the last segment's statistics."""
        controller = self.controller
        if self.recording_statistics:
            summary = controller.summarize(self._stats)
            observed = controller.observe_summary(summary, self._prev_index, segment, self._signals)
            observation, self._signals = observed.matrix, controller.signals_of(summary)
            epsilon = math.inf if self.spec.epsilon is None else self.spec.epsilon
            allowed = controller.allowed(observed.to_full, epsilon)
        else:  # the policy ignores the observation and there is no mask
            observation = np.zeros((self._batch, controller.n_units, len(controller.feature_names)), dtype=np.float32)
            allowed = np.ones((self._batch, controller.n_units, controller.n_choices), dtype=bool)
        chosen, _ = controller.project(self.policy.act(observation, allowed), allowed)
        self._prev_index = chosen
        return chosen


def build_dynamic_rank_model(backbone: Backbone, policy: RankPolicy | RankPolicyNetwork, basis: torch.Tensor | None,
                             spec: ControllerSpec, env_config: EnvConfig | None = None) -> PreTrainedModel:
    """Turn ``backbone.model`` (in place) into a dynamic-rank model driven by ``policy``; returns the model.

    ``policy``: a :class:`~drrl_gym.policies.RankPolicy` built on ``spec.controller(backbone.geometry)``, or a bare
    :class:`RankPolicyNetwork` (wrapped as a :class:`~drrl_gym.policies.NetworkPolicy`). Use a backbone of its own
    (``load_backbone``), not one that environments share: its forward is wrapped.
    """
    if isinstance(policy, RankPolicyNetwork):
        policy = NetworkPolicy(spec.controller(backbone.geometry), policy)
    return DynamicRankRuntime(backbone, policy, basis, spec, env_config).install()

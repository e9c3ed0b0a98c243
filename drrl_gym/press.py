"""``with selection_press(model, basis, ranks, keeps): model.generate(...)``: selection decoding for a plain HF model.

Inside the press every self-attention layer of ``model`` runs through :class:`SelectionPress`, at a static
allocation: layer l, KV head g decodes at rank ``ranks[l, g]`` keeping the fraction ``keeps[l, g]`` of its visible
keys (plus the sink and recent tokens), by ``drrl_gym.selection`` (2)-(5). What a forward does:

* The keys live rotated, K~ = K P, in a :class:`~drrl_gym.rotated_cache.RotatedCache`; ``generate`` inside the
  press creates one sized for the prompt plus ``max_new_tokens`` (or pass ``press.new_cache(batch, max_length)``).
* Prefill (more than one new token): exact causal attention, SDPA of the rotated queries q~ = q P against K~. The
  cache holds no unrotated key, and (q P)(K P)^T = q K^T because P P^T = I (``drrl_gym.selection`` (1)), so rotating
  the queries (2 d^2 per query) scores the cache exactly; no key is ever rotated back.
* Decode (one new token per row): ``drrl_gym.selection_decode.selection_decode`` over the rotated cache, which on
  CUDA runs a kernel that reads only the first r columns of K~ to choose and the chosen keys and values to compute.
  Each row's visible-key count is its last position + 1, from the ``position_ids`` the model passes to attention:
  device tensors all the way, so a decode step can be captured as a CUDA graph.

With another cache (e.g. a ``DynamicCache`` when a forward is called without one) the keys arrive unrotated: prefill
is plain SDPA and decode rotates the visible keys on every call (correct, slower). Refused with a clear error:
architectures other than Llama-family, padding (rows of unequal length), beam search, assisted decoding, a second
press on the same model. On exit the model's attention implementation, its ``generate`` and its modules are as before.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from drrl_gym.backbone import AttentionGeometry
from drrl_gym.hf_compat import cache_argument, pop_cache
from drrl_gym.lowrank import ATTENTION_NAME, attention_modules
from drrl_gym.rotated_cache import RotatedCache, check_basis, rotate_precisely, stream_capturing
from drrl_gym.selection import DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS, check_window, checked_keep, visible_mask
from drrl_gym.selection_decode import rows_layout, selection_decode

PRESS_ATTENTION = "drrl_selection_press"
# Architectures whose attention receives post-RoPE q, k and the position_ids, and whose keys enter through
# cache.update(keys, values, layer_idx): checked on Llama (SmolLM2) with transformers 5.17 and 5.24.
SUPPORTED_MODEL_TYPES = ("llama",)


def _press_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                     position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    press = getattr(module, "drrl_press", None)
    if press is None:
        raise RuntimeError(f"{type(module).__name__} uses attn_implementation={PRESS_ATTENTION!r} outside a selection "
                           "press. Fix: enter `with selection_press(model, ...)` rather than setting it by hand.")
    return press.attend(module.layer_idx, query, key, value, scaling, position_ids), None


def _press_mask(attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """No mask: the press reads causality from the positions. A padded 2-D mask is refused (outside graph capture)."""
    if isinstance(attention_mask, torch.Tensor) and not stream_capturing(attention_mask) and not bool(attention_mask.all()):
        raise NotImplementedError("padding is not supported inside a selection press: rows must have equal lengths. "
                                  "Fix: run sequences of equal length without padding (or one at a time).")
    return None


AttentionInterface.register(PRESS_ATTENTION, _press_attention)
AttentionMaskInterface.register(PRESS_ATTENTION, _press_mask)


class SelectionPress:
    """Selection decoding of one model at a static (rank, keep) per (layer, KV head); enter it with
    :func:`selection_press`, which checks the arguments."""

    def __init__(self, model: PreTrainedModel, basis: torch.Tensor, ranks: torch.Tensor | int,
                 keeps: torch.Tensor | float, *, sink_tokens: int = DEFAULT_SINK_TOKENS,
                 recent_tokens: int = DEFAULT_RECENT_TOKENS, backend: str = "auto"):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"selection_press supports {SUPPORTED_MODEL_TYPES} models, got {model_type!r} "
                             f"({type(model).__name__}). Fix: use a Llama-family model, e.g. "
                             "drrl_gym.backbone.load_backbone('smollm2-135m').model.")
        self.model, self.geometry = model, AttentionGeometry.from_config(model.config)
        g = self.geometry
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.basis = check_basis(basis, g.num_layers, g.num_kv_heads, g.head_dim).to(self.device)
        check_window(sink_tokens, recent_tokens)
        self.sink_tokens, self.recent_tokens, self.backend = sink_tokens, recent_tokens, backend
        self.ranks = self._per_head(ranks, torch.long, "ranks").to(self.device)
        if int(self.ranks.min()) < 1 or int(self.ranks.max()) > g.head_dim:
            raise ValueError(f"ranks must be integers in [1, head_dim={g.head_dim}], got {ranks!r}. Fix: clip them.")
        self.keeps = checked_keep(self._per_head(keeps, torch.float64, "keeps")).to(self.device)

    def _per_head(self, setting: torch.Tensor | float, dtype: torch.dtype, name: str) -> torch.Tensor:
        """A scalar or a (num_layers, num_kv_heads) tensor -> (num_layers, num_kv_heads) of ``dtype``."""
        g = self.geometry
        tensor = torch.as_tensor(setting)
        if tensor.dim() == 0:
            tensor = tensor.expand(g.num_layers, g.num_kv_heads)
        if tuple(tensor.shape) != (g.num_layers, g.num_kv_heads):
            raise ValueError(f"{name} must be a number or a ({g.num_layers}, {g.num_kv_heads}) (num_layers, "
                             f"num_kv_heads) tensor, got shape {tuple(tensor.shape)}. Fix: one value per (layer, KV "
                             "head), e.g. torch.full((num_layers, num_kv_heads), 16).")
        if dtype == torch.long and tensor.is_floating_point():
            raise ValueError(f"{name} must be integers, got {tensor.dtype}. Fix: pass ranks.long().")
        return tensor.to(dtype).clone()

    def new_cache(self, batch_size: int, max_length: int) -> RotatedCache:
        """An empty rotated cache for ``batch_size`` rows of up to ``max_length`` tokens, on the model's device."""
        return RotatedCache(self.basis, batch_size, max_length, self.dtype, self.device)

    # ------------------------------------------------------------------------------------------------ forward
    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
               position_ids: torch.Tensor | None) -> torch.Tensor:
        """Attention output (B, T, H, dv) of one layer (module docstring); key is 5-D from a rotated cache."""
        batch, _, new, head_dim = query.shape
        scaling = head_dim**-0.5 if scaling is None else scaling
        if position_ids is None:
            raise ValueError("the press needs the position_ids the model passes to attention. Fix: call the model's "
                             "forward (or generate), which computes them.")
        lengths = (position_ids[:, -1] + 1).expand(batch)  # keys visible to each row's last new token
        rotated_cache = key.dim() == 5
        basis = self.basis[layer]
        if new == 1:
            rotated_query = rotate_precisely(query, basis)[:, :, 0]  # q~ = q P, (B, H, d)
            keys = key if rotated_cache else rotate_precisely(key, basis)  # K~ = K P
            out = selection_decode(rotated_query, keys, value, lengths, self.ranks[layer], self.keeps[layer],
                                   scaling=scaling, sink_tokens=self.sink_tokens, recent_tokens=self.recent_tokens,
                                   backend=self.backend)
            return out[:, None]  # (B, 1, H, dv): the layout transformers' attention functions return
        visible = int(lengths.max())  # prefill only: one host read
        if not bool((lengths == visible).all()):
            raise NotImplementedError("padding is not supported inside a selection press: rows have different "
                                      "positions. Fix: run sequences of equal length without padding.")
        if rotated_cache:  # exact in the rotated frame: (q P)(K P)^T = q K^T
            query = rotate_precisely(query, basis)
            key = rows_layout(key[:, :, :, :visible])
        else:
            key = key[:, :, :visible]
        causal = new == visible  # a fresh prompt; otherwise the T queries are the last T of the visible keys
        # Each KV head repeated for its query heads, as transformers' repeat_kv does: every SDPA backend takes that.
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value[:, :, :visible].repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, is_causal=causal,
                                             attn_mask=None if causal else visible_mask(new, visible, query.device))
        return out.transpose(1, 2).contiguous()

    # ------------------------------------------------------------------------------------------- generate
    def _generate(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` with a rotated cache created for it, after refusing what the press cannot run."""
        config = kwargs.get("generation_config") or self.model.generation_config

        def setting(name: str) -> Any:
            return kwargs.get(name, getattr(config, name, None))

        if (setting("num_beams") or 1) > 1:
            raise NotImplementedError("beam search is not supported inside a selection press (it reorders cache rows). "
                                      "Fix: decode greedily or by sampling (num_beams=1).")
        if kwargs.get("assistant_model") is not None or setting("prompt_lookup_num_tokens") is not None:
            raise NotImplementedError("assisted decoding is not supported inside a selection press (it crops the "
                                      "cache). Fix: generate without an assistant.")
        if setting("use_cache") is False:
            raise NotImplementedError("generate inside a selection press decodes from its cache. Fix: keep "
                                      "use_cache=True (the default).")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and not bool(mask.all()):
            raise NotImplementedError("padding is not supported inside a selection press: rows must have equal "
                                      "lengths. Fix: generate for sequences of equal length, or one at a time.")
        cache = pop_cache(kwargs)
        if cache is None:
            inputs = args[0] if args else next((kwargs[k] for k in ("inputs", "input_ids", "inputs_embeds")
                                                if kwargs.get(k) is not None), None)
            if inputs is None:
                raise ValueError("generate inside a selection press needs a prompt. Fix: pass input_ids.")
            new_tokens = setting("max_new_tokens")
            total = inputs.shape[1] + new_tokens if new_tokens is not None else setting("max_length")
            cache = self.new_cache(inputs.shape[0] * (setting("num_return_sequences") or 1), total)
        elif not isinstance(cache, RotatedCache):
            raise TypeError(f"{type(cache).__name__} cannot serve a selection press's generate. Fix: pass no cache "
                            "(one is created) or press.new_cache(batch, max_length).")
        return original(*args, **kwargs, **cache_argument(cache))


@contextmanager
def selection_press(model: PreTrainedModel, basis: torch.Tensor, ranks: torch.Tensor | int, keeps: torch.Tensor | float,
                    *, sink_tokens: int = DEFAULT_SINK_TOKENS, recent_tokens: int = DEFAULT_RECENT_TOKENS,
                    backend: str = "auto") -> Iterator[SelectionPress]:
    """Run ``model`` with selection decoding inside the context (module docstring); yields the :class:`SelectionPress`.

    Args:
        model: a plain Llama-family HF causal LM (not one with a dynamic-rank runtime or another press).
        basis: (num_layers, num_kv_heads, d, d) orthonormal columns by energy, e.g.
            ``drrl_gym.calibration.corpus_basis(backbone)``.
        ranks: an int, or (num_layers, num_kv_heads) integers in [1, d]: the choosing rank of each (layer, KV head).
        keeps: a float, or (num_layers, num_kv_heads) fractions in (0, 1] of the visible keys each decoded token keeps.
        sink_tokens, recent_tokens: keys every decoded token keeps (the first ones; its last ones, itself included).
        backend: passed to ``selection_decode`` (``"auto"``: the GPU kernel where it applies).
    """
    if model.config._attn_implementation in (ATTENTION_NAME, PRESS_ATTENTION) or hasattr(model, "drrl_press"):
        raise RuntimeError("this model already runs a dynamic-rank attention or a selection press. Fix: exit the other "
                           "press, or use a plain model (drrl_gym.backbone.load_backbone).")
    press = SelectionPress(model, basis, ranks, keeps, sink_tokens=sink_tokens, recent_tokens=recent_tokens,
                           backend=backend)
    modules = attention_modules(model, press.geometry.num_layers)
    previous, own_generate = model.config._attn_implementation, model.__dict__.get("generate")
    original = model.generate
    for module in modules:
        module.drrl_press = press
    model.set_attn_implementation(PRESS_ATTENTION)
    # Wrapped on this instance only (as accelerate's hooks do); functools.wraps keeps generate's signature visible.
    model.generate = functools.wraps(original)(functools.partial(press._generate, original))
    model.drrl_press = press
    try:
        yield press
    finally:
        model.set_attn_implementation(previous)
        for module in modules:
            del module.drrl_press
        del model.drrl_press
        if own_generate is None:
            del model.generate  # the instance attribute set above: the class's generate is back
        else:
            model.generate = own_generate

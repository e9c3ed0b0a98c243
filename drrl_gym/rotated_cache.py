"""A preallocated KV cache that keeps every key rotated into the calibrated basis, for selection decoding.

Selection attention needs the keys only as K~ = K P (``drrl_gym.selection`` (1)): the first r columns of K~ choose
the keys, and the rotated query q~ = q P scores the chosen ones exactly. So the cache rotates each key once, when it
is written, and never keeps the unrotated one: its memory equals a plain cache's.

Layout (``drrl_gym.selection_decode``): per layer, for batch B, KV heads H_kv, head_dim d and capacity L_max,

* ``keys``: K~ dim-blocked, (B, H_kv, d // DIM_BLOCK, L_max, DIM_BLOCK): choosing at rank r reads r / DIM_BLOCK
  contiguous blocks of each key and nothing beyond column r;
* ``values``: (B, H_kv, L_max, dv), as in transformers' ``StaticLayer``;
* ``cumulative_length``: a 0-dim long tensor on the device, the number of positions written.

``update(key_states, value_states, layer_idx)`` works like transformers' ``StaticLayer.update`` (5.17 and 5.24
alike): it writes the T new positions at ``cumulative_length + arange(T)`` with ``index_copy_`` and advances
``cumulative_length`` in place, so the tensors never move and the write is a fixed sequence of device operations
(a decode step can be captured as a CUDA graph; positions come from the device length, not from the host). It
returns the whole buffers ``(keys, values)``: the 5-D rotated keys and the values, all L_max positions, of which a
row's first ``lengths[b]`` are valid. Only an attention function that knows this layout may read them
(``drrl_gym.press``); a 5-D key tensor makes any other fail loudly rather than compute with rotated keys.

The buffers are allocated at construction (batch, capacity, dtype and device are known then), so their addresses are
fixed before the first forward. ``is_compileable`` is False on purpose: ``generate`` would otherwise wrap the decode
forward in ``torch.compile`` on CUDA; the press is made for CUDA-graph capture instead. Beam search (which reorders
rows) and cropping are refused.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from drrl_gym.selection import rotate
from drrl_gym.selection_decode import DIM_BLOCK

ORTHONORMAL_TOLERANCE = 1e-3  # max |P^T P - I|: a float32 eigenbasis is orthonormal to ~1e-6; anything else is wrong


def stream_capturing(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s device is being captured into a CUDA graph (then nothing may read it on the host)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def rotate_precisely(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x P (``drrl_gym.selection.rotate``) computed in at least float32 and returned in x's dtype: one rounding."""
    return rotate(x.to(torch.promote_types(x.dtype, torch.float32)), basis).to(x.dtype)


def check_basis(basis: torch.Tensor, num_layers: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """``basis`` in at least float32 after checking its shape (num_layers, H_kv, d, d), d % DIM_BLOCK and orthonormality."""
    expected = (num_layers, kv_heads, head_dim, head_dim)
    if not isinstance(basis, torch.Tensor) or tuple(basis.shape) != expected:
        got = tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__
        raise ValueError(f"basis must be a tensor of shape {expected} (num_layers, num_kv_heads, d, d), got {got}. Fix: "
                         "pass drrl_gym.calibration.corpus_basis(backbone) or a basis calibrated for this model.")
    if head_dim % DIM_BLOCK:
        raise ValueError(f"head_dim {head_dim} is not a multiple of {DIM_BLOCK}: the dim-blocked key layout cannot hold "
                         "it. Fix: use a model whose head_dim is a multiple of 16 (Llama-family models are).")
    basis = basis.detach().to(torch.promote_types(basis.dtype, torch.float32))
    error = (basis.transpose(-1, -2) @ basis - torch.eye(head_dim, dtype=basis.dtype, device=basis.device)).abs().max()
    if float(error) > ORTHONORMAL_TOLERANCE:
        raise ValueError(f"the basis is not orthonormal (max |P^T P - I| = {float(error):.2e}): rotated scores would not "
                         "equal the model's. Fix: pass orthonormal columns, e.g. an eigenbasis from drrl_gym.calibration.")
    return basis


class RotatedLayer(CacheLayerMixin):
    """One layer of :class:`RotatedCache` (module docstring): rotated keys, values and the written length."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, basis: torch.Tensor, batch_size: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str, value_dim: int | None = None):
        super().__init__()
        kv_heads, head_dim = basis.shape[0], basis.shape[-1]
        self.basis = basis.to(device)  # (H_kv, d, d), at least float32
        self.max_cache_len, self.batch_size, self.num_heads = max_length, batch_size, kv_heads
        self.dtype, self.device = dtype, torch.device(device)
        self.keys = torch.zeros(batch_size, kv_heads, head_dim // DIM_BLOCK, max_length, DIM_BLOCK, dtype=dtype,
                                device=device)
        self.values = torch.zeros(batch_size, kv_heads, max_length, value_dim or head_dim, dtype=dtype, device=device)
        self.cumulative_length = torch.zeros((), dtype=torch.long, device=device)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers are allocated at construction."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new (B, H_kv, T, d) keys (rotated here) and values at the next positions; return the buffers."""
        batch, kv_heads, new, head_dim = key_states.shape
        if (batch, kv_heads, head_dim) != (self.batch_size, self.num_heads, self.basis.shape[-1]) \
                or value_states.shape[:3] != key_states.shape[:3]:
            raise ValueError(f"this rotated cache holds batch {self.batch_size}, {self.num_heads} KV heads of head_dim "
                             f"{self.basis.shape[-1]}; got keys {tuple(key_states.shape)} and values "
                             f"{tuple(value_states.shape)}. Fix: create the cache for this batch (press.new_cache).")
        if not stream_capturing(key_states):  # one host read per layer; never inside a captured graph
            written = int(self.cumulative_length)
            if written + new > self.max_cache_len:
                raise ValueError(f"the rotated cache holds {self.max_cache_len} positions, {written} are written and "
                                 f"{new} more arrived. Fix: create it with max_length >= prompt + new tokens.")
        positions = torch.arange(new, device=self.device) + self.cumulative_length
        rotated = rotate_precisely(key_states, self.basis).to(self.dtype)  # K~ = K P, (B, H_kv, T, d)
        blocked = rotated.unflatten(-1, (head_dim // DIM_BLOCK, DIM_BLOCK)).transpose(2, 3)  # (B, H_kv, d/16, T, 16)
        self.keys.index_copy_(3, positions, blocked)
        self.values.index_copy_(2, positions, value_states.to(self.dtype))
        self.cumulative_length.add_(new)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self) -> torch.Tensor:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the rotated cache does not reorder rows (beam search). Fix: decode greedily or by "
                                  "sampling (num_beams=1).")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the rotated cache cannot be cropped (assisted decoding, contrastive search). Fix: "
                                  "generate without an assistant model.")


class RotatedCache(Cache):
    """A :class:`RotatedLayer` per model layer, allocated now for ``batch_size`` rows of up to ``max_length`` tokens.

    ``basis``: (num_layers, num_kv_heads, d, d) orthonormal (checked). Pass it to a forward or ``generate`` as the
    cache (``drrl_gym.hf_compat.cache_argument``) inside a ``drrl_gym.press.selection_press``.
    """

    def __init__(self, basis: torch.Tensor, batch_size: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str, value_dim: int | None = None):
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
        if basis.dim() != 4:
            raise ValueError(f"basis must be (num_layers, num_kv_heads, d, d), got {tuple(basis.shape)}")
        basis = check_basis(basis, *basis.shape[:3])
        super().__init__(layers=[RotatedLayer(layer_basis, batch_size, max_length, dtype, device, value_dim)
                                 for layer_basis in basis])

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) positions written per row (all rows alike: the cache holds equal-length sequences)."""
        first = self.layers[0]
        return first.cumulative_length.expand(first.batch_size)

    @property
    def nbytes(self) -> int:
        """Bytes of the key and value buffers (the whole capacity)."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)

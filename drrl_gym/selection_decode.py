"""Selection attention for one decoded token per sequence, over a cache of keys rotated into the basis.

Decoding reads the whole KV cache for every new token, so it is bound by memory traffic. With the keys stored
rotated, K~ = K P (``drrl_gym.selection`` (1)), one cache serves both steps of selection attention: the first r
columns of K~ choose the keys ((2)-(4) of ``drrl_gym.selection``), and since (q P)(K~)^T = q K^T the chosen keys are
scored exactly from the same K~ with the rotated query q~ = q P. No unrotated key is needed at all.

Layouts of the rotated keys (both accepted everywhere):

* rows: (B, H_kv, L_max, d), the layout of an HF cache;
* dim-blocked: (B, H_kv, d // DIM_BLOCK, L_max, DIM_BLOCK). Columns c*DIM_BLOCK .. (c+1)*DIM_BLOCK - 1 of every
  key lie together, so choosing at rank r reads r/DIM_BLOCK contiguous blocks and never a byte of the columns
  beyond r (the layout ``drrl_gym.rotated_cache`` keeps).

The row ``b`` sees its first ``lengths[b]`` keys (the new token's own key included, at position lengths[b] - 1).
:func:`selection_decode_reference` is the PyTorch reference (dense, row by row, exactly ``selection_attention`` at
T = 1); :func:`selection_decode` runs the Triton kernels of ``drrl_gym.selection_decode_triton`` on CUDA tensors.
"""

from __future__ import annotations

import torch

from drrl_gym.selection import (
    DEFAULT_RECENT_TOKENS,
    DEFAULT_SINK_TOKENS,
    check_window,
    checked_scaling,
    selection_attention,
)

DIM_BLOCK = 16  # columns per block of the dim-blocked layout: 32 bytes in bf16, one memory sector


def rows_layout(rotated_keys: torch.Tensor) -> torch.Tensor:
    """The keys in the rows layout (B, H_kv, L_max, d), whichever layout they come in (a view when possible)."""
    if rotated_keys.dim() == 4:
        return rotated_keys
    if rotated_keys.dim() != 5 or rotated_keys.shape[-1] != DIM_BLOCK:
        raise ValueError(f"rotated keys must be (B, H_kv, L, d) or (B, H_kv, d // {DIM_BLOCK}, L, {DIM_BLOCK}), got "
                         f"{tuple(rotated_keys.shape)}")
    batch, kv_heads, blocks, length, _ = rotated_keys.shape
    return rotated_keys.permute(0, 1, 3, 2, 4).reshape(batch, kv_heads, length, blocks * DIM_BLOCK)


def dim_blocked_layout(rotated_keys: torch.Tensor) -> torch.Tensor:
    """(B, H_kv, L, d) -> (B, H_kv, d // DIM_BLOCK, L, DIM_BLOCK), contiguous (a copy)."""
    batch, kv_heads, length, d = rotated_keys.shape
    if d % DIM_BLOCK:
        raise ValueError(f"head_dim {d} is not a multiple of {DIM_BLOCK}. Fix: use the rows layout.")
    return rotated_keys.reshape(batch, kv_heads, length, d // DIM_BLOCK, DIM_BLOCK).permute(0, 1, 3, 2, 4).contiguous()


def selection_decode_reference(
    rotated_query: torch.Tensor,
    rotated_keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    rank: torch.Tensor | int,
    keep: torch.Tensor | float,
    *,
    scaling: float | None = None,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
    recent_tokens: int = DEFAULT_RECENT_TOKENS,
) -> torch.Tensor:
    """Selection attention ("group" selection) of one new token per row: output (B, H, dv).

    Args:
        rotated_query: (B, H, d) q~ = q P of the new token (post-RoPE), query head h in KV head h // G.
        rotated_keys: K~ in either layout (module docstring), L_max >= max(lengths).
        values: (B, H_kv, L_max, dv).
        lengths: (B,) keys visible to each row's new token, in [1, L_max].
        rank, keep: per (B, H_kv) settings (broadcastable), as in ``drrl_gym.selection.selection_attention``.
    """
    keys = rows_layout(rotated_keys)
    if rotated_query.dim() != 3 or keys.shape[0] != rotated_query.shape[0]:
        raise ValueError(f"rotated_query must be (B, H, d) with the keys' B, got {tuple(rotated_query.shape)} and keys "
                         f"{tuple(keys.shape)}")
    batch, kv_heads, d = keys.shape[0], keys.shape[1], keys.shape[-1]
    lengths = torch.as_tensor(lengths).long().cpu()
    if lengths.shape != (batch,) or int(lengths.min()) < 1 or int(lengths.max()) > keys.shape[2]:
        raise ValueError(f"lengths must be (B,) = ({batch},) in [1, {keys.shape[2]}], got {lengths.tolist()}")
    rank = torch.as_tensor(rank, device=keys.device).expand(batch, kv_heads)
    keep = torch.as_tensor(keep, dtype=torch.float64, device=keys.device).expand(batch, kv_heads)
    identity = torch.eye(d, dtype=torch.float32, device=keys.device).expand(kv_heads, d, d)  # already rotated
    rows = []
    for b, n in enumerate(lengths.tolist()):
        out, _ = selection_attention(rotated_query[b : b + 1, :, None], keys[b : b + 1, :, :n], values[b : b + 1, :, :n],
                                     identity, rank[b : b + 1], keep[b : b + 1], scaling=scaling,
                                     sink_tokens=sink_tokens, recent_tokens=recent_tokens, selection="group")
        rows.append(out[:, 0])  # (1, H, dv)
    return torch.cat(rows)


BACKENDS = ("auto", "triton", "reference")


def selection_decode(
    rotated_query: torch.Tensor,
    rotated_keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    rank: torch.Tensor | int,
    keep: torch.Tensor | float,
    *,
    scaling: float | None = None,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
    recent_tokens: int = DEFAULT_RECENT_TOKENS,
    backend: str = "auto",
) -> torch.Tensor:
    """Selection attention of one new token per row, (B, H, dv): :func:`selection_decode_reference`'s arguments.

    backend: "triton" runs ``drrl_gym.selection_decode_triton`` (CUDA tensors, or CPU ones under Triton's
    interpreter, TRITON_INTERPRET=1): everything stays on the device, with no host synchronisation, so a call can be
    captured in a CUDA graph; pass lengths, rank and keep as device tensors. It checks shapes and dtypes but cannot
    check values without a sync (out-of-range ones are clamped), and keeps every key that ties the threshold.
    "reference" runs the PyTorch reference. "auto" picks "triton" for CUDA tensors when triton imports, else
    "reference".
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}. Fix: choose one of {BACKENDS}.")
    if backend == "auto":
        backend = "triton" if rotated_query.is_cuda and _triton_available() else "reference"
    if backend == "reference":
        return selection_decode_reference(rotated_query, rotated_keys, values, lengths, rank, keep, scaling=scaling,
                                          sink_tokens=sink_tokens, recent_tokens=recent_tokens)
    if not _triton_available():
        raise ValueError("backend='triton' needs the triton package. Fix: pip install 'triton>=3.6,<3.7' (Linux) or "
                         "use backend='reference'.")
    from drrl_gym.selection_decode_triton import interpreter_enabled, selection_decode_triton

    if not rotated_query.is_cuda and not interpreter_enabled():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, "
                         "for the CPU interpreter). Fix: move the tensors to the GPU or use backend='reference'.")
    check_window(sink_tokens, recent_tokens)
    return selection_decode_triton(rotated_query, rotated_keys, values, lengths, rank, keep,
                                   scaling=checked_scaling(scaling, rotated_query.shape[-1]),
                                   sink_tokens=sink_tokens, recent_tokens=recent_tokens)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True

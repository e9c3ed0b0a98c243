"""Pictures of an episode: a text line of the last step, and a heatmap of the ranks run so far."""

from __future__ import annotations

from typing import Any

import numpy as np


def render_text(info: dict[str, Any], segment: int, n_segments: int, head_dim: int, sequence_index: int | None) -> str:
    """The ``"ansi"`` render: a summary of the last step (``info``), or of the warm-up before any step."""
    last = n_segments - 1
    if segment == 0:
        return "no episode yet: call reset()"
    if not info:
        return f"segment 0/{last}: warm-up at full rank {head_dim} (train sequence {sequence_index})"
    return (
        f"segment {info['segment']}/{last} | mean rank {info['ranks'].mean():.1f}/{head_dim} | "
        f"fidelity {info['fidelity']:.4f} | flops cost {info['flops_cost']:.3f} | perturbation "
        f"{info['perturbation']:.4f} | rejections {info['mask_rejections']} | reward {info['reward']:+.4f}\n"
        f"ranks: {' '.join(str(r) for r in info['ranks'])}"
    )


# viridis at 0, 1/4, 1/2, 3/4, 1 (matplotlib's values), interpolated linearly: no plotting backend needed.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
_NOT_RUN = np.array([32, 32, 32], dtype=np.uint8)
_CELL = (8, 16)  # pixels per (unit, segment) cell


def rank_heatmap(history: np.ndarray | None, head_dim: int, n_units: int, n_segments: int) -> np.ndarray:
    """uint8 (n_units * 8, n_segments * 16, 3) image of ranks (rows: decision units, columns: segments)."""
    image = np.empty((n_units, n_segments, 3), dtype=np.uint8)
    image[:] = _NOT_RUN
    if history is not None:
        run = history > 0
        position = history[run] / head_dim * (len(_VIRIDIS) - 1)
        anchors = np.arange(len(_VIRIDIS))
        colours = np.stack([np.interp(position, anchors, _VIRIDIS[:, c]) for c in range(3)], axis=-1)
        image[run] = colours.round().astype(np.uint8)
    return image.repeat(_CELL[0], axis=0).repeat(_CELL[1], axis=1)

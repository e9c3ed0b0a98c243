"""The heavy objects environments share within one process: the frozen model, the tokenized corpus, the basis.

N environments built by name share one model per (model, device, dtype), one corpus per (model, corpus config) and
one calibrated basis per (model, calibration data), so a vector env, an evaluation env and a probe cost one copy.
:func:`free_shared_resources` drops them (GPU memory is returned once nothing else holds the tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from drrl_gym.backbone import DEFAULT_MODEL, Backbone, load_backbone, resolve_device
from drrl_gym.calibration import load_or_calibrate_basis
from drrl_gym.corpus import CorpusConfig, CorpusSplits, load_corpus

_T = TypeVar("_T")
_SHARED: dict[tuple, Any] = {}


def _shared(key: tuple, build: Callable[[], _T]) -> _T:
    if key not in _SHARED:
        _SHARED[key] = build()
    return _SHARED[key]


def shared_backbone(model: str = DEFAULT_MODEL, device: str = "auto", dtype: torch.dtype | None = None) -> Backbone:
    """``load_backbone`` once per (model, device, dtype) in this process; the envs built by name use this."""
    target = resolve_device(device)
    return _shared(("backbone", model, str(target), dtype), lambda: load_backbone(model, target, dtype))


def shared_corpus(backbone: Backbone, config: CorpusConfig) -> CorpusSplits:
    """``load_corpus`` once per (model, corpus config)."""
    return _shared(("corpus", backbone.fingerprint, config), lambda: load_corpus(backbone.tokenizer, config))


def shared_basis(backbone: Backbone, splits: CorpusSplits) -> torch.Tensor:
    """The calibrated basis, on the model's device (the attention slices it every forward)."""
    key = ("basis", backbone.fingerprint, splits.fingerprint, str(backbone.device))

    def build() -> torch.Tensor:
        return load_or_calibrate_basis(backbone, splits.calibration, splits.fingerprint).to(backbone.device)

    return _shared(key, build)


def free_shared_resources() -> int:
    """Forget every shared model, corpus and basis; returns how many objects were dropped. Environments still
    alive keep their own references, so call this after closing them."""
    count = len(_SHARED)
    _SHARED.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count

"""Shared fixtures. Backbones are loaded once per session; none of them is ever modified by a test."""

from __future__ import annotations

import os
from contextlib import contextmanager

# Tests never touch the model/dataset hub: everything comes from registry packages or is built in code.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from drrl_gym.backbone import DEFAULT_MODEL, Backbone, load_backbone  # noqa: E402
from drrl_gym.lowrank import DynamicRankAttention  # noqa: E402

# The tiny environment most tests share: 4 segments of 32 tokens on the tiny random Llama (head_dim 16).
TINY_ENV = dict(model="tiny-random-llama", seq_len=128, segment_len=32, rank_choices=(4, 8, 12, 16),
                calibration_sequences=2, eval_sequences=2, device="cpu")


@contextmanager
def one_thread():
    """One torch thread inside: many tiny ops only gain synchronisation from a second thread (milliseconds per op on
    a busy 2-core machine, against microseconds on one thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's forwards (tiny models never gain from two; the CI's 2 cores are shared).
    Use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_llama() -> Backbone:
    return load_backbone("tiny-random-llama", device="cpu")


@pytest.fixture(scope="session")
def tiny_gpt2() -> Backbone:
    return load_backbone("tiny-random-gpt2", device="cpu")


@pytest.fixture(scope="session", params=["tiny-random-llama", "tiny-random-gpt2"])
def tiny_backbone(request) -> Backbone:
    return load_backbone(request.param, device="cpu")


@pytest.fixture(scope="session")
def smollm2() -> Backbone:
    """The real default model (SmolLM2-135M, fp32 on CPU)."""
    return load_backbone(DEFAULT_MODEL, device="cpu")


def random_basis(backbone: Backbone, seed: int = 0) -> torch.Tensor:
    """A random orthonormal basis per (layer, KV head)."""
    g = backbone.geometry
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(g.num_layers, g.num_kv_heads, g.head_dim, g.head_dim, generator=generator)
    return torch.linalg.qr(gaussian)[0]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly on machines without CUDA (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class CapturingAttention(DynamicRankAttention):
    """Dynamic-rank attention that also keeps the post-RoPE q, k and the v each layer received (real activations
    for the bound tests)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        self.captured[module.layer_idx] = (query.detach().clone(), key.detach().clone(), value.detach().clone(),
                                           scaling)
        return super().__call__(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


